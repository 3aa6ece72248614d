"""Atomic on-disk caches of numpy arrays: written to a temp dir, then renamed into place.

A reader therefore sees either no cache or a complete one; a build killed at any moment leaves
only a temp dir that is removed. Two processes racing on the same (deterministic) build are fine:
the loser sees the winner's complete directory and drops its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

META_FILE = "meta.json"


def keyed_dir(root, kind: str, name: str, key_fields: dict) -> Path:
    """`root/kind/name-<hash of key_fields>`: a new directory whenever anything the cache depends on changes."""
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / kind / f"{name}-{key}"


def write_atomic(final: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write `<name>.npy` for each array plus meta.json as directory `final`, atomically."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; caches may be shared
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_FILE).exists():
                raise
            # Another process finished the same build first.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
