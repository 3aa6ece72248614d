"""The profiling tool benchmarks rely on: a real jax.profiler trace of the train step, read back."""
import json

from phijax import train_setup
from phijax.bench import profile_step


def test_profile_step_sums_the_traced_ops_per_kind(tmp_path):
    summary = profile_step.main(["--config", "nano", "--batch", "8", "--seq", "32", "--dtype", "float32",
                                 "--remat", "none", "--attention", "xla", "--steps", "2",
                                 "--compiler_options", json.dumps(train_setup.CPU_ONEDNN_DOTS),
                                 "--keep_trace", str(tmp_path / "trace"), "--json", str(tmp_path / "p.json")])
    assert summary, "no device ops found in the trace"
    for dev in summary.values():
        assert dev["busy_ms"] > 0
        assert abs(sum(dev["kinds"].values()) - dev["busy_ms"]) < 1e-6 * dev["busy_ms"] + 1e-9
    assert any(d["kinds"].get("matmul", 0) > 0 for d in summary.values())  # the step's dots were seen
    # ... compiled to oneDNN calls, as the options asked
    assert any("onednn" in name for d in summary.values() for name, *_ in d["ops"])
    assert (tmp_path / "p.json").stat().st_size > 0


def test_op_kinds():
    assert profile_step.kind_of("cudnn$fmha_fwd") == "attention kernel"
    assert profile_step.kind_of("ynn_fusion.74") == "matmul"
    assert profile_step.kind_of("onednn_fusion.12") == "matmul"
    assert profile_step.kind_of("ffi_call.40") == "cpu kernel (FFI)"
    assert profile_step.kind_of("copy_bitcast_fusion.29") == "copy/transpose"
    assert profile_step.kind_of("all-reduce.3") == "collective"
    assert profile_step.kind_of("loop_multiply_fusion") == "fusion"


def test_attention_bench_times_both_sides_on_the_same_values(tmp_path):
    from phijax.bench import attention as attention_bench
    rows = attention_bench.main(["--batch", "2", "--seq", "256", "--heads", "2", "--head_dim", "16", "--blocks", "1",
                                 "--rounds", "1", "--json", str(tmp_path / "a.json")])
    assert [r["side"] for r in rows][1:3] == ["phijax (oneDNN dots)", "phijax cpu kernel (FFI)"]
    assert [r["side"].split(" ")[0] for r in rows] == ["phijax", "phijax", "phijax", "phijax", "pytorch"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] >= 0 for r in rows)
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)  # same attention, same gradients as sdpa
    assert (tmp_path / "a.json").stat().st_size > 0


def test_cpu_gemms_bench_times_every_step_matmul_on_three_sides(tmp_path):
    from phijax.bench import cpu_gemms
    rows = cpu_gemms.main(["--config", "nano", "--batch", "2", "--seq", "32", "--loss_chunk", "8", "--reps", "1",
                           "--rounds", "1", "--json", str(tmp_path / "g.json")])
    # 5 matmuls (qkv, attention out, fc1, fc2, LM-head chunk) x (forward, input grad, weight grad);
    # each side's values were checked against numpy's before timing
    assert len(rows) == 15 and {r["form"] for r in rows} == {"x@W", "g@W^T", "x^T@g"}
    assert [r["per_step"] for r in rows if r["gemm"].startswith("lm head")] == [4, 4, 4]  # 32 / 8 chunks
    assert {r["per_step"] for r in rows if not r["gemm"].startswith("lm head")} == {2}  # nano's layers
    qkv_dw = next(r for r in rows if r["gemm"] == "qkv dW")
    assert (qkv_dw["m"], qkv_dw["k"], qkv_dw["n"]) == (64, 64, 3 * 64)  # d_model x tokens x 3 heads*head_dim
    assert all(r[f"{s}_gflops"] > 0 for r in rows for s in ("xla", "xla_onednn", "torch"))
    assert (tmp_path / "g.json").stat().st_size > 0
