"""`import phijax.tasks`: eval tasks, CodeTextbook registered from gin over user data
(TFDS builders, phi-1's pad-less tokenizer shape), token-proportional rates, and the
mixture feeding the trainer through window caches deterministically in (seed, step):
every window once per task-epoch over several epochs, process slices, exact resume
that reads only the resumed batch."""
from __future__ import annotations

import json

import gin
import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

import phijax.tasks  # noqa: F401  (the registry under test)
from phijax.data import corpus as corpus_lib
from phijax.data import pipeline, seqio_tasks as tasks, testing
from phijax.data import vocab as vocab_lib
from phijax.data.pipeline import MixtureBatches, WindowBatches

tfds.display_progress_bar(False)
SEQ = 16


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("registry")
    code = testing.make_tiny_corpus(d / "code")
    texts = [t for _, t in corpus_lib.iter_documents(code)]
    tok_path = testing.make_codegen_like_tokenizer(d / "tokenizer.json", texts)
    book = d / "textbook"
    book.mkdir()
    pages = [f"# Chapter {i}\n\nA function returns a value. Example {i}:\n\n    def f():\n        return {i}\n"
             for i in range(40)]
    (book / "part-0.jsonl").write_text("".join(json.dumps({"text": p, "topic": "functions"}) + "\n" for p in pages)
                                       + "not json\n")
    yield {"dir": d, "code": code, "book": book, "pages": pages, "tok_path": str(tok_path),
           "tok": vocab_lib.BPETokenizer(tok_path), "cache": d / "cache"}
    for n in [n for n in seqio.MixtureRegistry.names() if n.startswith("test_ct")]:
        seqio.MixtureRegistry.remove(n)
    for n in [n for n in seqio.TaskRegistry.names() if n.startswith(("test_ct", "phijax_humaneval_", "phijax_mbpp_"))]:
        seqio.TaskRegistry.remove(n)
        tasks.TASK_INFO.pop(n, None)


@pytest.fixture(scope="module")
def mixture(env):
    name = phijax.tasks.register_codetextbook("test_ct", code=[str(env["code"])], textbook=str(env["book"]),
                                              tokenizer_path=env["tok_path"], cache_dir=str(env["cache"]))
    return name


def test_default_registry():
    for name in (tasks.DEFAULT_TASK, tasks.HUMANEVAL_TASK, tasks.MBPP_TASK):
        assert name in seqio.TaskRegistry.names()
    assert seqio.get_mixture_or_task(tasks.MBPP_TASK).source.splits == ("prompt", "test", "validation", "train")


def test_eval_tasks(env):
    tok = env["tok"]
    he, mbpp = tasks.register_eval_tasks(tokenizer_path=env["tok_path"], data_dir=env["dir"] / "tfds",
                                         suffix="_cg")
    from phijax.data import benchmarks

    got = list(seqio.get_mixture_or_task(he).get_dataset(None, split="test", shuffle=False)
               .take(3).as_numpy_iterator())
    for ex, ref in zip(got, benchmarks.load_humaneval()):
        assert ex["inputs"].tolist() == tok.encode(ref["prompt"])
        assert ex["targets"].tolist() == tok.encode(ref["canonical_solution"]) + [tok.eos_id]
        assert ex["test"].decode() == ref["test"] and ex["entry_point"].decode() == ref["entry_point"]
        assert ex["task_id"].decode() == ref["task_id"]
    got = list(seqio.get_mixture_or_task(mbpp).get_dataset(None, split="prompt", shuffle=False).as_numpy_iterator())
    want = benchmarks.load_mbpp("prompt")
    assert [int(g["task_id"]) for g in got] == [w["task_id"] for w in want]
    assert got[0]["inputs_pretokenized"].decode() == want[0]["text"]
    assert [t.decode() for t in got[0]["test_list"]] == want[0]["test_list"]


def test_token_counts_and_default_rates(env, mixture):
    tok = env["tok"]
    mix = seqio.get_mixture_or_task(mixture)
    assert [t.name for t in mix.tasks] == ["test_ct_code", "test_ct_textbook"]
    code_docs = [t for _, t in corpus_lib.iter_documents(env["code"]) if t]  # the builder skips empty files
    want = {"test_ct_code": sum(len(tok.encode(t)) + 1 for t in code_docs),
            "test_ct_textbook": sum(len(tok.encode(p)) + 1 for p in env["pages"])}
    for t in mix.tasks:
        assert tasks.task_token_count(t.name, env["cache"]) == want[t.name]
        assert mix.get_rate(t) == float(want[t.name])  # default: in proportion to tokens
    # Overridden rates, and bad ones rejected at registration.
    name = phijax.tasks.register_codetextbook("test_ct_rates", code=[str(env["code"])], textbook=str(env["book"]),
                                              tokenizer_path=env["tok_path"], cache_dir=str(env["cache"]),
                                              code_rate=3.0, textbook_rate=1.0)
    m2 = seqio.get_mixture_or_task(name)
    assert [(t.name, m2.get_rate(t)) for t in m2.tasks] == [("test_ct_rates_code", 3.0), ("test_ct_rates_textbook", 1.0)]
    with pytest.raises(ValueError, match="rate"):
        phijax.tasks.register_codetextbook("test_ct_bad", code=[str(env["code"])], code_rate=-1.0,
                                           tokenizer_path=env["tok_path"], cache_dir=str(env["cache"]))
    with pytest.raises(ValueError, match="code and/or textbook"):
        phijax.tasks.register_codetextbook("test_ct_none")


def test_mixture_trains_through_window_caches(env, mixture):
    tok = env["tok"]
    b = pipeline.make_batches("task", task_name=mixture, seq_len=SEQ, global_batch_size=8, seed=3,
                              cache_dir=env["cache"])
    assert isinstance(b, MixtureBatches) and b.seq_len == SEQ and b.vocab_size == tok.vocab_size
    # Windows are the tasks' own caches: the code task's stream is its documents + EOS.
    code_w, _ = pipeline.load_windows(pipeline.build_window_cache("test_ct_code", SEQ, env["cache"]))
    docs = [t for _, t in corpus_lib.iter_documents(env["code"]) if t]
    stream = [i for t in docs for i in tok.encode(t) + [tok.eos_id]]
    np.testing.assert_array_equal(np.asarray(code_w).reshape(-1), stream[: code_w.size])
    assert code_w.dtype == np.uint16  # 50295 ids fit
    # Default rates follow tokens, so quotas follow window counts.
    assert abs(b.quotas[0] / b.quotas.sum() - b.sizes[0] / b.sizes.sum()) < 2 / b.block_size
    g = b.global_batch(5)
    assert g["inputs"].shape == (8, SEQ) and (g["loss_weights"] == 1).all()
    same = pipeline.make_batches("mixture", task_name=mixture, seq_len=SEQ, global_batch_size=8, seed=3,
                                 cache_dir=env["cache"], process_index=1, process_count=2)
    np.testing.assert_array_equal(same.local_batch(5)["targets"], g["targets"][4:])
    st = json.loads(json.dumps(b.state(5)))
    assert same.check_state(st) == 5 and set(st["task_epochs"]) == {"test_ct_code", "test_ct_textbook"}
    with pytest.raises(ValueError, match="seed"):
        pipeline.make_batches("task", task_name=mixture, seq_len=SEQ, global_batch_size=8, seed=4,
                              cache_dir=env["cache"]).check_state(st)
    with pytest.raises(ValueError, match="not a registered seqio Mixture"):
        pipeline.make_batches("mixture", task_name="test_ct_code", seq_len=SEQ, global_batch_size=8,
                              cache_dir=env["cache"])


def test_gin_registers_and_feeds_data_source(env):
    """gin/data/codetextbook.gin, as an experiment uses it: the gin call registers the
    user's data and hands the mixture to the trainer's data_source."""
    from phijax import gin_bindings
    from phijax.util import gin_config

    try:
        gin_config.parse(["gin/data/codetextbook.gin"], [
            f"CODE_SOURCES = ['{env['code']}']", f"TEXTBOOK_SOURCES = ['{env['book']}']",
            f"TOKENIZER = '{env['tok_path']}'", "phijax.tasks.register_codetextbook.name = 'test_ct_gin'",
            f"phijax.tasks.register_codetextbook.cache_dir = '{env['cache']}'",
            f"data_source.cache_dir = '{env['cache']}'", "data_source.kind = %DATA_SOURCE"])
        data = gin_bindings.data_source().make(seq_len=SEQ, global_batch_size=4, seed=0, model_vocab_size=51200)
    finally:
        gin.clear_config()
    assert isinstance(data, MixtureBatches) and data.names == ["test_ct_gin_code", "test_ct_gin_textbook"]
    assert data.local_batch(0)["inputs"].shape == (4, SEQ)


# --- MixtureBatches / resume, on synthetic windows (no tf) --------------------------------------
def ident(n, seq_len, base):
    """Rows whose first token names (component, row): base + r."""
    w = np.zeros((n, seq_len + 1), np.int64)
    w[:, 0] = base + np.arange(n)
    return w


def drawn(batch):
    return batch["inputs"][:, 0].tolist()


def test_mixture_every_window_once_per_task_epoch():
    sizes, rates, B, K = (7, 13), (1.0, 3.0), 4, 16
    comps = [(f"t{i}", ident(n, 3, 1000 * (i + 1)), {"key": f"k{i}"}) for i, n in enumerate(sizes)]
    mb = MixtureBatches(comps, list(rates), B, seed=5, block_size=K)
    assert mb.quotas.tolist() == [4, 12]
    order = [x for s in range(60) for x in drawn(mb.global_batch(s))]  # 240 samples: >= 3 epochs of each
    for i, n in enumerate(sizes):
        seq = [x - 1000 * (i + 1) for x in order if 1000 * (i + 1) <= x < 1000 * (i + 2)]
        assert len(seq) == 240 * rates[i] / sum(rates)  # exact: whole blocks
        epochs = [seq[e * n:(e + 1) * n] for e in range(len(seq) // n)]
        assert len(epochs) >= 3
        for e, chunk in enumerate(epochs):
            assert sorted(chunk) == list(range(n)), (i, e, chunk)  # no gap, no duplicate
        assert len({tuple(c) for c in epochs}) > 1  # reshuffled per epoch
    # Every block holds exactly the quotas, in a seeded order that differs between blocks.
    blocks = [order[k:k + K] for k in range(0, 240, K)]
    assert all(sum(x >= 2000 for x in blk) == 12 for blk in blocks)
    assert len({tuple(x >= 2000 for x in blk) for blk in blocks}) > 1


def test_mixture_determinism_slices_and_errors():
    comps = [("a", ident(5, 3, 100), {}), ("b", ident(9, 3, 200), {})]
    ref = MixtureBatches(comps, [2.0, 1.0], 6, seed=1, block_size=10)
    fresh = MixtureBatches(comps, [2.0, 1.0], 6, seed=1, block_size=10)
    for s in (9, 0, 4):
        assert drawn(fresh.global_batch(s)) == drawn(ref.global_batch(s))
        parts = [MixtureBatches(comps, [2.0, 1.0], 6, 1, p, 3, block_size=10).local_batch(s) for p in range(3)]
        assert sum((drawn(p) for p in parts), []) == drawn(ref.global_batch(s))
    assert drawn(MixtureBatches(comps, [2.0, 1.0], 6, seed=2, block_size=10).global_batch(0)) != drawn(
        ref.global_batch(0))
    with pytest.raises(ValueError, match="rates must be > 0"):
        MixtureBatches(comps, [1.0, 0.0], 6, 0)
    with pytest.raises(ValueError, match="window lengths"):
        MixtureBatches([("a", ident(5, 3, 0), {}), ("b", ident(5, 4, 0), {})], [1, 1], 6, 0)
    with pytest.raises(ValueError, match="one rate per component"):
        MixtureBatches(comps, [1.0], 6, 0)
    # A tiny rate still gets a slot in each block (never silently dropped).
    assert MixtureBatches(comps, [1e-9, 1.0], 6, 0, block_size=10).quotas.tolist() == [1, 9]
    st = ref.state(3)
    with pytest.raises(ValueError, match="quotas"):
        MixtureBatches(comps, [1.0, 1.0], 6, seed=1, block_size=10).check_state(st)


class Recording:
    """A windows array that records which rows are read."""

    def __init__(self, a):
        self.a, self.shape, self.ndim, self.dtype, self.read = a, a.shape, a.ndim, a.dtype, []

    def __getitem__(self, idx):
        self.read.extend(np.atleast_1d(np.arange(self.shape[0])[idx]).tolist())
        return self.a[idx]


def test_resume_reads_only_the_next_batch():
    w = ident(50, 3, 0)
    uninterrupted = WindowBatches(w, 4, seed=9)
    seen = [drawn(uninterrupted.global_batch(s)) for s in range(40)]  # 3+ epochs
    rec = Recording(w)
    resumed = WindowBatches(rec, 4, seed=9)
    resumed.check_state(json.loads(json.dumps(uninterrupted.state(37))))
    assert drawn(resumed.global_batch(37)) == seen[37]
    assert sorted(rec.read) == sorted(seen[37])  # no replay of the 37 consumed batches
    comps = [("a", ident(11, 3, 100), {}), ("b", ident(6, 3, 200), {})]
    mix = MixtureBatches(comps, [1.0, 1.0], 4, seed=2, block_size=8)
    want = drawn(mix.global_batch(23))
    recs = [Recording(c[1]) for c in comps]
    resumed = MixtureBatches([(n, r, m) for (n, _, m), r in zip(comps, recs)], [1.0, 1.0], 4, seed=2, block_size=8)
    assert drawn(resumed.global_batch(23)) == want
    assert sum(len(r.read) for r in recs) == 4
