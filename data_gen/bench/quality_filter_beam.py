"""Documents/s per core of the heavy quality-filter stages: the Beam pipelines
(``data_gen.beam_stages``, DirectRunner, one worker) beside the in-process stages they wrap,
measured in the same run on the same input.

    python -m data_gen.bench.quality_filter_beam [--work_dir /tmp/qf_bench] [--limit N] \\
        [--decontam_docs 100] [--features text|model:PATH] [--json out.json]

Input: the stdlib ingested by ``data_gen.ingest`` (``--limit`` documents; default all), deduped;
the classifier (random forest on ``--features``, heuristic labels) is trained on the dedup
output and scores it; decontamination (HumanEval + all of MBPP) runs on the first
``--decontam_docs`` kept documents (it is the slow stage). "Per core" is documents over the
process's CPU seconds (user + system, all threads): DirectRunner's in-memory mode runs the
pipeline inside this process, so both columns count the same things.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from data_gen import beam_stages as bs
from data_gen import classifier as cls
from data_gen import decontaminate as D
from data_gen import dedup, heuristic_annotator, ingest, stage
from phijax.util import cli
from phijax.util.files import save_json

BEAM_ARGS = ["--runner=DirectRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]


def _timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def _row(stage: str, docs: int, inproc: tuple, beam: tuple) -> dict:
    (_, c_in, w_in), (_, c_b, w_b) = inproc, beam
    return {"stage": stage, "docs": docs, "in_process_docs_per_core_s": docs / c_in,
            "beam_docs_per_core_s": docs / c_b, "in_process_wall_s": w_in, "beam_wall_s": w_b,
            "beam_over_in_process": c_in / c_b}


def main(argv=None) -> int:
    ap = cli.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work_dir", default=None, help="default: a temp dir, removed afterwards")
    ap.add_argument("--limit", type=int, default=None, help="ingest at most this many stdlib documents")
    ap.add_argument("--decontam_docs", type=int, default=100)
    ap.add_argument("--features", default="text", help="classifier features: text or model:PATH")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cli.setup_logging()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="qf_bench_"))
    rows = []
    try:
        ing = ingest.run("stdlib", work / "ingest", ingest.IngestConfig(limit=args.limit))
        shards = [str(work / "ingest" / "shards" / s) for s in ing["shards"]]
        n = ing["n_kept"]
        a = _timed(lambda: dedup.run(shards, work / "dedup_seq", force=True))
        b = _timed(lambda: bs.run_dedup(shards, work / "dedup_beam", pipeline_args=BEAM_ARGS, force=True))
        assert a[0]["kept"] == b[0]["kept"], (a[0]["kept"], b[0]["kept"])
        rows.append(_row("dedup (exact + MinHash LSH 0.8)", n, a, b))

        kept = [work / "dedup_seq" / "shards" / s for s in a[0]["shards"]]
        recs = cls.read_records(kept)
        texts = [r["text"] for r in recs]
        cls.train(texts, [heuristic_annotator.heuristic_score(t) for t in texts], cls.parse_features(args.features),
                  work / "clf", annotator="heuristic", n_estimators=100)
        a = _timed(lambda: cls.score_files(work / "clf", kept, work / "score_seq"))
        b = _timed(lambda: bs.run_score(work / "clf", [str(p) for p in kept], work / "score_beam",
                                        pipeline_args=BEAM_ARGS, force=True))
        assert a[0]["above_threshold"] == b[0]["above_threshold"]
        rows.append(_row(f"classifier score ({args.features.split(':')[0]} features)", len(recs), a, b))

        head = work / "decontam_in" / "head.jsonl"
        stage.write_jsonl(head, recs[:args.decontam_docs])
        a = _timed(lambda: D.run([str(head)], "text", work / "decontam_seq"))
        b = _timed(lambda: bs.run_decontaminate([str(head)], "text", work / "decontam_beam",
                                                pipeline_args=BEAM_ARGS, force=True))
        assert a[0]["removed"] == b[0]["removed"]
        rows.append(_row("decontaminate (13-gram + AST vs HumanEval + MBPP)", min(len(recs), args.decontam_docs),
                         a, b))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'stage':52s} {'docs':>6s} {'in-process':>12s} {'Beam Direct':>12s} {'Beam/in-proc':>12s}")
    print(f"{'':52s} {'':>6s} {'docs/s/core':>12s} {'docs/s/core':>12s}")
    for r in rows:
        print(f"{r['stage']:52s} {r['docs']:6d} {r['in_process_docs_per_core_s']:12.1f} "
              f"{r['beam_docs_per_core_s']:12.1f} {r['beam_over_in_process']:12.2f}")
    save_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
