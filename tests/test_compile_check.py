"""phijax.compile_check: the real train step compiled by libtpu for a TPU topology, on this CPU."""
import json

import jax
import jax.numpy as jnp
import pytest

from phijax import compile_check
from phijax.config import preset

NANO = ["--gin_file=gin/models/nano.gin", "--gin_file=gin/runs/pretrain.gin", "--gin_param=SEQ_LEN = 128",
        "--gin_param=DATA_SOURCE = 'synthetic'", "--topology=v5e:2x2"]


@pytest.mark.parametrize("name,gen,dims", [("v4-32", "v4", (2, 2, 4)), ("v5e-16", "v5e", (4, 4)),
                                           ("v5e-64", "v5e", (8, 8)), ("v5p-8", "v5p", (2, 2, 1)),
                                           ("v6e-256", "v6e", (16, 16)), ("v5e:2x2", "v5e", (2, 2)),
                                           ("v4:2x2x2", "v4", (2, 2, 2))])
def test_topology_names(name, gen, dims):
    t = compile_check.parse_topology(name)
    assert (t.generation, t.dims) == (gen, dims)
    assert t.hbm_bytes == compile_check.HBM_BYTES[gen]


@pytest.mark.parametrize("name,match", [("v7-8", "unknown TPU generation"), ("v5e-12", "no standard v5e slice"),
                                        ("v4:2x2", "3 dimensions"), ("tpu", "cannot read topology")])
def test_bad_topology_names(name, match):
    with pytest.raises(compile_check.CompileCheckError, match=match):
        compile_check.parse_topology(name)


def test_matmul_flops_counts_scan_iterations_and_the_larger_branch():
    def f(ws, x, flag):
        h, _ = jax.lax.scan(lambda h, w: (h @ w, None), x, ws)  # 5 x [4,8]@[8,8]
        return jax.lax.cond(flag, lambda h: h @ jnp.ones((8, 8)), lambda h: h, h)  # [4,8]@[8,8] or nothing

    jaxpr = jax.make_jaxpr(f)(jnp.ones((5, 8, 8)), jnp.ones((4, 8)), True).jaxpr
    assert compile_check.matmul_flops(jaxpr) == 5 * 2 * 4 * 8 * 8 + 2 * 4 * 8 * 8


def test_nano_train_step_compiles_for_v5e_with_sane_figures(tmp_path, capsys):
    # Splash attention on rows with segment ids (every batch has them) and host-offloaded remat,
    # lowered and compiled by libtpu.
    out = tmp_path / "r.json"
    rc = compile_check.main(NANO + ["--gin_param=phijax.PhiConfig.attn_dropout = 0.0", "--per_device_batch=2",
                                    "--attention=auto", "--remat=offload_dots", f"--json={out}"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    r = json.loads(out.read_text())
    assert r["devices"] == 4 and "v5 lite" in r["device_kind"] and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert r["attention"] == "auto -> splash" and r["remat"] == "offload_dots"
    assert r["global_batch"] == 8 and r["seq_len"] == 128
    cfg = preset("nano")
    # Data parallel: every device holds the whole fp32 state (params + Adam's two moments; more
    # in HBM, as TPU tiles pad nano's small arrays), and its 2 of the 8 packed rows.
    state = 3 * 4 * cfg.param_count()
    m = r["memory"]
    assert state <= m["alias"] <= 1.5 * state  # the donated state comes back in place
    assert m["argument"] - m["alias"] >= 5 * 4 * 2 * 128
    assert m["temp"] > 0 and m["generated_code"] > 0 and m["host_temp"] > 0  # activations offloaded to host
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
    assert r["fits"] and m["total"] < m["hbm"] == 16 * 2 ** 30
    f = r["flops"]
    assert f["model"] == cfg.flops_per_token(128) * 8 * 128 / 4
    # Executed: the model's matmuls (biases and norms aside) plus one forward recomputed by remat,
    # plus splash's causal tiles counted whole.
    assert 0.95 * f["model"] < f["executed"] < 1.6 * f["model"]
    assert r["peak_flops"] == 197e12 and r["est_step_time_s"] == pytest.approx(f["executed"] / 197e12)
    assert r["mfu_ceiling"] == pytest.approx(f["model"] / f["executed"])
    assert "of 16 GiB HBM" in printed and "MFU ceiling" in printed and "lower bound" in printed


def test_a_config_that_does_not_fit_fails_naming_the_shortfall(capsys):
    rc = compile_check.main(NANO + ["--per_device_batch=65536"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "does not fit" in err and "16 GiB" in err and "per-device batch 65536" in err


def test_invalid_config_fails_before_compiling(capsys):
    rc = compile_check.main(NANO + ["--per_device_batch=2", "--microbatches=3"])
    assert rc == 2 and "not divisible by microbatches=3" in capsys.readouterr().err


def test_the_command_prints_the_report_and_no_libtpu_start_up_lines():
    # libtpu, describing a slice off a TPU VM, logs that it finds no TPU hosts: filtered (quiet start).
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "phijax", "compile-check", *NANO,
                        "--per_device_batch=2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "per-device memory" in r.stdout
    assert r.stderr == "", r.stderr
