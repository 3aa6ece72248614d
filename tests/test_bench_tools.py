"""The profiling tool benchmarks rely on: a real jax.profiler trace of the train step, read back."""
from phijax.bench import profile_step


def test_profile_step_sums_the_traced_ops_per_kind(tmp_path):
    summary = profile_step.main(["--config", "nano", "--batch", "8", "--seq", "32", "--dtype", "float32",
                                 "--remat", "none", "--attention", "xla", "--steps", "2",
                                 "--keep_trace", str(tmp_path / "trace"), "--json", str(tmp_path / "p.json")])
    assert summary, "no device ops found in the trace"
    for dev in summary.values():
        assert dev["busy_ms"] > 0
        assert abs(sum(dev["kinds"].values()) - dev["busy_ms"]) < 1e-6 * dev["busy_ms"] + 1e-9
    assert any(d["kinds"].get("matmul", 0) > 0 for d in summary.values())  # the step's dots were seen
    assert (tmp_path / "p.json").stat().st_size > 0


def test_op_kinds():
    assert profile_step.kind_of("cudnn$fmha_fwd") == "attention kernel"
    assert profile_step.kind_of("ynn_fusion.74") == "matmul"
    assert profile_step.kind_of("copy_bitcast_fusion.29") == "copy/transpose"
    assert profile_step.kind_of("all-reduce.3") == "collective"
    assert profile_step.kind_of("loop_multiply_fusion") == "fusion"
