"""phi-1 fine-tuning data ("CodeExercises"): prompt -> solution, packed.

Input: an exercises JSONL file, one record per line::

    {"prompt": "def f(x):\\n    \\"\\"\\"docstring\\"\\"\\"\\n", "solution": "    return x\\n", ...}

(any further keys are metadata and ignored). ``read_exercises`` never raises on
a bad record: it skips it and counts the reason (non-UTF-8, invalid JSON, not an
object, missing/empty/non-string prompt or solution, over the size limit).

Packing: each example is ``ids = prompt_ids + solution_ids + [eos]``;
inputs = ids[:-1], targets = ids[1:]. Loss weight 1 only on targets that are
solution tokens or the final EOS (``loss_on="solution"``; ``"all"`` weighs every
target). Examples are packed greedily, in file order, into rows of exactly L
positions: a row takes the next example while it fits, otherwise a new row
starts (next-fit; deterministic and order-preserving). Per row, segment ids
are 1, 2, ... (0 = padding), positions restart at 0 per example, padding has
token/target 0 (the pad id) and weight 0. An example with more than L
positions is truncated to its first L (``overlong="truncate"``, counted; if no
weighted target survives it is dropped) or dropped (``overlong="drop"``).

The packed arrays are cached once as .npy + meta.json (tmp dir, then rename),
keyed by input-file fingerprint + tokenizer fingerprint + L + options.

No tensorflow here (the trainer imports this on accelerator hosts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from phijax.data import cache, records
from phijax.data import vocab as vocab_lib
from phijax.util import files

log = logging.getLogger(__name__)

PACK_FORMAT_VERSION = 1
META_FILE = cache.META_FILE
FEATURES = ("tokens", "targets", "segment_ids", "positions", "loss_weights")
DEFAULT_MAX_RECORD_BYTES = records.DEFAULT_MAX_RECORD_BYTES  # one JSONL line
EXERCISE_FIELDS = ("prompt", "solution")
ReadReport = records.ReadReport
LOSS_ON = ("solution", "all")
OVERLONG = ("truncate", "drop")


# --- reading ------------------------------------------------------------------------
def iter_exercises(path: str | os.PathLike, report: ReadReport | None = None,
                   max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterable[dict]:
    """Yields the valid records of an exercises JSONL file in file order (each a
    dict with at least non-empty str 'prompt' and 'solution', plus '_line').
    Validation is ``phijax.data.records``' (shared with the TFDS builders);
    blank lines are counted as skipped ('blank_line')."""
    return records.iter_jsonl(path, report, max_record_bytes, required=EXERCISE_FIELDS)


def read_exercises(path: str | os.PathLike, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
                   ) -> tuple[list[dict], ReadReport]:
    """(valid records, report); logs a warning with the counts if any were skipped."""
    report = ReadReport()
    records = list(iter_exercises(path, report, max_record_bytes))
    if report.n_skipped:
        log.warning("%s: skipped %d of %d lines: %s (first: %s)", path, report.n_skipped,
                    report.n_lines, dict(report.skipped), report.samples[:3])
    return records, report


def write_exercises(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Writes records as exercises JSONL (UTF-8, one JSON object per line)."""
    path = Path(path)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    files.atomic_write_bytes(path, data)
    return path


# --- packing -----------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclasses.dataclass(frozen=True)
class PackOptions:
    seq_len: int
    loss_on: str = "solution"
    overlong: str = "truncate"

    def __post_init__(self):
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, (int, np.integer)) \
                or self.seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {self.seq_len!r}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG}, got {self.overlong!r}")


def example_arrays(prompt_ids: Sequence[int], solution_ids: Sequence[int], eos_id: int,
                   loss_on: str = "solution") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, loss_weights) of one unpacked example."""
    ids = np.asarray(list(prompt_ids) + list(solution_ids) + [eos_id], np.int64)
    w = np.ones(len(ids) - 1, np.float32)
    if loss_on == "solution":
        # target j is ids[j + 1]: weighted iff it is a solution token or the EOS.
        w[: max(len(prompt_ids) - 1, 0)] = 0.0
    return ids[:-1], ids[1:], w


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], eos_id: int,
                  options: PackOptions, pad_id: int = 0, dtype: np.dtype = np.dtype(np.int32)
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Packs (prompt_ids, solution_ids) pairs; returns (arrays [R, L], stats).

    stats['example_rows'/'example_segments'] say where each kept example went
    (row, segment id), in input order; dropped examples are -1.
    """
    L = int(options.seq_len)
    pieces = []  # (example index, inputs, targets, weights)
    stats = Counter()
    where_row = np.full(len(examples), -1, np.int64)
    where_seg = np.full(len(examples), -1, np.int64)
    for i, (p, s) in enumerate(examples):
        if len(s) == 0:
            stats["dropped_empty_solution"] += 1
            continue
        x, y, w = example_arrays(p, s, eos_id, options.loss_on)
        if len(x) > L:
            if options.overlong == "drop":
                stats["dropped_overlong"] += 1
                continue
            x, y, w = x[:L], y[:L], w[:L]
            if not w.any():
                stats["dropped_no_loss_after_truncation"] += 1
                continue
            stats["truncated"] += 1
        pieces.append((i, x, y, w))

    # Next-fit: positions of each piece in (row, offset).
    rows, offsets, segs = [], [], []
    row, used, seg = -1, L, 0
    for _, x, _, _ in pieces:
        if used + len(x) > L:
            row, used, seg = row + 1, 0, 0
        seg += 1
        rows.append(row)
        offsets.append(used)
        segs.append(seg)
        used += len(x)
    n_rows = row + 1
    out = {"tokens": np.full((n_rows, L), pad_id, dtype),
           "targets": np.full((n_rows, L), pad_id, dtype),
           "segment_ids": np.zeros((n_rows, L), np.int32),
           "positions": np.zeros((n_rows, L), np.int32),
           "loss_weights": np.zeros((n_rows, L), np.float32)}
    for (i, x, y, w), r, o, sg in zip(pieces, rows, offsets, segs):
        n = len(x)
        out["tokens"][r, o:o + n] = x
        out["targets"][r, o:o + n] = y
        out["segment_ids"][r, o:o + n] = sg
        out["positions"][r, o:o + n] = np.arange(n, dtype=np.int32)
        out["loss_weights"][r, o:o + n] = w
        where_row[i], where_seg[i] = r, sg
    n_used = int(sum(len(x) for _, x, _, _ in pieces))
    info = {"n_examples_in": len(examples), "n_examples": len(pieces), "n_rows": n_rows,
            "n_positions_used": n_used,
            "fill": round(n_used / (n_rows * L), 4) if n_rows else 0.0,
            "n_loss_tokens": int(out["loss_weights"].sum()),
            **{k: int(v) for k, v in sorted(stats.items())},
            "example_rows": where_row, "example_segments": where_seg}
    for k in ("truncated", "dropped_overlong", "dropped_no_loss_after_truncation",
              "dropped_empty_solution"):
        info.setdefault(k, 0)
    return out, info


def unpack_row(arrays: dict[str, np.ndarray], r: int) -> list[dict[str, np.ndarray]]:
    """Splits packed row ``r`` back into its examples (padding removed)."""
    seg = np.asarray(arrays["segment_ids"][r])
    out = []
    for s in np.unique(seg[seg > 0]):
        m = seg == s
        out.append({k: np.asarray(arrays[k][r])[m] for k in FEATURES})
    return out


# --- cache -------------------------------------------------------------------------
def build_packed_cache(data_path: str | os.PathLike, tokenizer: vocab_lib.BPETokenizer,
                       seq_len: int, *, loss_on: str = "solution", overlong: str = "truncate",
                       max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """Reads, tokenizes and packs ``data_path`` into
    ``<cache>/packed/<stem>-L<seq_len>-<key>/`` (reused when complete)."""
    options = PackOptions(int(seq_len), loss_on, overlong)
    data_path = Path(data_path)
    key_fields = {"format": PACK_FORMAT_VERSION, "input_fingerprint": files.file_fingerprint(data_path),
                  "tokenizer_fingerprint": tokenizer.fingerprint, "seq_len": options.seq_len,
                  "loss_on": loss_on, "overlong": overlong, "max_record_bytes": int(max_record_bytes),
                  "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
    root = Path(cache_dir) if cache_dir is not None else files.default_cache_dir()
    final = cache.keyed_dir(root, "packed", f"{data_path.stem}-L{options.seq_len}", key_fields)
    key = final.name.rsplit("-", 1)[1]
    if (final / META_FILE).exists():
        return final

    t0 = time.time()
    records, report = read_exercises(data_path, max_record_bytes)
    if not records:
        raise ValueError(f"{data_path}: no valid exercise records ({report.as_dict()})")
    prompts = tokenizer.encode_batch([r["prompt"] for r in records])
    solutions = tokenizer.encode_batch([r["solution"] for r in records])
    arrays, info = pack_examples(list(zip(prompts, solutions)), tokenizer.eos_id, options,
                                 tokenizer.pad_id, token_dtype(tokenizer.vocab_size))
    if info["n_rows"] == 0:
        raise ValueError(f"{data_path}: every example was dropped at seq_len={seq_len} ({info})")
    info.pop("example_segments")
    ex_rows = info.pop("example_rows")
    meta = dict(key_fields, key=key, source=str(data_path.resolve()), read=report.as_dict(),
                skipped_samples=[list(s) for s in report.samples],
                vocab_size=int(tokenizer.vocab_size),
                padded_vocab_size=vocab_lib.padded_vocab_size(tokenizer.vocab_size),
                n_windows=int(info["n_rows"]), **info,
                build_seconds=round(time.time() - t0, 2))
    if info["truncated"] or info["dropped_overlong"] or info["dropped_no_loss_after_truncation"]:
        log.warning("%s at L=%d: %d truncated, %d dropped overlong, %d dropped (no loss left)",
                    data_path, seq_len, info["truncated"], info["dropped_overlong"],
                    info["dropped_no_loss_after_truncation"])

    # Record line -> row, for tracing a batch back to the JSONL.
    lines = np.asarray([r["_line"] for r in records], np.int64)
    cache.write_atomic(final, {**{k: arrays[k] for k in FEATURES}, "example_lines": lines, "example_rows": ex_rows},
                       meta)
    log.info("packed cache %s: %d examples -> %d rows x %d (fill %.3f) in %.1fs",
             final, meta["n_examples"], meta["n_rows"], seq_len, meta["fill"], meta["build_seconds"])
    return final


def load_packed(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(memory-mapped arrays [R, L] by feature, meta) from a ``build_packed_cache`` dir."""
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    return {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in FEATURES}, meta
