"""The stage protocol every resumable data_gen stage follows, written once, and the JSONL writers
the stages share.

A stage turns inputs into an output directory that is either complete or visibly not::

    st = Stage(out_dir, fingerprint(files, key), REPORT_FILE, "dedup")
    if (stored := st.resume_or_start(force)) is not None:
        return stored                         # complete: the marker holds this fingerprint
    w = st.shard_writer("dedup", shard_size)  # else the marker is gone; shards go to .shards.tmp
    ...; w.commit()                           # ... and replace shards/ whole (replace_dir)
    st.finish(report)                         # the report, then the marker: last

A stage that rebuilds its whole directory writes it into ``st.begin_dir()`` (``.<name>.tmp``
beside it) and publishes it with ``st.publish_dir(tmp, report)`` (report and marker inside,
then one ``replace_dir``). Either way a run killed at any point leaves no output that looks
complete, and a rerun with the same fingerprint does nothing.

On disk (names and bytes as the stages have always written them): the marker ``_COMPLETE``
holds the fingerprint and a newline; the report is JSON (indent 2) and a newline; shards are
``shards/<name>-00000.jsonl`` (streamed) or ``shards/<name>-00000-of-00003.jsonl`` (when the
number of records is known up front, as the generators know it).

Files are written through ``phijax.util.files`` (``AtomicFile``, re-exported here, for writers that
stream line by line; ``move_into_place`` for ``LocalFiles.move``): no rename here. No jax, no Beam:
``Stage(fs=...)`` takes another storage (data_gen.beam_stages passes one for gs:// URLs).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from phijax.util.files import AtomicFile, atomic_write_bytes, move_into_place, replace_dir  # noqa: F401 (stage.AtomicFile)

log = logging.getLogger(__name__)

MARKER_FILE = "_COMPLETE"
SHARDS_DIR = "shards"


# --- the fingerprint ----------------------------------------------------------------------------
def fingerprint(files: Iterable, key: dict) -> str:
    """``key`` (the options, as JSON with sorted keys) + the name, size and mtime of each input
    file (anything with ``stat()`` and ``str()``): a cheap key for "same inputs, same settings"."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --- writers ---------------------------------------------------------------------------------------
def json_bytes(obj: Any) -> bytes:
    """A report as the stages write it: indent 2, one final newline."""
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def jsonl_bytes(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Records held in memory, one JSON line each, written atomically."""
    atomic_write_bytes(path, jsonl_bytes(records))


def fresh_tmp_dir(final: str | os.PathLike) -> Path:
    """``.<name>.tmp`` beside ``final``, empty (what a killed run left there is removed)."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def shard_name(name: str, index: int, total: int | None = None) -> str:
    """``<name>-00000.jsonl``, or ``<name>-00000-of-00003.jsonl`` with the number of shards."""
    return f"{name}-{index:05d}.jsonl" if total is None else f"{name}-{index:05d}-of-{total:05d}.jsonl"


class ShardWriter:
    """Streams records into JSONL shards of ``shard_size`` lines in ``.shards.tmp``; ``commit``
    replaces ``out_dir/shards`` with them as a whole and returns their names.

    ``n_records`` None: names ``<name>-NNNNN.jsonl``, as many shards as the records fill (none
    for none). ``n_records`` given (the records are counted up front): ``<name>-NNNNN-of-MMMMM.jsonl``,
    at least one shard (an empty one for no records), and exactly that many records."""

    def __init__(self, out_dir: str | os.PathLike, name: str, shard_size: int, n_records: int | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir, self.name, self.shard_size = Path(out_dir), name, shard_size
        self.n_records = n_records
        self.total = None if n_records is None else max(-(-n_records // shard_size), 1)
        self.tmp = fresh_tmp_dir(self.out_dir / SHARDS_DIR)
        self.n, self._f, self.files = 0, None, []

    def _open_next(self) -> None:
        self._close()
        p = self.tmp / shard_name(self.name, len(self.files), self.total)
        self.files.append(p.name)
        self._f = open(p, "w", encoding="utf-8")

    def write(self, rec: dict) -> None:
        if self.n % self.shard_size == 0:
            self._open_next()
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.n += 1

    def write_all(self, records: Iterable[dict]) -> None:
        for rec in records:
            self.write(rec)

    def _close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def commit(self) -> list[str]:
        if self.total is not None:
            if self.n != self.n_records:
                raise ValueError(f"{self.name}: {self.n} records written, {self.n_records} announced")
            while len(self.files) < self.total:  # no records: one empty shard
                self._open_next()
        self._close()
        replace_dir(self.tmp, self.out_dir / SHARDS_DIR)
        return self.files


def write_shards(out_dir: str | os.PathLike, name: str, records: Sequence[dict], shard_size: int) -> list[str]:
    """Replaces ``out_dir/shards`` with ``records`` in ceil(n / shard_size) (at least one)
    ``<name>-NNNNN-of-MMMMM.jsonl`` shards; returns their names."""
    w = ShardWriter(out_dir, name, shard_size, n_records=len(records))
    w.write_all(records)
    return w.commit()


# --- storage ---------------------------------------------------------------------------------------
class LocalFiles:
    """What a stage does to its output directory, on the local disk. Another storage (Beam's
    FileSystems for gs:// ...) offers the same methods."""

    @staticmethod
    def join(root: str | os.PathLike, *parts: str) -> str:
        return os.path.join(root, *parts)

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.exists(path)

    @staticmethod
    def read_text(path: str) -> str:
        return Path(path).read_text(encoding="utf-8")

    @staticmethod
    def write_bytes(path: str, data: bytes) -> None:
        atomic_write_bytes(path, data)

    @staticmethod
    def delete(path: str) -> None:
        Path(path).unlink(missing_ok=True)

    @staticmethod
    def makedirs(path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def move(src: str, dst: str) -> None:
        """A finished file into place, replacing an old one."""
        move_into_place(src, dst)

    @staticmethod
    def replace_dir(src: str, dst: str) -> None:
        """A finished directory into place as a whole (no files: an empty directory)."""
        Path(src).mkdir(parents=True, exist_ok=True)
        replace_dir(Path(src), Path(dst))

    @staticmethod
    def rmtree(path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)


# --- the protocol ----------------------------------------------------------------------------------
class Stage:
    """One stage's output directory ``out_dir``: complete iff its marker holds ``fp``.
    ``report_file``: the stage's report (JSON), written just before the marker; ``name`` is for
    the log. See the module docstring for the order of the calls."""

    def __init__(self, out_dir: str | os.PathLike, fp: str, report_file: str, name: str = "stage",
                 fs: Any = LocalFiles):
        self.out, self.fp, self.report_file, self.name, self.fs = str(out_dir), fp, report_file, name, fs

    def path(self, *parts: str) -> str:
        return self.fs.join(self.out, *parts)

    def is_complete(self) -> bool:
        m = self.path(MARKER_FILE)
        return self.fs.exists(m) and self.fs.read_text(m).strip() == self.fp

    def done(self, force: bool = False) -> dict | None:
        """The stored report with ``"resumed": True`` when the output is complete (and not
        ``force``), else None."""
        if force or not self.is_complete():
            return None
        log.info("%s: %s already complete (fingerprint %s), skipped", self.name, self.out, self.fp)
        return dict(json.loads(self.fs.read_text(self.path(self.report_file))), resumed=True)

    def start(self) -> None:
        """Invalidates a previous result before anything new is written."""
        self.fs.makedirs(self.out)
        self.fs.delete(self.path(MARKER_FILE))

    def resume_or_start(self, force: bool = False) -> dict | None:
        """``done()``'s stored report when the output is complete; else ``start()`` and None."""
        stored = self.done(force)
        if stored is None:
            self.start()
        return stored

    def shard_writer(self, name: str, shard_size: int, n_records: int | None = None) -> ShardWriter:
        return ShardWriter(self.out, name, shard_size, n_records)

    def save_report(self, report: dict) -> None:
        """The report alone: an unfinished run (no marker; a rerun finishes it)."""
        self.fs.write_bytes(self.path(self.report_file), json_bytes(report))

    def finish(self, report: dict) -> None:
        """The report, then the marker: the run is complete."""
        self.save_report(report)
        self.fs.write_bytes(self.path(MARKER_FILE), (self.fp + "\n").encode())

    # A stage that rebuilds its whole directory.
    def begin_dir(self) -> Path:
        """An empty ``.<name>.tmp`` beside ``out_dir`` to build the whole new output in."""
        return fresh_tmp_dir(self.out)

    def publish_dir(self, tmp: str | os.PathLike, report: dict) -> None:
        """The report and the marker into ``tmp``, then ``tmp`` replaces ``out_dir`` whole."""
        inner = Stage(tmp, self.fp, self.report_file, self.name, self.fs)
        inner.finish(report)
        replace_dir(Path(tmp), Path(self.out))
