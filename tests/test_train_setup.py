"""phijax.train_setup: the one set-up that training, the compile check and the benchmarks share."""
import gin
import jax
import numpy as np
import pytest

from phijax import train as train_lib
from phijax import train_setup
from phijax.config import preset
from phijax.data import packing, pipeline
from phijax.util import gin_config

CFG = preset("nano").replace(attention="xla")


def _run(**kw):
    return train_setup.RunConfig(model_config=CFG, batch_size=8, seq_len=16, **kw)


def _structure(batch):
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}


def test_every_source_yields_the_shaped_batch():
    s = train_setup.setup(_run())
    want = _structure(s.shaped_batch)
    assert set(want) == set(pipeline.FEATURES)
    windows = np.random.default_rng(0).integers(0, 100, (9, 17), dtype=np.int32)
    rows, _ = packing.pack_examples([([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 15])] * 4, eos_id=1,
                                    options=packing.PackOptions(seq_len=16))
    sources = {"synthetic": s.make_data(),  # all 8 (conftest) devices: data parallel over the batch of 8
               "windows": pipeline.WindowBatches(windows, 8, seed=0),
               "mixture": pipeline.MixtureBatches([("a", windows, {}), ("b", windows[:5], {})], [1.0, 1.0], 8, 0),
               "packed": pipeline.PackedBatches(rows, 8, seed=0)}
    for name, data in sources.items():
        got = data.global_batch(3)
        assert _structure(got) == want, name
    w = sources["windows"].global_batch(0)
    assert (w["segment_ids"] == 1).all() and (w["positions"] == np.arange(16)).all()


def test_the_step_compiled_from_the_shaped_batch_runs_the_real_batches():
    s = train_setup.setup(_run())
    lowered = s.step.lower(s.abstract_state, s.shaped_batch)  # what compile_check compiles
    compiled = lowered.compile()
    state, data = s.init_state(), s.make_data()
    losses = []
    for step in range(2):
        state, m = compiled(state, s.to_global(data.local_batch(step)))
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and losses[0] != losses[1]
    # The jitted step itself takes the same batches without a second trace.
    state, _ = s.step(state, s.to_global(data.local_batch(2)))
    state, _ = s.step(state, s.to_global(data.local_batch(3)))
    assert s.step._cache_size() == 1


def test_setup_refuses_a_run_that_cannot_run_on_the_mesh():
    with pytest.raises(ValueError, match="not divisible by microbatches=3"):
        train_setup.setup(_run(microbatches=3))
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        train_setup.setup(_run().replace(seq_len=CFG.max_len + 1))


def test_gin_configures_the_run_with_its_data_source():
    try:
        gin_config.parse(["gin/experiments/cpu_demo.gin"], ["MODEL_DIR = '/tmp/unused'", "DATA_SOURCE = 'exercises'",
                                                            "data_source.data_path = 'x.jsonl'"])
        run = train_lib.configure()
    finally:
        gin.clear_config()
    assert isinstance(run, train_setup.RunConfig)
    assert run.data_source == pipeline.DataSource("exercises", data_path="x.jsonl")
    assert run.model_dir == "/tmp/unused" and run.batch_size >= 1 and run.seq_len >= 1


def test_an_unknown_data_source_is_named_before_any_work():
    with pytest.raises(ValueError, match="unknown data source kind 'nope'"):
        pipeline.DataSource("nope")


def test_the_data_vocabulary_must_fit_the_model():
    with pytest.raises(ValueError, match=r"data's vocabulary \(512\) is larger than the model's vocab_size \(256\)"):
        pipeline.DataSource("synthetic", vocab_size=512).make(seq_len=8, global_batch_size=2, seed=0,
                                                              model_vocab_size=256)


def test_benchmarks_train_on_the_set_up_step():
    from phijax.bench import step_timing
    step, state, batch = step_timing.synthetic_train_step(CFG, 4, 16, devices=jax.devices()[:1])
    assert set(batch) == set(pipeline.FEATURES)
    state, m = step(state, batch)
    assert np.isfinite(float(m["loss"]))


def test_compiler_options_reach_the_step_and_bad_ones_fail_before_anything_runs():
    from phijax.bench import step_timing
    cfg = preset("tiny", n_layers=2, vocab_size=1024, d_model=128, n_heads=2, d_mlp=512, max_len=64,
                 scan_unroll=2, loss_chunk=16)
    losses, programs = {}, {}
    for name, options in (("default", None), ("onednn", train_setup.CPU_ONEDNN_DOTS)):
        step, state, batch = step_timing.synthetic_train_step(cfg, 4, 64, devices=jax.devices()[:1],
                                                              compiler_options=options)
        compiled = step.lower(state, batch).compile()  # the step's own program, compiled once
        programs[name] = compiled.as_text()
        losses[name] = []
        for _ in range(3):
            state, m = compiled(state, batch)
            losses[name].append(float(m["loss"]))
    # The options change the program (its matmuls become oneDNN fusions), not the numerics.
    assert "__onednn_fusion" in programs["onednn"] and "__onednn_fusion" not in programs["default"]
    np.testing.assert_allclose(losses["onednn"], losses["default"], rtol=1e-5)
    assert losses["default"][2] < losses["default"][0]
    with pytest.raises(ValueError, match="train.compiler_options .*No such compile option: 'xla_cpu_use_onednnn'"):
        train_setup.setup(_run(compiler_options={"xla_cpu_use_onednnn": True}))
    with pytest.raises(ValueError, match="'LIBRARY_FUSION_TYPE_DOTS' is not a valid enum value"):
        train_setup.setup(_run(compiler_options={"xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOTS"}))
