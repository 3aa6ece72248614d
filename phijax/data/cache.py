"""Atomic on-disk caches of numpy arrays: written to a temp dir, then renamed into place.

A reader therefore sees either no cache or a complete one; a build killed at any moment leaves
only a temp dir that is removed. Two processes racing on the same (deterministic) build are fine:
the loser sees the winner's complete directory and drops its own.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from phijax.util import files

META_FILE = "meta.json"


def keyed_dir(root, kind: str, name: str, key_fields: dict) -> Path:
    """`root/kind/name-<hash of key_fields>`: a new directory whenever anything the cache depends on changes."""
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / kind / f"{name}-{key}"


def write_atomic(final: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write `<name>.npy` for each array plus meta.json as directory `final`, atomically."""
    with files.staged_dir(final, complete_marker=META_FILE) as tmp:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return Path(final)
