"""phijax.data.corpus + phijax.data.vocab: corpus order/skips/fingerprint, BPE
round trips on awkward text, special-token policy, tokenizer cache, CLI."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from phijax.data import corpus as corpus_lib
from phijax.data import testing
from phijax.data import vocab as vocab_lib

REPO_ROOT = Path(__file__).resolve().parents[1]

NASTY = [
    "",
    "\t",
    "\t\t\tx\t\ty\t",
    " ",
    " " * 100,
    "x" + " " * 37 + "y   ",
    "a\r\nb\r\n\r\n",
    "\r",
    "\n\n\n",
    "héllo wörld — ✓ 𝔘𝔫𝔦 🐍 中文 עברית",
    "\x00\x01\x7f\u200b\ufeff",
    "<|endoftext|>",
    "x<|endoftext|>y<|pad|>z",
    "<|endoftext|><|endoftext|>",
    "def f(x):\n    return x  # comment\n",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = testing.make_tiny_corpus(tmp_path_factory.mktemp("corpus"))
    cache = tmp_path_factory.mktemp("cache")
    path = vocab_lib.corpus_tokenizer_path(root, 512, cache_dir=cache)
    return root, vocab_lib.BPETokenizer(path)


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIJAX_CACHE_DIR", str(tmp_path / "env_cache"))


# --- corpus ------------------------------------------------------------------------
def test_corpus_order_skips_and_exclusions(tiny):
    root, _ = tiny
    skips = corpus_lib.SkipReport()
    docs = list(corpus_lib.iter_documents(root, skips))
    rels = [r for r, _ in docs]
    assert rels == sorted(rels)
    assert not any("site-packages" in r for r in rels)
    assert all(r.endswith(".py") for r in rels)
    assert [r for r, _ in skips.skipped] == ["nasty/latin1.py"]
    assert "UnicodeDecodeError" in skips.skipped[0][1]
    expected = {f"lib/{r}" for r in testing.STDLIB_SAMPLES} | set(testing.NASTY_TEXTS)
    assert set(rels) == expected
    # Text is exactly the file bytes (CRLF kept).
    assert dict(docs)["nasty/crlf.py"] == testing.NASTY_TEXTS["nasty/crlf.py"]


def test_corpus_fingerprint_tracks_content(tmp_path):
    root = testing.make_tiny_corpus(tmp_path / "c")
    fp = corpus_lib.corpus_fingerprint(root)
    assert fp == corpus_lib.corpus_fingerprint(root)
    (root / "nasty" / "new.py").write_text("y = 2\n")
    fp2 = corpus_lib.corpus_fingerprint(root)
    assert fp2 != fp
    (root / "nasty" / "new.py").write_text("y = 22\n")  # same path, new size
    assert corpus_lib.corpus_fingerprint(root) != fp2


def test_stdlib_corpus_shape():
    root = corpus_lib.stdlib_root()
    files = corpus_lib.stdlib_files()
    assert len(files) > 500
    rels = [f.relative_to(root).as_posix() for f in files]
    assert rels == sorted(rels)
    assert not any(part in ("site-packages", "dist-packages") for r in rels for part in r.split("/"))
    first_rel, first_text = next(corpus_lib.iter_stdlib_documents())
    assert first_rel == rels[0]  # sorted order; the first file is plain UTF-8
    assert first_text == (root / rels[0]).read_bytes().decode("utf-8")
    assert len(corpus_lib.stdlib_fingerprint()) == 16


def test_resolve_corpus(tmp_path):
    assert corpus_lib.resolve_corpus("stdlib") == corpus_lib.stdlib_root()
    assert corpus_lib.resolve_corpus(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(ValueError, match="stdlib"):
        corpus_lib.resolve_corpus(str(tmp_path / "missing"))


# --- BPE ---------------------------------------------------------------------------
@pytest.mark.parametrize("text", NASTY)
def test_round_trip_nasty(tiny, text):
    _, tok = tiny
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert (ids == []) == (text == "")


def test_round_trip_every_corpus_doc(tiny):
    root, tok = tiny
    texts = [t for _, t in corpus_lib.iter_documents(root)]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    for t, ids in zip(texts, batch):
        assert tok.decode(ids) == t


def test_special_ids_and_sizes(tiny):
    _, tok = tiny
    assert tok.pad_id == 0 and tok.eos_id == 1
    assert 258 < tok.vocab_size <= 512
    assert tok.padded_vocab_size == vocab_lib.padded_vocab_size(tok.vocab_size)
    assert tok.padded_vocab_size % 128 == 0 and tok.padded_vocab_size >= tok.vocab_size


def test_special_token_text_is_not_special(tiny):
    """Policy: '<|endoftext|>' inside text is plain bytes (never the EOS id), so
    data cannot forge document boundaries and encode->decode stays exact. The
    EOS id itself decodes to the literal text, or to nothing when skipped."""
    _, tok = tiny
    for text in ["<|endoftext|>", "a<|endoftext|>b", "<|pad|>"]:
        ids = tok.encode(text)
        assert tok.eos_id not in ids and tok.pad_id not in ids
        assert len(ids) > 1
        assert tok.decode(ids) == text
    ids = tok.encode("ab") + [tok.eos_id] + tok.encode("cd")
    assert tok.decode(ids) == "ab<|endoftext|>cd"
    assert tok.decode(ids, skip_special_tokens=True) == "abcd"


def test_indentation_is_compressed(tiny):
    _, tok = tiny
    # Learned whitespace merges: 8 spaces of indentation cost far fewer than 8 ids.
    assert len(tok.encode(" " * 8 + "return")) < 8


@pytest.mark.parametrize("n,m,want", [(1, 128, 128), (128, 128, 128), (129, 128, 256),
                                      (50257, 128, 50304), (10, 1, 10), (7, 8, 8)])
def test_padded_vocab_size(n, m, want):
    assert vocab_lib.padded_vocab_size(n, m) == want


def test_padded_vocab_size_rejects_bad():
    with pytest.raises(ValueError):
        vocab_lib.padded_vocab_size(0)
    with pytest.raises(ValueError):
        vocab_lib.padded_vocab_size(10, 0)


def test_train_bpe_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        vocab_lib.train_bpe(["x"], 100, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_tokenizer_cache_reused_and_keyed(tmp_path, monkeypatch):
    root = testing.make_tiny_corpus(tmp_path / "c")
    calls = []
    real = vocab_lib.train_bpe

    def counting(texts, vocab_size, out_path, *a, **kw):
        calls.append((vocab_size, Path(out_path)))
        return real(texts, vocab_size, out_path, *a, **kw)

    monkeypatch.setattr(vocab_lib, "train_bpe", counting)
    p1 = vocab_lib.corpus_tokenizer_path(root, 300)  # default cache = $PHIJAX_CACHE_DIR
    assert p1.is_relative_to(tmp_path / "env_cache")
    mtime = p1.stat().st_mtime_ns
    assert vocab_lib.corpus_tokenizer_path(root, 300) == p1
    assert len(calls) == 1 and p1.stat().st_mtime_ns == mtime
    p2 = vocab_lib.corpus_tokenizer_path(root, 320)
    assert p2 != p1 and len(calls) == 2
    (root / "nasty" / "more.py").write_text("z = 3\n")
    p3 = vocab_lib.corpus_tokenizer_path(root, 300)
    assert p3 != p1 and len(calls) == 3
    # Atomic writes leave no temp files behind.
    assert sorted(x.name for x in p1.parent.iterdir()) == sorted({p1.name, p2.name, p3.name})
    json.loads(p1.read_text())
    assert p1.stat().st_mode & 0o777 == 0o644  # shareable, not mkstemp's 0600


def test_stdlib_tokenizer_path_uses_stdlib(tmp_path, monkeypatch):
    seen = {}
    real = vocab_lib.train_bpe

    def first_docs_only(texts, vocab_size, out_path, *a, **kw):
        # Only the first 15 stdlib files: checks the wiring without a full train.
        texts = list(itertools.islice(texts, 15))
        seen["texts"] = texts
        return real(texts, vocab_size, out_path, *a, **kw)

    monkeypatch.setattr(vocab_lib, "train_bpe", first_docs_only)
    p = vocab_lib.stdlib_tokenizer_path(300, cache_dir=tmp_path)
    assert p.parent == tmp_path / "tokenizers"
    assert corpus_lib.stdlib_fingerprint() in p.name and p.name.endswith("-v300.json")
    want = [t for _, t in itertools.islice(corpus_lib.iter_stdlib_documents(), 15)]
    assert seen["texts"] == want
    assert vocab_lib.stdlib_tokenizer_path(300, cache_dir=tmp_path) == p


def test_missing_special_token_is_an_error(tmp_path):
    p = vocab_lib.train_bpe(["abc def"], 260, tmp_path / "t.json", special_tokens=("<eos>",))
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        vocab_lib.BPETokenizer(p)
    assert vocab_lib.BPETokenizer(p, eos_token="<eos>").eos_id == 1


def test_cli_train(tiny, tmp_path):
    root, _ = tiny
    out = tmp_path / "cli" / "tok.json"
    r = subprocess.run([sys.executable, "-m", "phijax.data.vocab", "train", "--corpus", str(root),
                        "--vocab_size", "300", "--out", str(out)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "nasty/latin1.py" in r.stdout  # skipped files are reported
    tok = vocab_lib.BPETokenizer(out)
    assert tok.vocab_size <= 300 and tok.decode(tok.encode("x\t=  1\r\n")) == "x\t=  1\r\n"
    bad = subprocess.run([sys.executable, "-m", "phijax.data.vocab", "train", "--corpus",
                          str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "stdlib" in bad.stderr
