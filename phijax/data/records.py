"""One place that decides whether a raw record is usable (no tensorflow).

Every reader of user data -- the exercises packer, the TFDS builders (code
corpus, synthetic textbook, CodeExercises) -- goes through ``check_text_fields``
and ``iter_jsonl``, and records what it skipped in a ``ReadReport``: a bad record
(not UTF-8, invalid JSON, not an object, a required field missing / not a string
/ empty / with lone surrogates, over the size limit) is counted by reason and
skipped; it never crashes a build and never passes silently.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

DEFAULT_MAX_RECORD_BYTES = 1 << 20  # one JSONL line / one document


@dataclasses.dataclass
class ReadReport:
    """What a reader kept and skipped (counts by reason + a sample)."""

    n_lines: int = 0
    n_ok: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    samples: list = dataclasses.field(default_factory=list)  # (where, reason, detail)
    max_samples: int = 20

    def skip(self, where, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.samples) < self.max_samples:
            self.samples.append((where, reason, detail))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        return {"n_lines": self.n_lines, "n_ok": self.n_ok, "n_skipped": self.n_skipped,
                "skipped": dict(sorted(self.skipped.items()))}


def check_text_fields(rec: Any, required: Sequence[str]) -> str | None:
    """The reason ``rec`` is unusable (a dict whose ``required`` fields are
    non-empty, encodable strings), or None."""
    if not isinstance(rec, dict):
        return "not_an_object"
    for key in required:
        v = rec.get(key)
        if v is None:
            return f"missing_{key}"
        if not isinstance(v, str):
            return f"non_string_{key}"
        if not v.strip():
            return f"empty_{key}"
    for key in required:
        try:  # a lone surrogate ("\ud800") parses from JSON but cannot be encoded
            rec[key].encode("utf-8")
        except UnicodeEncodeError:
            return "invalid_unicode"
    return None


def decode_utf8(raw: bytes, bom: bool = False) -> str:
    """Strict UTF-8 (raises UnicodeDecodeError), so text round-trips byte-exactly."""
    return raw.decode("utf-8-sig" if bom else "utf-8")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_jsonl(path: str | os.PathLike, report: ReadReport | None = None,
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
               required: Sequence[str] = (), where_prefix: str = "") -> Iterator[dict]:
    """Yields the valid records of a JSONL file (``.gz`` too) in file order, each
    with its 1-based line number as ``_line``. ``where_prefix`` tags skip samples
    (e.g. the shard name) when one report spans several files."""
    report = report if report is not None else ReadReport()
    path = Path(path)
    with _open(path) as f:
        for line_no, raw in enumerate(f, 1):
            report.n_lines += 1
            where = f"{where_prefix}{line_no}" if where_prefix else line_no
            if len(raw) > max_record_bytes:
                report.skip(where, "too_large", f"{len(raw)} bytes > {max_record_bytes}")
                continue
            try:
                text = decode_utf8(raw, bom=line_no == 1)  # tolerate a BOM
            except UnicodeDecodeError as e:
                report.skip(where, "non_utf8", str(e))
                continue
            if not text.strip():
                report.skip(where, "blank_line")
                continue
            try:
                rec = json.loads(text)
            except ValueError as e:  # JSONDecodeError, and lone surrogates etc.
                report.skip(where, "invalid_json", str(e)[:200])
                continue
            why = check_text_fields(rec, required)
            if why:
                report.skip(where, why, type(rec).__name__ if why == "not_an_object" else "")
                continue
            report.n_ok += 1
            rec["_line"] = line_no
            yield rec


def scalar_metadata(rec: dict, exclude: Iterable[str]) -> str:
    """The record's other JSON-able scalar (or list-of-scalar) fields as sorted
    JSON: per-example metadata kept next to the text without a fixed schema."""
    skip = set(exclude)
    out = {}
    for k, v in rec.items():
        if k in skip or k.startswith("_"):
            continue
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
    return json.dumps(out, sort_keys=True, ensure_ascii=False, default=str)
