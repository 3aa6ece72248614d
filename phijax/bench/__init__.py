"""Benchmarks: scripts that print figures (docs/benchmarks.md)."""
from __future__ import annotations

import json
from pathlib import Path

from phijax.data.vocab import atomic_write_bytes


def save_json(path: str | None, obj, indent: int = 2) -> None:
    """A benchmark's figures as JSON at `path` (if given), written atomically: a run stopped while
    writing keeps the previous file."""
    if path:
        atomic_write_bytes(Path(path), json.dumps(obj, indent=indent).encode())
