"""Filter: keep the documents the educational-value classifier scores >= its threshold
(phi-1 quality filter, stage 5).

    python -m data_gen.filter --classifier /data/qf/classifier --inputs /data/qf/dedup/shards \\
        --out_dir /data/qf/filter [--threshold 0.6] [--tokenizer codegen/tokenizer.json]

``--inputs`` are JSONL files, globs or directories (``dedup.expand_inputs``). Every record is
streamed in chunks of ``chunk`` documents: scored with ``classifier.QualityClassifier`` (the
trained directory records its feature settings and threshold), tokenised to count tokens, and
kept iff ``quality_score >= threshold`` (the classifier's threshold unless ``--threshold`` gives
one in [0, 1]). Nothing but one chunk and a 40-bin score histogram is held in memory.

Output (``out_dir``)::

    shards/filtered-NNNNN.jsonl   the kept records, unchanged, plus "quality_score" (a float,
                                  stored exactly: the kept set is exactly quality_score >= threshold)
    filter_report.json            documents and tokens in/out, threshold, histogram counts, timing
    score_histogram.png           scores of every input document, the threshold marked
    _COMPLETE                     written last; the input fingerprint (resumable as ingest is)

The shards are what ``phijax.tasks.register_codetextbook`` (TFDS ``CodeCorpus``) reads with
``content_field='text'`` (``gin/data/quality_filter.gin`` shows the bindings); optionally also
``quality_field='quality_score', min_quality=<threshold>``, which then keeps every record.
Tokens are counted with the project tokenizer: ``--tokenizer`` (a tokenizer.json, e.g. phi-1's
codegen one), default the stdlib BPE the demo trains (``phijax.data.vocab.stdlib_tokenizer_path``),
so the counts equal what a SeqIO task over these shards reads (it adds one EOS per document).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from data_gen import classifier as classifier_lib
from data_gen import dedup, ingest, stage
from phijax.data import records
from phijax.data import vocab as vocab_lib
from phijax.util import cli
from phijax.util import files

log = logging.getLogger(__name__)

REPORT_FILE = "filter_report.json"
HISTOGRAM_FILE = "score_histogram.png"
SCORE_FIELD = "quality_score"


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    threshold: float | None = None  # None: the threshold the classifier was saved with
    text_field: str = "text"
    chunk: int = 1024  # documents scored and tokenised together
    shard_size: int = 10000
    tokenizer: str | None = None  # tokenizer.json for token counts; None: the stdlib BPE

    def validate(self) -> None:
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ingest.IngestError(f"threshold must be in [0, 1], got {self.threshold}")
        for name in ("chunk", "shard_size"):
            if getattr(self, name) < 1:
                raise ingest.IngestError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tokenizer is not None and not Path(self.tokenizer).expanduser().is_file():
            raise ingest.IngestError(f"tokenizer {self.tokenizer!r} is not a file (a tokenizer.json)")


FilterConfig = ingest.gin_register(FilterConfig, __name__)


class TokenCounter:
    """Token counts with the project tokenizer (``path``: a tokenizer.json; None: the stdlib BPE,
    trained once and cached like the demo's). Counts exclude the EOS a task appends per document."""

    def __init__(self, path: str | os.PathLike | None = None):
        p = Path(path).expanduser() if path is not None else vocab_lib.stdlib_tokenizer_path()
        try:
            self.tok = vocab_lib.BPETokenizer(p)
        except (OSError, ValueError) as e:
            raise ingest.IngestError(str(e)) from None
        self.info = {"path": str(p), "fingerprint": self.tok.fingerprint, "vocab_size": self.tok.vocab_size}

    def lengths(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tok.encode_batch(texts)] if texts else []


def count_tokens(files: Sequence[Path], counter: TokenCounter, text_field: str = "text",
                 batch: int = 1024) -> tuple[int, int]:
    """(documents, tokens) of JSONL ``files``, streamed in batches (unreadable lines are not counted).
    ``text_field`` may join fields as decontamination does, e.g. "prompt+solution"."""
    from data_gen.decontaminate import join_fields

    fields = text_field.split("+")
    docs = toks = 0
    texts = (join_fields(r, fields) for f in files for r in records.iter_jsonl(f, required=fields))
    for chunk in _chunks(texts, batch):
        docs += len(chunk)
        toks += sum(counter.lengths(chunk))
    return docs, toks


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in items:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def classifier_fingerprint(classifier_dir: Path) -> str:
    """Content hash of the trained classifier (a retrained one invalidates the filter output)."""
    return "-".join(files.file_fingerprint(classifier_dir / n)
                    for n in (classifier_lib.INFO_FILE, classifier_lib.MODEL_FILE))


def load_classifier(classifier_dir: str | os.PathLike) -> classifier_lib.QualityClassifier:
    try:
        return classifier_lib.QualityClassifier(classifier_dir)
    except classifier_lib.InputError as e:
        raise ingest.IngestError(str(e)) from None


def run(inputs: Sequence[str], out_dir: str | os.PathLike, classifier_dir: str | os.PathLike,
        cfg: FilterConfig | None = None, force: bool = False) -> dict:
    """Filters ``inputs`` into ``out_dir``; returns the report (the stored one when already done).
    ``cfg`` None: ``FilterConfig()`` as gin binds it. Bad input raises ``ingest.IngestError``
    before anything is written."""
    cfg = cfg if cfg is not None else FilterConfig()
    cfg.validate()
    files = dedup.expand_inputs(inputs)
    cdir = Path(classifier_dir)
    if not cdir.is_dir():
        raise ingest.IngestError(f"classifier dir {str(classifier_dir)!r} does not exist (train one with "
                                 f"`python -m data_gen.classifier train`)")
    qc = load_classifier(cdir)
    counter = TokenCounter(cfg.tokenizer)
    threshold = float(qc.threshold if cfg.threshold is None else cfg.threshold)
    out = Path(out_dir)
    fp = ingest.fingerprint("filter", files, extra={
        "filter": dataclasses.asdict(cfg), "classifier": classifier_fingerprint(cdir),
        "tokenizer": counter.info["fingerprint"]})
    st = stage.Stage(out, fp, REPORT_FILE, "filter")
    if (stored := st.resume_or_start(force)) is not None:
        return stored
    t0, c0 = time.perf_counter(), time.process_time()
    read_report = records.ReadReport()
    writer = st.shard_writer("filtered", cfg.shard_size)
    counts = np.zeros(classifier_lib.HIST_BINS, np.int64)
    docs_in = docs_out = tokens_in = tokens_out = 0
    recs = (r for f in files for r in records.iter_jsonl(f, read_report, required=(cfg.text_field,),
                                                          where_prefix=f"{f.name}:"))
    for chunk, scores in classifier_lib.iter_scored(qc, recs, text_field=cfg.text_field, chunk=cfg.chunk):
        lengths = counter.lengths([r[cfg.text_field] for r in chunk])
        counts += classifier_lib.histogram_counts(scores)
        docs_in += len(chunk)
        tokens_in += sum(lengths)
        for rec, score, n in zip(chunk, scores, lengths):
            if score >= threshold:
                rec.pop("_line")
                rec[SCORE_FIELD] = score
                writer.write(rec)
                docs_out += 1
                tokens_out += n
    shards = writer.commit()
    classifier_lib.histogram_png(counts, threshold, out / HISTOGRAM_FILE)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    info = qc.info
    result = {
        "inputs": [str(f) for f in files], "classifier": str(cdir.resolve()), "fingerprint": fp,
        "threshold": threshold, "threshold_source": "classifier" if cfg.threshold is None else "given",
        "classifier_threshold": qc.threshold, "features": info.get("features", {}).get("kind"),
        "annotator": info.get("annotator"),
        "docs_in": docs_in, "docs_out": docs_out, "tokens_in": tokens_in, "tokens_out": tokens_out,
        "kept_fraction": docs_out / docs_in if docs_in else 0.0,
        "kept_token_fraction": tokens_out / tokens_in if tokens_in else 0.0,
        "tokenizer": counter.info, "unreadable": read_report.as_dict(),
        "histogram": {"bin_edges": np.linspace(0.0, 1.0, classifier_lib.HIST_BINS + 1).round(6).tolist(),
                      "counts": counts.tolist()},
        "histogram_png": str(out / HISTOGRAM_FILE), "shards": shards, "options": dataclasses.asdict(cfg),
        "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
        "docs_per_s_per_core": round(docs_in / cpu, 1) if cpu > 0 else None, "resumed": False,
    }
    st.finish(result)
    log.info("filter: kept %d of %d documents (%d of %d tokens) at threshold %.4f", docs_out, docs_in,
             tokens_out, tokens_in, threshold)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(description="Keep the documents a trained quality classifier scores >= threshold.")
    p.add_argument("--classifier", required=True, help="a trained classifier dir (python -m data_gen.classifier train)")
    p.add_argument("--inputs", nargs="+", required=True, help="JSONL files, globs or directories, in order")
    p.add_argument("--out_dir", required=True)
    # Flags left unset keep the gin binding (data_gen.FilterConfig.*), else the default.
    p.add_argument("--threshold", type=float, help="keep score >= this (default: the classifier's threshold)")
    p.add_argument("--tokenizer", help="tokenizer.json for token counts (default: the stdlib BPE)")
    p.add_argument("--text_field")
    p.add_argument("--chunk", type=int)
    p.add_argument("--shard_size", type=int)
    p.add_argument("--force", action="store_true", help="rerun even if the output is complete")
    ingest.add_gin_flags(p)
    args = p.parse_args(argv)
    cli.setup_logging()
    try:
        ingest.parse_gin(args, "filter.gin")
        overrides = ingest.flag_overrides(args, ("threshold", "tokenizer", "text_field", "chunk", "shard_size"))
        cfg = dataclasses.replace(FilterConfig(), **overrides)
        res = run(args.inputs, args.out_dir, args.classifier, cfg, args.force)
    except ingest.IngestError as e:
        return cli.fail(e, prog="filter")
    print(json.dumps({k: res[k] for k in ("docs_in", "docs_out", "tokens_in", "tokens_out", "threshold",
                                          "resumed")}))
    return cli.EXIT_OK


if __name__ == "__main__":
    from data_gen import filter as _filter  # the registered module (see ingest.gin_register)

    sys.exit(_filter.main())
