"""Writes that a crash cannot tear: a file or a directory is either the old one or the whole new one.

Every writer in phijax and data_gen that replaces a file in place goes through here: a temp file
(or directory) beside the target, fsync, then one rename.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def is_url(path) -> bool:
    """True for object-store URLs (gs://bucket/...): written through etils.epath, never open()/os."""
    return "://" in str(path)


class AtomicFile:
    """A file written (streamed, if need be) into a temp file beside ``path``, fsync'd and renamed
    into place by ``commit`` (mode 0644), removed by ``abort``. As a context manager: commit on
    success, abort on an exception. Readers see the old file or the whole new one, never a torn
    write (also under concurrent writers)."""

    def __init__(self, path: str | os.PathLike, mode: str = "w"):
        if mode not in ("w", "wb"):
            raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.f = os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {}))

    def write(self, data: str | bytes) -> None:
        self.f.write(data)

    def commit(self) -> None:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.chmod(self.tmp, 0o644)  # mkstemp makes 0600; outputs and caches may be shared
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.f.close()
        Path(self.tmp).unlink(missing_ok=True)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` as the file `path`, atomically (AtomicFile). A gs:// object is replaced whole by the store."""
    if is_url(path):
        from etils import epath
        epath.Path(path).write_bytes(data)
        return
    with AtomicFile(path, "wb") as f:
        f.write(data)


def move_into_place(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A finished file (written and closed elsewhere, on the same filesystem) to `dst`, replacing
    an old one in one rename."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_json(path: str | os.PathLike | None, obj, indent: int | None = 2) -> None:
    """`obj` as JSON at `path` (if given), atomically: a run stopped while writing keeps the
    previous file."""
    if path:
        atomic_write_bytes(path, json.dumps(obj, indent=indent).encode())


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish the finished directory `tmp` as `final`, replacing any previous one whole (the old
    one is moved aside first, then removed), so readers never see a mix of two runs' files."""
    tmp, final = Path(tmp), Path(final)
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, *, complete_marker: str | None = None) -> None:
    """Publish the finished directory `tmp` as `final`. With `complete_marker` (a file every
    complete `final` holds), a deterministic build that may race with an identical one: the first
    rename wins and a loser drops its copy. Without it, `final` is replaced whole (replace_dir)."""
    tmp, final = Path(tmp), Path(final)
    if complete_marker is None:
        replace_dir(tmp, final)
        return
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / complete_marker).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # an identical build finished first


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, *, complete_marker: str | None = None, fsync: bool = False):
    """Yields an empty temp directory beside `final` to fill; on a normal exit publishes it as
    `final` (publish_dir), on an exception removes it. A crash at any moment leaves either the old
    `final` or the whole new one (plus, at worst, a dot-prefixed temp directory)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes 0700; outputs and caches may be shared
        yield tmp
        if fsync:
            for f in tmp.rglob("*"):
                if f.is_file():
                    fd = os.open(f, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        publish_dir(tmp, final, complete_marker=complete_marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir() -> Path:
    """The cache root: $PHIJAX_CACHE_DIR, else ~/.cache/phijax."""
    return Path(os.environ.get("PHIJAX_CACHE_DIR") or Path.home() / ".cache" / "phijax")


def file_fingerprint(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
