"""phijax.data.beam_cache: a Beam DirectRunner cache of a task equals the in-process
window cache, is found by the trainer's path (make_batches) with no rebuild, and its
sharded files read as one array."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phijax.data import pipeline
from phijax.data.pipeline import ShardedWindows, WindowBatches

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_sharded_windows_index_like_one_array():
    full = np.arange(23 * 5, dtype=np.uint16).reshape(23, 5)
    sw = ShardedWindows([full[:10], full[10:11], full[11:]])
    assert sw.shape == (23, 5) and len(sw) == 23 and sw.dtype == np.uint16
    idx = np.array([22, 0, 10, 11, 9, 10, 3])
    np.testing.assert_array_equal(sw[idx], full[idx])
    np.testing.assert_array_equal(sw[10], full[10])
    np.testing.assert_array_equal(sw[-1], full[-1])
    np.testing.assert_array_equal(sw[5:15], full[5:15])
    np.testing.assert_array_equal(np.asarray(sw), full)
    with pytest.raises(IndexError):
        sw[np.array([23])]
    with pytest.raises(ValueError, match="one L"):
        ShardedWindows([full, np.zeros((2, 4), np.uint16)])
    wb = WindowBatches(sw, 6, seed=1)
    np.testing.assert_array_equal(wb.global_batch(7)["inputs"],
                                  WindowBatches(full, 6, seed=1).global_batch(7)["inputs"])


def test_plan_covers_the_stream_exactly():
    from phijax.data import beam_cache

    counts = [(2, 0), (0, 7), (1, 20), (3, 5)]  # unordered, with an empty shard
    plans = beam_cache.plan_window_files(counts, window_len=4, per_file=3)
    assert [p["n_windows"] for p in plans] == [3, 3, 2]  # 32 tokens -> 8 windows
    flat = [(s, lo, hi) for p in plans for s, lo, hi in p["pieces"]]
    assert flat[0] == (0, 0, 7) and sum(hi - lo for _, lo, hi in flat) == 32
    with pytest.raises(ValueError, match="missing token shards"):
        beam_cache.plan_window_files([(0, 5), (2, 5)], 4, 3)


@pytest.mark.slow
def test_beam_cache_equals_in_process_and_feeds_trainer(tmp_path, monkeypatch):
    import seqio

    from phijax.data import beam_cache, seqio_tasks as tasks, testing

    root = testing.make_tiny_corpus(tmp_path / "corpus")
    name = "test_data_beam_tiny"
    tasks.register_corpus_task(name, root, 512, cache_dir=tmp_path / "tok")
    try:
        seq_len = 31
        ref = pipeline.build_window_cache(name, seq_len, cache_dir=tmp_path / "inproc")
        out = beam_cache.build_window_cache_beam(name, seq_len, cache_dir=tmp_path / "beam", num_shards=4,
                                                 windows_per_file=400, modules=["phijax.data.seqio_tasks"],
                                                 pipeline_args=["--runner=DirectRunner"])
        assert Path(out).name == ref.name  # the same key: task, length, vocabulary, corpus
        w_ref, m_ref = pipeline.load_windows(ref)
        w_beam, m_beam = pipeline.load_windows(out)
        assert isinstance(w_beam, ShardedWindows) and len(m_beam["shards"]) == -(-w_ref.shape[0] // 400) > 1
        np.testing.assert_array_equal(np.asarray(w_beam), np.asarray(w_ref))
        assert w_beam.dtype == w_ref.dtype
        for k in ("key", "n_windows", "n_tokens", "vocab_size", "vocab_fingerprint", "corpus_fingerprint", "seq_len"):
            assert m_beam[k] == m_ref[k], k
        assert m_beam["builder"] == "beam" and m_beam["n_token_shards"] == 4
        assert sorted(p.name for p in Path(out).parent.iterdir()) == [Path(out).name]  # no temp dirs left
        assert not (Path(out) / beam_cache.TOKENS_DIR).exists()

        # The trainer's path reads the Beam cache: no seqio run, same batches.
        calls = []
        monkeypatch.setattr(seqio.Task, "get_dataset", lambda *a, **k: calls.append(1))
        b = pipeline.make_batches("task", task_name=name, seq_len=seq_len, global_batch_size=8, seed=4,
                                  cache_dir=tmp_path / "beam")
        a = pipeline.make_batches("task", task_name=name, seq_len=seq_len, global_batch_size=8, seed=4,
                                  cache_dir=tmp_path / "inproc")
        assert calls == [] and b.state(3)["data_key"] == a.state(3)["data_key"]
        for s in (0, 3, 250):  # 250 steps > 1 epoch
            np.testing.assert_array_equal(b.global_batch(s)["targets"], a.global_batch(s)["targets"])
        monkeypatch.undo()
        # A complete cache is never rebuilt.
        assert beam_cache.build_window_cache_beam(name, seq_len, cache_dir=tmp_path / "beam",
                                                  modules=["phijax.data.seqio_tasks"]) == out
    finally:
        seqio.TaskRegistry.remove(name)
        tasks.TASK_INFO.pop(name, None)


@pytest.mark.slow
def test_beam_cli_with_gin_registered_user_data(tmp_path):
    """The documented real-corpus flow, on a tiny corpus: a gin file registers
    CodeTextbook over the user's code, the CLI caches its code task with Beam
    (flags after -- go to Beam), and the trainer's path then finds that cache."""
    from phijax.data import testing

    code = testing.make_tiny_corpus(tmp_path / "code")
    tok = testing.make_codegen_like_tokenizer(tmp_path / "tokenizer.json", ["def f():\n    return 1\n"] * 50)
    cache = tmp_path / "cache"
    gin_file = tmp_path / "data.gin"
    gin_file.write_text(f"""
phijax.tasks.register_codetextbook.name = 'test_beam_ct'
phijax.tasks.register_codetextbook.code = ['{code}']
phijax.tasks.register_codetextbook.tokenizer_path = '{tok}'
phijax.tasks.register_codetextbook.cache_dir = '{cache}'
""")
    r = subprocess.run([sys.executable, "-m", "phijax.data.beam_cache", "--task", "test_beam_ct_code",
                        "--seq_len", "64", "--cache_dir", str(cache), "--num_shards", "3",
                        "--gin_file", str(gin_file), "--register", "phijax.tasks.register_codetextbook",
                        "--", "--runner=DirectRunner", "--direct_num_workers=1"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "window cache:" in r.stdout
    out = Path(r.stdout.split("window cache:")[1].split()[0])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["builder"] == "beam" and meta["task"] == "test_beam_ct_code" and meta["n_windows"] > 10

    import gin
    import seqio

    import phijax.tasks  # noqa: F401
    from phijax.data import seqio_tasks as tasks

    gin.clear_config()
    try:
        gin.parse_config_file(str(gin_file))
        name = phijax.tasks.register_codetextbook()
        assert pipeline.build_window_cache("test_beam_ct_code", 64, cache_dir=cache) == out
        windows, _ = pipeline.load_windows(out)
        assert isinstance(windows, ShardedWindows) and windows.shape == (meta["n_windows"], 65)
    finally:
        gin.clear_config()
        seqio.MixtureRegistry.remove(name)
        seqio.TaskRegistry.remove("test_beam_ct_code")
        tasks.TASK_INFO.pop("test_beam_ct_code", None)


def test_unregistered_task_fails_before_beam_starts(tmp_path):
    from phijax.data import beam_cache

    with pytest.raises(ValueError, match="no_such_task.*not registered"):
        beam_cache.build_window_cache_beam("no_such_task", 8, cache_dir=tmp_path, modules=["phijax.data.seqio_tasks"])
    assert not any(tmp_path.iterdir())
