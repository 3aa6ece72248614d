"""The embedded default corpus: Python source files that ship with the interpreter.

Every host that can run phijax already has this corpus (no download, no licence
question), and it is real, idiomatic Python -- a stand-in for phi-1's code data.
Order is the sorted relative path, so every consumer (BPE training, the seqio
task, the window cache) sees the same documents in the same order on every host.

No tensorflow here: the trainer imports this on accelerator hosts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

# Third-party packages live under the stdlib dir in some layouts; they are not
# "the stdlib" and differ between hosts, so they would break determinism.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def python_files(root: str | os.PathLike) -> list[Path]:
    """All ``*.py`` files under ``root`` (recursive), sorted by relative path."""
    return source_files(root, (".py",))


def source_files(root: str | os.PathLike, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` (recursive) whose name ends with one of ``suffixes``,
    sorted by relative path; EXCLUDED_DIRS are skipped."""
    root = Path(root)
    suffixes = tuple(suffixes)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for f in filenames:
            if f.endswith(suffixes):
                out.append(Path(dirpath, f))
    # Sort on the POSIX relative path, not os.walk order (filesystem dependent).
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files() -> list[Path]:
    return python_files(stdlib_root())


@dataclasses.dataclass
class SkipReport:
    """Files left out of the corpus and why (e.g. latin-1 test fixtures)."""

    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.skipped)


def iter_documents(
    root: str | os.PathLike, skips: SkipReport | None = None, start: int = 0, stop: int | None = None
) -> Iterator[tuple[str, str]]:
    """Yields ``(relpath, text)`` for every ``*.py`` under ``root`` that is UTF-8
    (files ``[start, stop)`` of the sorted list: a contiguous shard).

    Files that are not valid UTF-8 (the stdlib's deliberate bad-encoding test
    fixtures) are skipped and recorded in ``skips``; strict decoding keeps the
    text exactly what is on disk, so tokenization can round-trip it.
    """
    root = Path(root)
    for path in python_files(root)[start:stop]:
        rel = path.relative_to(root).as_posix()
        try:
            # newline="" would matter for open(); read_bytes keeps CRLF as is.
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError) as e:
            if skips is not None:
                skips.skipped.append((rel, f"{type(e).__name__}: {e}"))
            continue
        yield rel, text


def iter_stdlib_documents(skips: SkipReport | None = None) -> Iterator[tuple[str, str]]:
    return iter_documents(stdlib_root(), skips)


def corpus_fingerprint(root: str | os.PathLike) -> str:
    """Cheap content key: relpaths + sizes + Python version (no file reads).

    The Python version is included because the stdlib corpus *is* the installed
    interpreter's files; sizes catch edits without hashing ~30 MB each time.
    """
    root = Path(root)
    h = hashlib.sha256()
    h.update(f"python={sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}\n".encode())
    for path in python_files(root):
        rel = path.relative_to(root).as_posix()
        h.update(f"{rel}\t{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def stdlib_fingerprint() -> str:
    return corpus_fingerprint(stdlib_root())


def resolve_corpus(corpus: str) -> Path:
    """``"stdlib"`` -> the stdlib dir; anything else is taken as a directory."""
    if corpus == "stdlib":
        return stdlib_root()
    p = Path(corpus)
    if not p.is_dir():
        raise ValueError(f"corpus must be 'stdlib' or an existing directory, got {corpus!r}")
    return p.resolve()
