"""phijax.data.pipeline: window cache (exact, deterministic, reused, atomic) and
the (seed, step)-pure batch streams."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phijax.data import pipeline
from phijax.data import testing
from phijax.data.pipeline import SyntheticBatches, WindowBatches

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_import_hygiene_no_tensorflow():
    code = ("import sys, phijax.data, phijax.data.pipeline, phijax.data.corpus, phijax.data.vocab;"
            "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules];"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --- WindowBatches --------------------------------------------------------------
def ident_windows(n, seq_len):
    """Row r holds r*(L+1) ... so every token names its window."""
    return np.arange(n * (seq_len + 1), dtype=np.int64).reshape(n, seq_len + 1)


def rows_of(batch, seq_len):
    return (batch["inputs"][:, 0] // (seq_len + 1)).tolist()


def test_batch_layout():
    w = ident_windows(10, 6)
    b = WindowBatches(w, 4, seed=0).global_batch(0)
    assert set(b) == {"inputs", "targets", "loss_weights", "positions", "segment_ids"}
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
    assert b["loss_weights"].dtype == np.float32 and (b["loss_weights"] == 1).all()
    assert b["inputs"].shape == b["targets"].shape == b["loss_weights"].shape == (4, 6)
    full = w[rows_of(b, 6)]
    np.testing.assert_array_equal(b["inputs"], full[:, :-1])
    np.testing.assert_array_equal(b["targets"], full[:, 1:])


def test_same_seed_step_same_batch_and_restart_invariance():
    w = ident_windows(23, 5)
    a = WindowBatches(w, 8, seed=7)
    seq = [a.global_batch(s) for s in range(12)]  # crosses epochs
    fresh = WindowBatches(w, 8, seed=7)  # "after a restart": no history
    for s in (11, 3, 7, 0):
        for k in seq[s]:
            np.testing.assert_array_equal(fresh.global_batch(s)[k], seq[s][k])
    other = WindowBatches(w, 8, seed=8)
    assert any(rows_of(other.global_batch(s), 5) != rows_of(seq[s], 5) for s in range(3))


@pytest.mark.parametrize("n,b,p", [(16, 8, 2), (23, 8, 2), (23, 8, 4), (5, 12, 3)])
def test_process_slices_concat_to_global(n, b, p):
    w = ident_windows(n, 4)
    ref = WindowBatches(w, b, seed=3)
    shards = [WindowBatches(w, b, seed=3, process_index=i, process_count=p) for i in range(p)]
    for step in range(7):
        g = ref.global_batch(step)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([s.local_batch(step)[k] for s in shards]), g[k])
        # The global batch is also process-count invariant.
        np.testing.assert_array_equal(shards[1].global_batch(step)["inputs"], g["inputs"])
    assert shards[0].local_batch_size == b // p


@pytest.mark.parametrize("n,b", [(12, 4), (10, 4), (7, 3), (5, 8), (1, 3)])
def test_every_window_once_per_epoch(n, b):
    w = ident_windows(n, 3)
    wb = WindowBatches(w, b, seed=11)
    epochs = 4
    steps = -(-epochs * n // b)
    order = [r for s in range(steps) for r in rows_of(wb.global_batch(s), 3)][: epochs * n]
    chunks = [order[e * n:(e + 1) * n] for e in range(epochs)]
    for e, c in enumerate(chunks):
        assert sorted(c) == list(range(n)), f"epoch {e}: {c}"
        assert c == wb.permutation(e).tolist()
    if n >= 5:
        assert len({tuple(c) for c in chunks}) > 1  # epochs are reshuffled
    for s in range(steps):
        assert wb.epoch_of(s) == s * b // n


def test_state_round_trip_and_mismatch():
    w = ident_windows(10, 4)
    wb = WindowBatches(w, 4, seed=5)
    st = json.loads(json.dumps(wb.state(7)))
    assert st["step"] == 7 and st["seed"] == 5 and st["n_windows"] == 10 and st["seq_len"] == 4
    assert st["epoch"] == wb.epoch_of(7) == 2
    assert wb.check_state(st) == 7
    assert WindowBatches(w, 4, seed=5, process_index=1, process_count=2).check_state(st) == 7
    for other, field in [(WindowBatches(ident_windows(11, 4), 4, seed=5), "n_windows"),
                         (WindowBatches(ident_windows(10, 5), 4, seed=5), "seq_len"),
                         (WindowBatches(w, 4, seed=6), "seed"),
                         (WindowBatches(w, 8, seed=5), "global_batch_size")]:
        with pytest.raises(ValueError, match=field):
            other.check_state(st)
    with pytest.raises(ValueError, match="missing"):
        wb.check_state({"seed": 5})


@pytest.mark.parametrize("kwargs,match", [
    (dict(global_batch_size=6, process_count=4), "global_batch_size=6.*process_count=4"),
    (dict(global_batch_size=0), "global_batch_size"),
    (dict(process_index=2, process_count=2), "process_index=2"),
    (dict(process_index=-1, process_count=2), "process_index=-1"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments(kwargs, match):
    args = dict(global_batch_size=4, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        WindowBatches(ident_windows(8, 3), **args)
    with pytest.raises(ValueError, match=match):
        SyntheticBatches(100, 3, **args)


def test_bad_windows_and_steps():
    with pytest.raises(ValueError, match="shape"):
        WindowBatches(np.zeros(10), 2, 0)
    with pytest.raises(ValueError, match="shape"):
        WindowBatches(np.zeros((0, 5)), 2, 0)
    with pytest.raises(ValueError, match="shape"):
        WindowBatches(np.zeros((4, 1)), 2, 0)
    wb = WindowBatches(ident_windows(4, 3), 2, 0)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="step"):
            wb.local_batch(bad)


# --- SyntheticBatches ---------------------------------------------------------------
def test_synthetic_batches():
    a = SyntheticBatches(vocab_size=50, seq_len=9, global_batch_size=6, seed=1)
    b = a.global_batch(3)
    assert b["inputs"].shape == (6, 9) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    assert b["inputs"].min() >= 0 and b["targets"].max() < 50
    np.testing.assert_array_equal(SyntheticBatches(50, 9, 6, 1).global_batch(3)["inputs"], b["inputs"])
    assert not np.array_equal(a.global_batch(4)["inputs"], b["inputs"])
    assert not np.array_equal(SyntheticBatches(50, 9, 6, 2).global_batch(3)["inputs"], b["inputs"])
    parts = [SyntheticBatches(50, 9, 6, 1, i, 3).local_batch(3)["targets"] for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), b["targets"])
    st = a.state(3)
    assert json.loads(json.dumps(st)) == st and a.check_state(st) == 3
    with pytest.raises(ValueError, match="seed"):
        SyntheticBatches(50, 9, 6, 2).check_state(st)


def test_make_batches_synthetic_and_errors():
    b = pipeline.make_batches("synthetic", seq_len=8, global_batch_size=4, seed=0, vocab_size=77,
                              process_index=1, process_count=2)
    assert isinstance(b, SyntheticBatches) and b.local_batch(0)["inputs"].shape == (2, 8)
    with pytest.raises(ValueError, match="unknown data source"):
        pipeline.make_batches("c4", seq_len=8, global_batch_size=4)
    with pytest.raises(ValueError, match="task_name"):
        pipeline.make_batches("task", seq_len=8, global_batch_size=4)


# --- window cache (seqio/tf) ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    import tensorflow  # noqa: F401
    import seqio
    from phijax.data import seqio_tasks as tasks
    from phijax.data import vocab as vocab_lib

    root = testing.make_tiny_corpus(tmp_path_factory.mktemp("corpus"))
    cache = tmp_path_factory.mktemp("tokcache")
    name = "test_data_pipeline_tiny"
    tasks.register_corpus_task(name, root, 512, cache_dir=cache)
    tok = vocab_lib.BPETokenizer(vocab_lib.corpus_tokenizer_path(root, 512, cache_dir=cache))
    yield name, root, tok
    seqio.TaskRegistry.remove(name)
    tasks.TASK_INFO.pop(name, None)


def test_window_cache_exact_deterministic_and_reused(tiny_task, tmp_path, monkeypatch):
    import seqio

    from phijax.data import corpus as corpus_lib

    name, root, tok = tiny_task
    calls = []
    real = seqio.Task.get_dataset

    def counting(self, *a, **kw):
        calls.append(kw.get("sequence_length", a[0] if a else None))
        return real(self, *a, **kw)

    monkeypatch.setattr(seqio.Task, "get_dataset", counting)
    seq_len = 31
    path = pipeline.build_window_cache(name, seq_len, cache_dir=tmp_path / "c1")
    assert calls == [{"targets": seq_len + 1}]
    windows, meta = pipeline.load_windows(path)
    assert isinstance(windows, np.memmap) and windows.dtype == np.uint16
    stream = [i for _, t in corpus_lib.iter_documents(root) for i in tok.encode(t) + [tok.eos_id]]
    n = len(stream) // (seq_len + 1)
    assert windows.shape == (n, seq_len + 1)
    np.testing.assert_array_equal(windows.reshape(-1), stream[: n * (seq_len + 1)])
    assert meta["n_windows"] == n and meta["seq_len"] == seq_len and meta["task"] == name
    assert meta["n_tokens"] == n * (seq_len + 1) and meta["vocab_size"] == tok.vocab_size
    assert meta["vocab_fingerprint"] == tok.fingerprint
    assert meta["corpus_fingerprint"] == corpus_lib.corpus_fingerprint(root)

    mtime = (path / "windows.npy").stat().st_mtime_ns
    assert pipeline.build_window_cache(name, seq_len, cache_dir=tmp_path / "c1") == path
    assert len(calls) == 1 and (path / "windows.npy").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp dirs left
    assert path.stat().st_mode & 0o777 == 0o755  # shareable, not mkdtemp's 0700

    other = pipeline.build_window_cache(name, seq_len, cache_dir=tmp_path / "c2")
    assert len(calls) == 2
    assert (other / "windows.npy").read_bytes() == (path / "windows.npy").read_bytes()
    longer = pipeline.build_window_cache(name, seq_len + 1, cache_dir=tmp_path / "c1")
    assert longer != path and len(calls) == 3

    wb = WindowBatches.from_cache(path, 4, seed=0)
    assert wb.seq_len == seq_len and wb.n_windows == n and wb.vocab_size == tok.vocab_size
    assert wb.state(0)["data_key"] == meta["key"]
    r = wb.rows(2)
    np.testing.assert_array_equal(wb.global_batch(2)["inputs"], windows[r][:, :-1].astype(np.int32))


def test_window_cache_failed_build_leaves_nothing(tiny_task, tmp_path, monkeypatch):
    name, _, _ = tiny_task

    def boom(*a, **kw):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pipeline.np, "save", boom)
    with pytest.raises(OSError, match="simulated"):
        pipeline.build_window_cache(name, 16, cache_dir=tmp_path)
    assert list((tmp_path / "windows").iterdir()) == []
    monkeypatch.undo()
    path = pipeline.build_window_cache(name, 16, cache_dir=tmp_path)
    assert pipeline.load_windows(path)[0].shape[1] == 17


def test_window_cache_key_tracks_corpus(tmp_path, tiny_task):
    import seqio

    from phijax.data import seqio_tasks as tasks

    name, root, _ = tiny_task
    # A copy of the corpus, then an edit: the cache must not be reused.
    root2 = tmp_path / "corpus2"
    shutil.copytree(root, root2)
    tasks.register_corpus_task("test_data_pipeline_copy", root2, 512, cache_dir=tmp_path / "tok")
    try:
        p1 = pipeline.build_window_cache("test_data_pipeline_copy", 16, cache_dir=tmp_path)
        (root2 / "nasty" / "added.py").write_text("def added():\n    return 42\n")
        p2 = pipeline.build_window_cache("test_data_pipeline_copy", 16, cache_dir=tmp_path)
        assert p1 != p2
        assert json.loads((p1 / "meta.json").read_text())["corpus_fingerprint"] != \
            json.loads((p2 / "meta.json").read_text())["corpus_fingerprint"]
    finally:
        seqio.TaskRegistry.remove("test_data_pipeline_copy")
        tasks.TASK_INFO.pop("test_data_pipeline_copy", None)


def test_make_batches_task(tiny_task, tmp_path):
    name, _, tok = tiny_task
    b = pipeline.make_batches("task", task_name=name, seq_len=16, global_batch_size=6, seed=2,
                              process_index=2, process_count=3, cache_dir=tmp_path)
    assert isinstance(b, WindowBatches) and b.seq_len == 16 and b.vocab_size == tok.vocab_size
    assert b.local_batch(0)["inputs"].shape == (2, 16)
