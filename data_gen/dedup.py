"""Dedup: exact and near-duplicate removal over JSONL shards (phi-1 quality filter, stage 2).

    python -m data_gen.dedup --inputs /data/qf/ingest/shards --out_dir /data/qf/dedup --threshold 0.8

``--inputs`` are JSONL(.gz) files, globs or directories (their ``*.jsonl`` files, sorted), read in
the order given. A record is removed if the sha256 of its normalised text (``ingest.normalise``)
was seen before (``exact``), or if its MinHash signature has an LSH candidate among the kept
documents with estimated Jaccard >= ``threshold`` (``near``; ``data_gen.minhash.NearDupFilter``:
word 5-gram shingles, 128 permutations, bands from ``optimal_bands``). The first occurrence in
input order is kept, so the result is deterministic.

Output (``out_dir``): ``shards/dedup-NNNNN.jsonl`` (kept records, unchanged), ``dedup_report.json``
(kept, exact_removed, near_removed, a sample of removed -> kept pairs with similarity) and the
``_COMPLETE`` marker (resumable as ingest is). Memory: one 32-byte hash and one signature
(num_perm uint64) per kept document, never the texts.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_gen import ingest, minhash, stage
from phijax.data import records
from phijax.util import cli

log = logging.getLogger(__name__)

REPORT_FILE = "dedup_report.json"
MAX_PAIR_SAMPLES = 50


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    seed: int = 0
    text_field: str = "text"
    shard_size: int = 10000
    near: bool = True  # False: exact dedup only

    def validate(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ingest.IngestError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("num_perm", "ngram", "shard_size"):
            if getattr(self, name) < 1:
                raise ingest.IngestError(f"{name} must be >= 1, got {getattr(self, name)}")


DedupConfig = ingest.gin_register(DedupConfig, __name__)


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files in the order given; a directory -> its *.jsonl(.gz) files, a glob -> its matches, sorted."""
    if not inputs:
        raise ingest.IngestError("no --inputs given")
    out: list[Path] = []
    for s in inputs:
        p = Path(s).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.name.endswith((".jsonl", ".jsonl.gz")))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(x) for x in glob.glob(str(p), recursive=True) if Path(x).is_file())
        if not found:
            raise ingest.IngestError(f"input {s!r} matches no JSONL files")
        out += found
    return out


def content_hash(text: str) -> str:
    return hashlib.sha256(ingest.normalise(text).encode("utf-8")).hexdigest()


def iter_deduped(files: Sequence[Path], cfg: DedupConfig, stats: dict,
                 read_report: records.ReadReport) -> Iterator[dict]:
    """The kept records of ``files`` in input order; counts and pair samples go to ``stats``."""
    seen: dict[str, str] = {}  # content hash -> id of the kept record
    near = minhash.NearDupFilter(cfg.threshold, cfg.num_perm, cfg.ngram, seed=cfg.seed) if cfg.near else None
    for f in files:
        for rec in records.iter_jsonl(f, read_report, required=(cfg.text_field,), where_prefix=f"{f.name}:"):
            line = rec.pop("_line")
            rid = str(rec.get("id") or f"{f.name}:{line}")
            stats["n_in"] += 1
            h = content_hash(rec[cfg.text_field])
            if h in seen:
                stats["exact_removed"] += 1
                _sample(stats, "exact", rid, seen[h], 1.0)
                continue
            if near is not None:
                key = stats["n_in"]  # unique even if two records share an id
                dup = near.add(key, rec[cfg.text_field])
                if dup is not None:
                    stats["near_removed"] += 1
                    _sample(stats, "near", rid, stats["_ids"][dup[0]], dup[1])
                    continue
                stats["_ids"][key] = rid
            seen[h] = rid
            stats["kept"] += 1
            yield rec


def _sample(stats: dict, kind: str, removed: str, kept: str, sim: float) -> None:
    if len(stats["pairs_sample"]) < MAX_PAIR_SAMPLES:
        stats["pairs_sample"].append({"kind": kind, "removed": removed, "kept": kept,
                                      "similarity": round(float(sim), 4)})


def run(inputs: Sequence[str], out_dir: str | os.PathLike, cfg: DedupConfig | None = None,
        force: bool = False) -> dict:
    """Dedups ``inputs`` into ``out_dir``; returns the report (the stored one when already done).
    ``cfg`` None: ``DedupConfig()`` as gin binds it."""
    cfg = cfg if cfg is not None else DedupConfig()
    cfg.validate()
    files = expand_inputs(inputs)  # bad input: an error before anything is written
    fp = ingest.fingerprint("dedup", files, extra={"dedup": dataclasses.asdict(cfg)})
    st = stage.Stage(out_dir, fp, REPORT_FILE, "dedup")
    if (stored := st.resume_or_start(force)) is not None:
        return stored
    stats = {"n_in": 0, "kept": 0, "exact_removed": 0, "near_removed": 0, "pairs_sample": [], "_ids": {}}
    read_report = records.ReadReport()
    writer = st.shard_writer("dedup", cfg.shard_size)
    writer.write_all(iter_deduped(files, cfg, stats, read_report))
    shards = writer.commit()
    stats.pop("_ids")
    bands = rows = None
    if cfg.near:
        bands, rows = minhash.optimal_bands(cfg.threshold, cfg.num_perm)
    result = {**stats, "inputs": [str(f) for f in files], "fingerprint": fp, "unreadable": read_report.as_dict(),
              "shards": shards, "options": dict(dataclasses.asdict(cfg), bands=bands, rows=rows),
              "resumed": False}
    st.finish(result)
    log.info("dedup: %d in, %d kept, %d exact and %d near duplicates removed", stats["n_in"], stats["kept"],
             stats["exact_removed"], stats["near_removed"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(description="Exact + MinHash-LSH near-duplicate removal over JSONL shards.")
    p.add_argument("--inputs", nargs="+", required=True, help="JSONL files, globs or directories, in order")
    p.add_argument("--out_dir", required=True)
    # Flags left unset keep the gin binding (data_gen.DedupConfig.*), else the default.
    p.add_argument("--threshold", type=float)
    p.add_argument("--num_perm", type=int)
    p.add_argument("--ngram", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--text_field")
    p.add_argument("--shard_size", type=int)
    p.add_argument("--exact_only", action="store_true")
    p.add_argument("--force", action="store_true", help="rerun even if the output is complete")
    ingest.add_gin_flags(p)
    args = p.parse_args(argv)
    cli.setup_logging()
    try:
        ingest.parse_gin(args)
        overrides = ingest.flag_overrides(args, ("threshold", "num_perm", "ngram", "seed", "text_field",
                                                 "shard_size"))
        if args.exact_only:
            overrides["near"] = False
        cfg = dataclasses.replace(DedupConfig(), **overrides)
        res = run(args.inputs, args.out_dir, cfg, args.force)
    except ingest.IngestError as e:
        return cli.fail(e, prog="dedup")
    print(json.dumps({k: res[k] for k in ("n_in", "kept", "exact_removed", "near_removed", "resumed")}))
    return cli.EXIT_OK


if __name__ == "__main__":
    from data_gen import (
        dedup as _dedup,  # the registered module (see ingest.gin_register)
    )

    sys.exit(_dedup.main())
