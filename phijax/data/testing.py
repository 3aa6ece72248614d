"""Small fixtures for the data tests (no tf): a tiny corpus that still has the
awkward cases the real one has (CRLF, tabs, unicode, non-UTF-8, site-packages)."""

from __future__ import annotations

import shutil
from pathlib import Path

from phijax.data import corpus as corpus_lib

# Real, varied Python from the stdlib (~150 KB): enough text for a 512-token BPE.
STDLIB_SAMPLES = ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py",
                  "textwrap.py", "string.py", "bisect.py", "heapq.py", "shlex.py", "fnmatch.py")

NASTY_TEXTS = {
    "nasty/crlf.py": "def f():\r\n    return 1\r\n",
    "nasty/tabs.py": "if x:\n\tif y:\n\t\treturn  \t z\n",
    "nasty/unicode.py": "s = 'héllo wörld — ✓ 𝔘𝔫𝔦 🐍 中文'  # ünïcödé\n",
    "nasty/special.py": "EOT = '<|endoftext|>'\nPAD = '<|pad|>'\n",
    "nasty/empty.py": "",
    "nasty/spaces.py": "x = 1" + " " * 40 + "# far\n" + " " * 64 + "deep()\n",
}


def make_tiny_corpus(root: str | Path) -> Path:
    """Writes the tiny corpus under ``root`` and returns it."""
    root = Path(root)
    src = corpus_lib.stdlib_root()
    for rel in STDLIB_SAMPLES:
        dst = root / "lib" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst)
    for rel, text in NASTY_TEXTS.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("utf-8"))  # bytes: keep CRLF exactly
    (root / "nasty" / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (root / "site-packages" / "pkg").mkdir(parents=True, exist_ok=True)
    (root / "site-packages" / "pkg" / "mod.py").write_text("third_party = True\n")
    (root / "notes.txt").write_text("not python\n")
    return root


# --- a tokenizer.json shaped like phi-1's (codegen-350M-mono) ------------------------
CODEGEN_EOS_ID = 50256  # GPT-2's <|endoftext|>
CODEGEN_VOCAB_SIZE = 50295  # 50257 GPT-2 entries + 38 whitespace runs
# CodeGen's added tokens: runs of 31..2 spaces, then 9..2 tabs (ids 50257..50294).
CODEGEN_WHITESPACE_RUNS = tuple(" " * n for n in range(31, 1, -1)) + tuple("\t" * n for n in range(9, 1, -1))


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's 256 byte symbols in its id order (id 0 = '!'): printable bytes
    first, then the rest shifted to U+0100+ (``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_codegen_like_tokenizer(path: str | Path, texts, n_merges: int = 700) -> Path:
    """Writes a tokenizer.json with the *shape* of codegen-350M-mono's (there is
    no copy here and nothing may be downloaded): GPT-2 byte-level BPE with the
    256 byte symbols at GPT-2's ids 0..255, merges learned on ``texts``, unused
    filler entries up to id 50255, ``<|endoftext|>`` (special) at 50256, then
    CodeGen's 38 whitespace-run added tokens; 50295 entries, no pad token."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trained.train_from_iterator(list(texts), trainer)
    merges = json.loads(trained.to_str())["model"]["merges"]
    vocab = {s: i for i, s in enumerate(gpt2_byte_symbols())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    n_fill = CODEGEN_EOS_ID - len(vocab)
    vocab.update({f"<|unused{i}|>": len(vocab) for i in range(n_fill)})
    added = [{"id": CODEGEN_EOS_ID, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}]
    added += [{"id": CODEGEN_EOS_ID + 1 + i, "content": ws, "single_word": False, "lstrip": False,
               "rstrip": False, "normalized": True, "special": False}
              for i, ws in enumerate(CODEGEN_WHITESPACE_RUNS)]
    vocab.update({a["content"]: a["id"] for a in added})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
           "normalizer": None, "pre_tokenizer": byte_level,
           "post_processor": dict(byte_level, trim_offsets=False), "decoder": byte_level,
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                     "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                     "ignore_merges": False, "vocab": vocab, "merges": merges}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    Tokenizer.from_file(str(path))  # fail here, not in a test, if the file is malformed
    return path
