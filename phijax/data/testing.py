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
