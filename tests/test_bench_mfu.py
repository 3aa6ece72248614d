"""The MFU sweep with its PyTorch peer (phijax.bench.mfu --peer torch), run for real on the CPU at nano size."""
import json
import subprocess
import sys

import pytest

from phijax.bench import mfu


def _sweep(tmp_path, dtype, modes):
    # One jax device: the peer runs on one, so the phijax rows are comparable row for row.
    out = tmp_path / "mfu.json"
    result = mfu.main(["--configs", "nano", "--batches", "2", "--seq", "32", "--steps", "2", "--dtype", dtype,
                       "--remat", "none", "--attention", "xla", "--devices", "1", "--peer", "torch",
                       "--peer_modes", modes, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    return result


def _check(result, modes, loss_tol):
    rows, summary = result["rows"], result["summary"]["nano"]
    (j,) = [r for r in rows if r["framework"] == "phijax"]
    for mode in modes:
        (p,) = [r for r in rows if r["framework"] == "torch" and r["mode"] == mode]
        assert j["tokens_per_s"] > 0 and p["tokens_per_s"] > 0
        assert p["flops_per_token"] == j["flops_per_token"]
        # Same FLOPs and the same peak: the MFU ratio is the tokens/s ratio.
        assert j["mfu"] / p["mfu"] == pytest.approx(j["tokens_per_s"] / p["tokens_per_s"])
        assert summary[f"ratio_torch_{mode}"] == pytest.approx(j["tokens_per_s"] / p["tokens_per_s"])
        assert summary[f"torch_{mode}"]["tokens_per_s"] == p["tokens_per_s"]
        # Same initial weights, same tokens: the same loss before the first update.
        assert p["first_loss"] == pytest.approx(j["first_loss"], abs=loss_tol)
    assert summary["phijax"]["tokens_per_s"] == j["tokens_per_s"]


@pytest.mark.parametrize("dtype,loss_tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_mfu_sweep_with_torch_peer_eager(tmp_path, dtype, loss_tol):
    _check(_sweep(tmp_path, dtype, "eager"), ["eager"], loss_tol)


@pytest.mark.slow
def test_mfu_sweep_with_torch_peer_compiled(tmp_path):
    """torch.compile (inductor's C++ backend on a CPU): ≈ 30 s of compiling on 2 cores."""
    _check(_sweep(tmp_path, "float32", "compile"), ["compile"], 1e-4)


def test_mfu_and_peer_import_without_tensorflow():
    # The accelerator machine has neither tensorflow nor seqio nor gin.
    code = ("import sys, phijax.bench.mfu; assert 'torch' not in sys.modules; import phijax.bench.torch_peer; "
            "bad = [m for m in ('tensorflow', 'seqio', 'gin') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
