"""phijax.data.seqio_vocab + phijax.data.seqio_tasks: the seqio vocabulary agrees with
BPETokenizer eagerly and in-graph; tasks yield exact L-token windows of the
(doc tokens + EOS) stream."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import tensorflow as tf
import seqio

from phijax.data import corpus as corpus_lib  # noqa: E402
from phijax.data import seqio_tasks as tasks  # noqa: E402
from phijax.data import testing  # noqa: E402
from phijax.data import vocab as vocab_lib  # noqa: E402
from phijax.data.seqio_vocab import HFBPEVocabulary  # noqa: E402

TEXTS = ["", "def f(x):\n\treturn x  # é🐍\r\n", " " * 33 + "y", "a<|endoftext|>b", "中文\x00"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = testing.make_tiny_corpus(tmp_path_factory.mktemp("corpus"))
    cache = tmp_path_factory.mktemp("cache")
    tok_path = vocab_lib.corpus_tokenizer_path(root, 512, cache_dir=cache)
    names = []

    def register(name, corpus_root=root, **kw):
        names.append(name)
        return tasks.register_corpus_task(name, corpus_root, 512, cache_dir=cache, **kw)

    yield root, tok_path, vocab_lib.BPETokenizer(tok_path), register
    for n in names:
        seqio.TaskRegistry.remove(n)
        tasks.TASK_INFO.pop(n, None)


def stream_of(tok, texts):
    return [i for t in texts for i in tok.encode(t) + [tok.eos_id]]


def test_vocab_eager_graph_and_wrapper_agree(env):
    _, tok_path, tok, _ = env
    v = HFBPEVocabulary(tok_path)
    assert (v.eos_id, v.pad_id, v.unk_id) == (tok.eos_id, 0, None)
    assert v.vocab_size == tok.vocab_size == v._base_vocab_size
    want = [tok.encode(t) for t in TEXTS]
    assert [list(v.encode(t)) for t in TEXTS] == want
    assert [v.encode_tf(tf.constant(t)).numpy().tolist() for t in TEXTS] == want

    ds = tf.data.Dataset.from_tensor_slices(TEXTS).map(v.encode_tf, num_parallel_calls=2,
                                                       deterministic=True)
    assert ds.element_spec == tf.TensorSpec([None], tf.int32)
    assert [x.tolist() for x in ds.as_numpy_iterator()] == want

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def graph_encode(s):
        return v.encode_tf(s)

    assert [graph_encode(tf.constant(t)).numpy().tolist() for t in TEXTS] == want
    ragged = v.encode_tf(tf.constant(TEXTS))
    assert ragged.to_list() == want


def test_vocab_decode_eager_and_graph(env):
    _, tok_path, tok, _ = env
    v = HFBPEVocabulary(tok_path)
    for t in TEXTS:
        assert v.decode(v.encode(t)) == t
    # seqio semantics: decode stops at the first EOS, special ids are dropped.
    ids = tok.encode("ab") + [tok.eos_id] + tok.encode("cd")
    assert v.decode(ids) == "ab"
    a, b = tok.encode("x = 1"), tok.encode("y = 22")
    width = max(len(a), len(b)) + 3
    rows = [a + [tok.eos_id] + [5] * (width - len(a) - 1),  # ids after EOS are ignored
            b + [tok.pad_id] * (width - len(b))]  # padding is dropped
    out = v.decode_tf(tf.constant(rows)).numpy().tolist()
    assert [o.decode() for o in out] == ["x = 1", "y = 22"]
    assert v.decode_tf(tf.constant([rows, rows])).shape == (2, 2)

    @tf.function
    def round_trip(s):
        return v.decode_tf(v.encode_tf(s)[tf.newaxis])[0]

    for t in TEXTS:
        assert round_trip(tf.constant(t)).numpy().decode() == t


def test_vocab_is_lazy_and_comparable(env):
    _, tok_path, _, _ = env
    calls = []

    def factory():
        calls.append(1)
        return tok_path

    v = HFBPEVocabulary(factory)
    assert calls == []  # constructing (e.g. registering a task) loads nothing
    assert v.eos_id == 1 and calls == [1]
    _ = v.vocab_size
    assert calls == [1]
    assert v == HFBPEVocabulary(tok_path)
    with pytest.raises(ValueError):
        HFBPEVocabulary(tok_path, extra_ids=10)


@pytest.mark.parametrize("length", [3, 16, 97])
def test_task_windows_are_the_concatenated_stream(env, length):
    root, _, tok, register = env
    task = register(f"test_data_tiny_{length}")
    ds = task.get_dataset({"targets": length}, split="train", shuffle=False, num_epochs=1)
    assert ds.element_spec["targets"] == tf.TensorSpec([length], tf.int32)
    windows = [w for b in ds.batch(512).as_numpy_iterator() for w in b["targets"]]
    stream = stream_of(tok, [t for _, t in corpus_lib.iter_documents(root)])
    n = len(stream) // length  # only the final partial window is dropped
    assert len(windows) == n and all(w.shape == (length,) for w in windows)
    np.testing.assert_array_equal(np.concatenate(windows), stream[: n * length])
    assert sum(int(w[-1] == tok.eos_id) for w in windows) <= stream.count(tok.eos_id)


def test_task_is_deterministic(env):
    _, _, _, register = env
    task = register("test_data_tiny_det")
    def run():
        ds = task.get_dataset({"targets": 33}, shuffle=False).batch(512)
        return np.concatenate([b["targets"] for b in ds.as_numpy_iterator()])

    a = run()
    assert a.shape[1] == 33 and a.shape[0] > 100
    np.testing.assert_array_equal(a, run())


def test_stdlib_source_first_documents(env):
    """The real stdlib source (with the tiny tokenizer, to skip a full BPE
    train): the first windows are the first stdlib documents' tokens + EOS."""
    _, tok_path, tok, register = env
    task = register("test_data_stdlib_src", corpus_root=corpus_lib.stdlib_root(),
                    tokenizer_path=tok_path)
    length = 128
    first = list(itertools.islice(
        task.get_dataset({"targets": length}, shuffle=False).as_numpy_iterator(), 40))
    docs = []
    for _, text in corpus_lib.iter_stdlib_documents():
        docs.append(text)
        if len(stream_of(tok, docs)) > 40 * length:
            break
    assert len(docs) >= 2  # the check spans a document boundary
    np.testing.assert_array_equal(np.concatenate([x["targets"] for x in first]),
                                  stream_of(tok, docs)[: 40 * length])


def test_default_stdlib_task_registered_lazily():
    assert tasks.DEFAULT_TASK in seqio.TaskRegistry.names()
    task = seqio.get_mixture_or_task(tasks.DEFAULT_TASK)
    info = tasks.TASK_INFO[tasks.DEFAULT_TASK]
    assert info.corpus_root == corpus_lib.stdlib_root()
    assert info.vocab_size == vocab_lib.DEFAULT_VOCAB_SIZE
    feat = task.output_features["targets"]
    assert feat.add_eos is False and feat.dtype == tf.int32
    assert feat.vocabulary is info.vocabulary
    # Registering does not train/load the tokenizer (checked on a fresh
    # registration: other tests in the session may have used the default one).
    fresh = tasks.register_stdlib_task(name="test_data_lazy_default")
    try:
        assert tasks.TASK_INFO["test_data_lazy_default"].vocabulary._tok is None
        assert fresh.output_features["targets"].vocabulary._tok is None
    finally:
        seqio.TaskRegistry.remove("test_data_lazy_default")
        tasks.TASK_INFO.pop("test_data_lazy_default", None)
    assert tasks.stdlib_task_name(1024) == "phijax_stdlib_v1024"
    assert task.source.splits == ("train",) or list(task.source.splits) == ["train"]


def test_bad_split_and_length(env):
    _, _, _, register = env
    task = register("test_data_tiny_bad")
    with pytest.raises(ValueError):
        task.get_dataset({"targets": 8}, split="validation", shuffle=False)
    with pytest.raises(ValueError, match="sequence_length"):
        task.get_dataset({"targets": 0}, shuffle=False)
