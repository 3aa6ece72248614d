"""What has been asked and what came back, so that a run killed at any moment resumes without
paying twice and without losing anything.

Two files in the output directory:

- ``responses.jsonl``: every well-formed answer (HTTP 200 with a completion: ok, cut off at max
  tokens, or content filtered), one JSON object per line. Each line is written with one
  ``write`` of the whole line (O_APPEND) and fsync'd before the ledger is told, so a kill leaves
  at most one torn last line, which the next open truncates (``ResultLog.open``). This file is
  the authority on what is done. (Older runs also stored ``malformed`` lines; they are not
  answers, and ``iter_answers`` skips them.)
- ``ledger.sqlite``: per request key its state (in_flight / done / failed / batched), attempts,
  last error and its short reason, usage and cost; charges for served but unusable (malformed)
  answers; and the Batch API jobs. On open, ``reconcile`` marks every answered key done (a kill
  between the two writes), and puts in-flight requests back to pending, so the ledger and the
  output agree again.

The cost column plus the charges sum to what was spent, so the budget cap holds across restarts.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

RESPONSES_FILE = "responses.jsonl"
LEDGER_FILE = "ledger.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
  key TEXT PRIMARY KEY, sample_index INTEGER, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  status TEXT, status_code INTEGER, error TEXT, retryable INTEGER, prompt_tokens INTEGER,
  completion_tokens INTEGER, cost REAL NOT NULL DEFAULT 0, via TEXT, batch_tag TEXT, updated REAL, reason TEXT);
CREATE INDEX IF NOT EXISTS requests_state ON requests(state);
CREATE TABLE IF NOT EXISTS batches (
  tag TEXT PRIMARY KEY, batch_id TEXT, input_file_id TEXT, state TEXT NOT NULL, n INTEGER,
  round INTEGER, reserved REAL NOT NULL DEFAULT 0, created REAL, updated REAL);
CREATE TABLE IF NOT EXISTS charges (key TEXT NOT NULL, cost REAL NOT NULL, reason TEXT, time REAL);
"""
# Answers that reject every request alike: a configuration error, never a sample's failure.
CONFIG_STATUS = (401, 403, 404)


class LedgerError(RuntimeError):
    """The output directory's files are inconsistent in a way resume cannot repair."""


class ResultLog:
    """Append-only JSONL with whole-line atomic appends and torn-tail repair."""

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self._fd: int | None = None

    def open(self) -> int:
        """Opens for appending; returns how many bytes of torn tail were cut off."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut = repair_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return cut

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # a regular-file write is whole in practice; loop for the rare short write
            n = os.write(self._fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def repair_tail(path: Path) -> int:
    """Truncates a torn (unterminated or unparsable) last line; returns the bytes removed.
    A bad line anywhere else is corruption this code never produces, so it raises."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        back = min(size, 1 << 20)
        f.seek(size - back)
        tail = f.read(back)
        if tail.endswith(b"\n"):  # complete last line: is it valid JSON?
            start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
            if start == 0 and back < size:
                raise LedgerError(f"{path}: the last line is over 1 MiB; inspect it by hand")
            try:
                json.loads(tail[start:])
                return 0
            except ValueError:
                keep = size - back + start
        else:  # unterminated: cut after the last newline
            nl = tail.rfind(b"\n")
            if nl < 0 and back < size:
                raise LedgerError(f"{path}: the last line is over 1 MiB and torn; inspect it by hand")
            keep = size - back + nl + 1
        f.truncate(keep)
        os.fsync(f.fileno())
    log.warning("%s: cut a torn last line (%d bytes) left by an interrupted run", path, size - keep)
    return size - keep


def is_answer(record: dict[str, Any]) -> bool:
    """A well-formed answer (what makes a request done); malformed ones were stored by older runs."""
    return record.get("status") != "malformed"


def answers_and_failures(out_dir: str | os.PathLike, keys: Iterable[str]) -> tuple[dict[str, dict], dict[str, Any]]:
    """For the requests ``keys`` of one round: ({key: its answer} from responses.jsonl, {key: the
    ledger row} of those that failed for good, i.e. a 4xx the engine does not resend)."""
    wanted = set(keys)
    answers = {r["key"]: r for r in iter_answers(Path(out_dir) / RESPONSES_FILE) if r["key"] in wanted}
    led = Ledger(Path(out_dir) / LEDGER_FILE)
    try:
        failed = {k: led.get(k) for k in led.permanent_failures() & wanted}
    finally:
        led.close()
    return answers, failed


def why_missing(out_dir: str | os.PathLike, keys: Iterable[str]) -> collections.Counter:
    """``Ledger.why_missing`` of the ledger in ``out_dir`` (opened and closed here)."""
    led = Ledger(Path(out_dir) / LEDGER_FILE)
    try:
        return led.why_missing(keys)
    finally:
        led.close()


def iter_answers(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The well-formed answers of a responses.jsonl."""
    return (r for r in iter_results(path) if is_answer(r))


def iter_results(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records of a responses.jsonl (a torn last line is skipped, not repaired)."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return  # torn tail of a run in progress or killed
            try:
                yield json.loads(raw)
            except ValueError as e:
                raise LedgerError(f"{path}:{line_no}: not JSON ({e}); the file was edited or damaged") from None


class Ledger:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit; explicit txns
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a process kill
        self.db.executescript(_SCHEMA)
        if "reason" not in {row[1] for row in self.db.execute("PRAGMA table_info(requests)")}:
            self.db.execute("ALTER TABLE requests ADD COLUMN reason TEXT")  # a ledger of an older run

    def close(self) -> None:
        self.db.close()

    # --- resume ---------------------------------------------------------------------
    def reconcile(self, results: Iterable[dict[str, Any]]) -> dict[str, int]:
        """Marks every result's key done (with its usage and cost) and returns interrupted
        in-flight requests to pending. Returns counts of what was repaired."""
        fixed = 0
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            for r in results:
                u = r.get("usage") or {}
                cur = self.db.execute(
                    "INSERT INTO requests(key, sample_index, state, attempts, status, prompt_tokens,"
                    " completion_tokens, cost, via, updated) VALUES (?,?,'done',?,?,?,?,?,?,?)"
                    " ON CONFLICT(key) DO UPDATE SET state='done', status=excluded.status,"
                    " prompt_tokens=excluded.prompt_tokens, completion_tokens=excluded.completion_tokens,"
                    " cost=excluded.cost, via=excluded.via, error=NULL, updated=excluded.updated"
                    " WHERE requests.state != 'done'",
                    (r["key"], r.get("sample_index"), r.get("attempts", 1), r.get("status"),
                     u.get("prompt_tokens"), u.get("completion_tokens"), float(r.get("cost_usd") or 0.0),
                     r.get("via"), now))
                fixed += cur.rowcount
            reset = self.db.execute("DELETE FROM requests WHERE state='in_flight'").rowcount
        return {"marked_done": fixed, "in_flight_reset": reset}

    # --- per request ----------------------------------------------------------------
    def start_attempt(self, key: str, sample_index: int) -> None:
        self.db.execute(
            "INSERT INTO requests(key, sample_index, state, attempts, updated) VALUES (?,?,'in_flight',1,?)"
            " ON CONFLICT(key) DO UPDATE SET state='in_flight', attempts=attempts+1, updated=excluded.updated",
            (key, sample_index, time.time()))

    def note_error(self, key: str, status_code: int | None, error: str) -> None:
        self.db.execute("UPDATE requests SET status_code=?, error=?, updated=? WHERE key=?",
                        (status_code, error, time.time(), key))

    def mark_done(self, key: str, sample_index: int, status: str, prompt_tokens: int | None,
                  completion_tokens: int | None, cost: float, via: str) -> None:
        self.db.execute(
            "INSERT INTO requests(key, sample_index, state, attempts, status, prompt_tokens, completion_tokens,"
            " cost, via, updated) VALUES (?,?,'done',1,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET"
            " state='done', status=excluded.status, prompt_tokens=excluded.prompt_tokens,"
            " completion_tokens=excluded.completion_tokens, cost=excluded.cost, via=excluded.via,"
            " status_code=NULL, error=NULL, updated=excluded.updated",
            (key, sample_index, status, prompt_tokens, completion_tokens, cost, via, time.time()))

    def mark_failed(self, key: str, sample_index: int, status_code: int | None, error: str,
                    retryable: bool, reason: str | None = None) -> None:
        """A request given up on. Retryable failures (429/5xx/network/malformed, exhausted
        attempts) are tried again by the next run; the others (4xx) only with ``retry_failed``.
        ``reason``: the short class ('5xx', 'connection', 'malformed', ...)."""
        self.db.execute(
            "INSERT INTO requests(key, sample_index, state, status_code, error, retryable, reason, updated)"
            " VALUES (?,?,'failed',?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET state='failed',"
            " status_code=excluded.status_code, error=excluded.error, retryable=excluded.retryable,"
            " reason=excluded.reason, updated=excluded.updated",
            (key, sample_index, status_code, error, int(retryable), reason, time.time()))

    def charge(self, key: str, cost: float, reason: str) -> None:
        """Spend that produced no answer (a malformed one, charged at its worst case)."""
        self.db.execute("INSERT INTO charges(key, cost, reason, time) VALUES (?,?,?,?)",
                        (key, cost, reason, time.time()))

    def release(self, key: str) -> None:
        """Back to pending (e.g. not sent because the budget ran out)."""
        self.db.execute("DELETE FROM requests WHERE key=? AND state != 'done'", (key,))

    def permanent_failures(self) -> set[str]:
        """Not resent without ``retry_failed``; an auth / permission / model error recorded by an
        older run is a configuration error, not the sample's, so it is not among them."""
        return {k for (k,) in self.db.execute(
            "SELECT key FROM requests WHERE state='failed' AND retryable=0 AND COALESCE(status_code, 0)"
            f" NOT IN {CONFIG_STATUS}")}

    def spent(self) -> float:
        return float(self.db.execute("SELECT COALESCE(SUM(cost), 0) FROM requests").fetchone()[0]
                     + self.db.execute("SELECT COALESCE(SUM(cost), 0) FROM charges").fetchone()[0])

    def why_missing(self, keys: Iterable[str]) -> collections.Counter:
        """Why each of ``keys`` (requests without an answer) has none, as counts of short reasons
        (one query for all of them)."""
        wanted = collections.Counter(keys)
        rows = {r[0]: r[1:] for r in self.db.execute(
            "SELECT key, state, status_code, reason, retryable FROM requests"
            " WHERE key IN (SELECT value FROM json_each(?))", (json.dumps(list(wanted)),))}
        why: collections.Counter = collections.Counter()
        for key, n in wanted.items():
            state, code, reason, retryable = rows.get(key, (None, None, None, None))
            if state == "failed":
                what = ("malformed answers" if reason == "malformed" or code == 200 else f"HTTP {code}" if code
                        else reason or "errors")
                if retryable:
                    why[f"{what} (retries used up; the next run asks again)"] += n
                else:
                    why[f"{what} (not resent: data_gen.EngineConfig.retry_failed = True resends)"] += n
            elif state == "batched":
                why["in a batch not collected yet"] += n
            elif state == "done":  # an older run stored a malformed answer as done
                why["malformed answers (the next run asks again)"] += n
            else:
                why["not sent yet (budget cap, or the run was stopped)"] += n
        return why

    def state_counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall())

    def failures(self, limit: int = 20) -> list[tuple]:
        return self.db.execute("SELECT key, sample_index, status_code, retryable, error FROM requests"
                               " WHERE state='failed' ORDER BY sample_index LIMIT ?", (limit,)).fetchall()

    def get(self, key: str) -> dict[str, Any] | None:
        cur = self.db.execute("SELECT * FROM requests WHERE key=?", (key,))
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row))

    # --- batches --------------------------------------------------------------------
    def batch_begin(self, tag: str, keys: list[tuple[str, int]], round_: int, reserved: float) -> None:
        """Records the batch and its requests before anything is uploaded."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO batches(tag, state, n, round, reserved, created, updated)"
                            " VALUES (?,'preparing',?,?,?,?,?)", (tag, len(keys), round_, reserved, now, now))
            self.db.executemany(
                "INSERT INTO requests(key, sample_index, state, attempts, batch_tag, updated) VALUES (?,?,'batched',1,?,?)"
                " ON CONFLICT(key) DO UPDATE SET state='batched', attempts=attempts+1,"
                " batch_tag=excluded.batch_tag, updated=excluded.updated",
                [(k, i, tag, now) for k, i in keys])

    def batch_update(self, tag: str, **fields: Any) -> None:
        cols = ", ".join(f"{c}=?" for c in fields)
        self.db.execute(f"UPDATE batches SET {cols}, updated=? WHERE tag=?", (*fields.values(), time.time(), tag))

    def open_batches(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM batches WHERE state NOT IN ('reconciled', 'abandoned') ORDER BY created")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def batch_keys(self, tag: str) -> list[tuple[str, int]]:
        return self.db.execute("SELECT key, sample_index FROM requests WHERE batch_tag=? AND state='batched'",
                               (tag,)).fetchall()

    def batched_keys(self) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT key FROM requests WHERE state='batched'")}
