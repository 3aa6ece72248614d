"""One run per output directory: an exclusive ``flock`` on ``<out_dir>/.lock``.

Two runs on one output directory would each send every request (paying twice, and each ledger
connection would undercount the other's spend). The lock is held by an open file description,
so the kernel releases it when the holding process exits or dies (kill -9 included): a lock
left by a dead run never blocks the next one. The file holds the holder's pid, host and start
time, which a refused run prints. The lock is re-entrant within one process (a CLI holds it
around the engine run and the finalize step; the engine takes it again).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from data_gen.llm.errors import OutputDirError

LOCK_FILE = ".lock"
_held: dict[str, list] = {}  # realpath -> [fd, depth]: the locks this process holds


def check_not_a_file(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` unless it, or a directory above it, is a file (OutputDirError in one line); it
    need not exist."""
    path = Path(out_dir)
    if path.is_dir():
        return path
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        what = "it is a file" if blocker == path else f"{blocker} is a file"
        raise OutputDirError(f"output directory {path} cannot be used: {what}; choose another --out_dir")
    return path


def check_out_dir(out_dir: str | os.PathLike, create: bool = True) -> Path:
    """``out_dir`` as a usable directory (created if ``create``), else OutputDirError in one line."""
    path = check_not_a_file(out_dir)
    if path.is_dir():
        return path
    if not create:
        raise OutputDirError(f"output directory {path} does not exist (is --out_dir mistyped?)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create output directory {path}: {e.strerror or e}") from None
    return path


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a run that is starting up"


@contextlib.contextmanager
def hold(out_dir: str | os.PathLike, create: bool = True) -> Iterator[Path]:
    """Holds the output directory's lock for the block; OutputDirError (naming the holder) when
    another process holds it."""
    path = check_out_dir(out_dir, create)
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
    else:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputDirError(f"output directory {path} is in use by another run ({holder}); a second run"
                                 " would pay for every sample again: wait for it, or stop it and rerun") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode() + b"\n", 0)
        _held[key] = [fd, 1]
    try:
        yield path
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            os.close(_held.pop(key)[0])  # closing the last descriptor releases the flock
