"""phi-1's tokenizer shape (codegen-350M-mono: GPT-2 byte-level BPE + whitespace-run
tokens, <|endoftext|> = 50256, no pad token) through BPETokenizer and the seqio
vocabulary: ids identical to `tokenizers`, exact round trips, eager and in tf.data,
and padding that never relies on id 0."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tokenizers import Tokenizer

from phijax import config as config_lib
from phijax.data import corpus as corpus_lib
from phijax.data import packing, testing
from phijax.data import vocab as vocab_lib
from phijax.data.seqio_vocab import HFBPEVocabulary

REPO_ROOT = Path(__file__).resolve().parents[1]

NASTY = ["", "\t", "\t" * 23 + "x", " ", " " * 100, "x" + " " * 37 + "y   ", "    if x:\n        return  \t 1\n",
         "a\r\nb\r\n\r\n", "\r", "\n\n\n", "héllo wörld — ✓ 𝔘𝔫𝔦 🐍 中文 עברית", "\x00\x01\x7f\u200b\ufeff",
         "!", "!!!" + " " * 31 + "!", "<|endoftext|>", "x<|endoftext|>y", "<|endoftext|><|endoftext|>",
         "def f(x):\n    return x  # comment\n"]


@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    root = testing.make_tiny_corpus(tmp_path_factory.mktemp("corpus"))
    texts = [t for _, t in corpus_lib.iter_documents(root)]
    path = testing.make_codegen_like_tokenizer(tmp_path_factory.mktemp("cg") / "tokenizer.json", texts)
    return path, vocab_lib.BPETokenizer(path), texts


def test_shape_and_special_ids(codegen):
    path, tok, _ = codegen
    raw = json.loads(path.read_text())
    assert raw["pre_tokenizer"]["type"] == "ByteLevel" and raw["decoder"]["type"] == "ByteLevel"
    assert tok.vocab_size == testing.CODEGEN_VOCAB_SIZE == 50295
    assert tok.eos_id == 50256  # taken from the file, not assumed to be 1
    assert tok.has_pad_token is False and tok.pad_id == 0
    assert tok.decode([0]) == "!"  # id 0 stays GPT-2's "!": no offset
    assert tok.padded_vocab_size == 50304 <= config_lib.preset("phi1").vocab_size == 51200
    v = HFBPEVocabulary(path)
    assert (v.eos_id, v.pad_id, v.unk_id, v.vocab_size) == (50256, 0, None, 50295)
    # Whitespace runs are single added tokens, as in codegen.
    run8 = Tokenizer.from_file(str(path)).token_to_id(" " * 8)
    assert run8 is not None and tok.encode(" " * 8) == [run8]


@pytest.mark.parametrize("text", NASTY)
def test_round_trip_and_same_ids_as_tokenizers(codegen, text):
    path, tok, _ = codegen
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    ref = Tokenizer.from_file(str(path))
    if "<|endoftext|>" not in text:
        assert ids == ref.encode(text, add_special_tokens=False).ids
    # The one documented difference: a literal "<|endoftext|>" in text stays text.
    ref.encode_special_tokens = True
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert (tok.eos_id in ids) is False


def test_corpus_round_trip_and_batch(codegen):
    _, tok, texts = codegen
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert all(tok.decode(ids) == t for t, ids in zip(texts, batch))
    assert sum(map(len, batch)) < sum(map(len, texts)) / 2  # real merges, not bytes


def test_seqio_vocab_eager_and_graph(codegen):
    path, tok, _ = codegen
    v = HFBPEVocabulary(path)
    want = [tok.encode(t) for t in NASTY]
    assert [list(v.encode(t)) for t in NASTY] == want
    ds = tf.data.Dataset.from_tensor_slices(NASTY).map(v.encode_tf, num_parallel_calls=2, deterministic=True)
    assert [x.tolist() for x in ds.as_numpy_iterator()] == want
    assert v.encode_tf(tf.constant(NASTY)).to_list() == want

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def round_trip(s):
        return v.decode_tf(v.encode_tf(s)[tf.newaxis])[0]

    for t in NASTY:
        if "<|endoftext|>" not in t:  # seqio decode stops at EOS; literal text has none
            assert round_trip(tf.constant(t)).numpy().decode() == t
        assert v.decode(v.encode(t)) == t
    # id 0 is a real token here: seqio decoding keeps it; only EOS ends a sequence.
    assert v.decode([0, 0] + [tok.eos_id] + [5]) == "!!"


def test_every_decode_path_cuts_each_row_at_its_first_eos(codegen):
    # seqio's decode_tf replaces what follows EOS with pad_id 0, which in a pad-less GPT-2/codegen
    # file is the real token "!": the row must end at the EOS, not turn its tail into "!!".
    path, tok, _ = codegen
    v, eos = HFBPEVocabulary(path), tok.eos_id
    x, y = tok.encode("x = 1"), tok.encode("y = '!'")
    assert v.decode(x + [eos, 0, 0]) == "x = 1"
    width = len(y) + 4
    rows = [x + [eos] + [0] * (width - len(x) - 1),
            y + [eos, 5, eos, 0],       # after the first EOS, even another EOS is ignored
            x + [0] * (width - len(x))]  # no EOS: id 0 is text
    want = ["x = 1", "y = '!'", "x = 1" + "!" * (width - len(x))]
    assert [v.decode(r) for r in rows] == want
    assert [o.decode() for o in v.decode_tf(tf.constant(rows)).numpy().tolist()] == want
    assert [[o.decode() for o in r] for r in v.decode_tf(tf.constant([rows, rows])).numpy().tolist()] == [want] * 2

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def graph(ids):
        return v.decode_tf(ids)

    assert [o.decode() for o in graph(tf.constant(rows, tf.int32)).numpy().tolist()] == want


def test_packing_marks_padding_without_id_zero(codegen):
    _, tok, _ = codegen
    ex = [(tok.encode("def f():\n"), tok.encode("    return '!'\n")), (tok.encode("x = 1"), tok.encode(" + 2"))]
    arrays, info = packing.pack_examples(ex, tok.eos_id, packing.PackOptions(64), tok.pad_id)
    seg, w = arrays["segment_ids"], arrays["loss_weights"]
    assert info["n_rows"] == 1
    # Real "!" tokens (id 0) exist inside segments; padding is where segment_ids == 0.
    assert ((arrays["targets"] == 0) & (seg > 0)).any()
    assert (w[seg == 0] == 0).all() and w[seg > 0].sum() == info["n_loss_tokens"] > 0
    rows = packing.unpack_row(arrays, 0)
    assert tok.decode(np.concatenate([rows[0]["tokens"], rows[0]["targets"][-1:]]).tolist()) == \
        "def f():\n    return '!'\n<|endoftext|>"


def test_bad_tokenizer_files(tmp_path, codegen):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vocab_lib.BPETokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        vocab_lib.BPETokenizer(tmp_path / "bad.json")
    # A pad token that is not at id 0 would clash with seqio's padding.
    doc = json.loads(codegen[0].read_text())
    doc["added_tokens"].append({"id": 50295, "content": "<|pad|>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    doc["model"]["vocab"]["<|pad|>"] = 50295
    (tmp_path / "padded.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="id 50295"):
        vocab_lib.BPETokenizer(tmp_path / "padded.json")
    assert vocab_lib.BPETokenizer(tmp_path / "padded.json", pad_token=None).has_pad_token is False


def test_short_cli_alias(tmp_path):
    corpus = tmp_path / "c"
    (corpus / "pkg").mkdir(parents=True)
    (corpus / "pkg" / "a.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    out = tmp_path / "tok.json"
    r = subprocess.run([sys.executable, "-m", "phijax", "vocab", "train", "--corpus", str(corpus),
                        "--vocab_size", "300", "--out", str(out)], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    tok = vocab_lib.BPETokenizer(out)
    assert tok.has_pad_token and (tok.pad_id, tok.eos_id) == (0, 1) and tok.vocab_size <= 300
