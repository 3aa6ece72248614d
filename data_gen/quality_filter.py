"""phi-1's code-quality filter as one command: ingest -> dedup -> annotate -> classifier -> filter
-> decontaminate, each stage into ``OUT_DIR/<stage>/``, each resumable.

    python -m data_gen.quality_filter --gin_file=gin/data/quality_filter.gin \\
        --gin_param="OUT_DIR = '/data/qf'" --gin_param="SOURCE = 'parquet:/data/the-stack/*.parquet'"
    python -m data_gen.quality_filter --source stdlib --out_dir runs/qf [--limit 200] \\
        [--extra_shards runs/textbook/shards runs/exercises/shards]

Settings: ``gin/data/quality_filter.gin`` (the default file) binds every stage option
(``data_gen.IngestConfig``, ``DedupConfig``, ``AnnotateConfig`` + ``EngineConfig``, ``ClassifierStage``,
``FilterConfig``, ``DecontamStage``, ``ChainConfig``); a flag given on the command line wins over its
binding. With no LLM endpoint configured, annotation falls back to the clearly named heuristic
annotator (``data_gen/heuristic_annotator.py``; the reports say so).

Resuming: a stage whose ``_COMPLETE`` marker matches its inputs + options is skipped (logged as
such); otherwise it is redone from the start. Ingest, dedup, annotate and filter keep their own
markers; the chain adds them for the classifier (marker written after the model) and for
decontamination (run into a temp dir that replaces ``decontaminate/`` whole, marker inside). Every
stage is deterministic, so a chain killed anywhere and rerun ends with byte-identical shards.

Output: ``OUT_DIR/decontaminate/clean/filtered-NNNNN.jsonl`` is the final filtered-code dataset
(``report.md`` prints the gin bindings that train on it); ``OUT_DIR/report.json`` +
``report.md``: per stage documents and tokens in/out, seconds, CPU seconds and documents/s per
core, the classifier's held-out P/R/F1 and threshold, the dedup counts, the decontamination
counts per tau (per input, with ``--extra_shards``) and the score histogram's path.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data_gen import annotate as annotate_lib
from data_gen import classifier as classifier_lib
from data_gen import decontaminate, dedup, generator, ingest, stage
from data_gen import filter as filter_lib
from data_gen.llm import engine as engine_lib
from phijax.data import packing, records
from phijax.util import cli
from phijax.util.files import atomic_write_bytes

log = logging.getLogger(__name__)

STAGES = ("ingest", "dedup", "annotate", "classifier", "filter", "decontaminate")
STAGE_FILE = "chain_stage.json"  # the chain's measurements of a stage, beside its output
REPORT_JSON, REPORT_MD = "report.json", "report.md"
CLASSIFIER_STAGE = "classifier_stage.json"  # classifier.json + annotation counts
DECONTAM_STAGE = "decontaminate_stage.json"  # the filtered-code report + one per extra input
DEFAULT_GIN = "data/quality_filter.gin"


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    out_dir: str | None = None
    source: str | None = None  # stdlib | dir:PATH | jsonl:GLOB | parquet:GLOB | stackoverflow:Posts.xml
    so_tag: str = "python"
    # Other training shards to decontaminate too (textbook / exercises generator output): files,
    # dirs or globs; each entry is one input of the report, its text field(s) found from its records.
    extra_shards: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "extra_shards", tuple(str(x) for x in self.extra_shards or ()))


@dataclasses.dataclass(frozen=True)
class ClassifierStage:
    features: str = "text"  # 'text' (cheap fallback) or 'model:PATH' (the paper's embeddings)
    label_field: str = "educational_value"
    label_threshold: float = 0.7
    threshold: float | None = None  # None: the probability threshold with the best held-out F1
    test_fraction: float = 0.25
    seed: int = 0
    n_estimators: int = 200
    max_len: int | None = None  # model features: tokens per document
    batch_size: int | None = None  # model features: documents per batch

    def settings(self) -> dict:
        try:
            return classifier_lib.parse_features(self.features, max_len=self.max_len, batch_size=self.batch_size)
        except classifier_lib.InputError as e:
            raise ingest.IngestError(str(e)) from None

    def validate(self) -> None:
        self.settings()
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ingest.IngestError(f"ClassifierStage.threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ingest.IngestError(f"ClassifierStage.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.n_estimators < 1:
            raise ingest.IngestError(f"ClassifierStage.n_estimators must be >= 1, got {self.n_estimators}")


@dataclasses.dataclass(frozen=True)
class DecontamStage:
    taus: tuple[float, ...] = decontaminate.DEFAULT_TAUS
    ngram: int = decontaminate.DEFAULT_NGRAM
    remove_tau: float = 0.9
    remove_min_ngrams: int = 1
    mbpp_split: str | None = "all"
    humaneval: bool = True
    extra_bench: tuple[str, ...] = ()
    min_ast_nodes: int = 1
    embed: str = "hashed_bow"  # embedding-distance features: 'hashed_bow' (fallback) or 'model:PATH'
    strict: bool = False  # an unreadable line in an input is an error (default: skipped and counted)
    options: dict = dataclasses.field(default_factory=dict)  # more keyword arguments of decontaminate.run

    def __post_init__(self):
        object.__setattr__(self, "taus", tuple(float(t) for t in self.taus))
        object.__setattr__(self, "extra_bench", tuple(str(x) for x in self.extra_bench))

    def validate(self) -> None:
        from phijax.data import benchmarks

        if not self.taus or not all(0.0 < t <= 1.0 for t in self.taus):
            raise ingest.IngestError(f"DecontamStage.taus must be in (0, 1], got {list(self.taus)}")
        if not 0.0 < self.remove_tau <= 1.0:
            raise ingest.IngestError(f"DecontamStage.remove_tau must be in (0, 1], got {self.remove_tau}")
        if self.ngram < 1 or self.remove_min_ngrams < 1:
            raise ingest.IngestError("DecontamStage.ngram and remove_min_ngrams must be >= 1")
        if self.mbpp_split not in (None, "all", *benchmarks.MBPP_SPLITS):
            raise ingest.IngestError(f"DecontamStage.mbpp_split {self.mbpp_split!r}: expected all, "
                                     f"{', '.join(benchmarks.MBPP_SPLITS)} or None")
        for f in self.extra_bench:
            if not Path(f).is_file():
                raise ingest.IngestError(f"DecontamStage.extra_bench {f!r} is not a file")
        try:
            decontaminate.embed_settings(self.embed)
        except decontaminate.DecontamError as e:
            raise ingest.IngestError(f"DecontamStage.embed: {e}") from None

    def run_kwargs(self) -> dict:
        return dict(taus=self.taus, ngram=self.ngram, remove_tau=self.remove_tau,
                    remove_min_ngrams=self.remove_min_ngrams, mbpp_split=self.mbpp_split,
                    humaneval=self.humaneval, extra_bench=self.extra_bench, min_ast_nodes=self.min_ast_nodes,
                    embed=self.embed, strict=self.strict, **self.options)


ChainConfig = ingest.gin_register(ChainConfig, __name__)
ClassifierStage = ingest.gin_register(ClassifierStage, __name__)
DecontamStage = ingest.gin_register(DecontamStage, __name__)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every stage's options (from gin, flags, or defaults)."""
    chain: ChainConfig
    ingest: ingest.IngestConfig = dataclasses.field(default_factory=ingest.IngestConfig)
    dedup: dedup.DedupConfig = dataclasses.field(default_factory=dedup.DedupConfig)
    annotate: annotate_lib.AnnotateConfig = dataclasses.field(default_factory=annotate_lib.AnnotateConfig)
    classifier: ClassifierStage = dataclasses.field(default_factory=ClassifierStage)
    filter: filter_lib.FilterConfig = dataclasses.field(default_factory=filter_lib.FilterConfig)
    decontam: DecontamStage = dataclasses.field(default_factory=DecontamStage)


# --- inputs -----------------------------------------------------------------------------------
def extra_inputs(specs: Sequence[str]) -> list[dict]:
    """Each --extra_shards entry -> {name, files, text_field}: the text field is "text" (textbook,
    code) or "prompt+solution" (CodeExercises), from the entry's first readable record."""
    out = []
    for i, spec in enumerate(specs):
        files = dedup.expand_inputs([spec])
        first = next((r for f in files for r in records.iter_jsonl(f)), None)
        if first is None:
            raise ingest.IngestError(f"extra shards {spec!r} hold no readable records")
        if isinstance(first.get("text"), str):
            field = "text"
        elif all(isinstance(first.get(k), str) for k in packing.EXERCISE_FIELDS):
            field = "+".join(packing.EXERCISE_FIELDS)
        else:
            raise ingest.IngestError(f"extra shards {spec!r}: records need a 'text' field or "
                                     f"{' + '.join(packing.EXERCISE_FIELDS)} (got {sorted(first)[:8]})")
        p = Path(spec.rstrip("/"))
        stem = p.parent.name if p.name == "shards" else p.name.split(".")[0]
        name = f"{i}-{re.sub(r'[^A-Za-z0-9_-]+', '_', stem) or 'input'}"  # the index keeps names distinct
        out.append({"name": name, "spec": spec, "files": files, "text_field": field})
    return out


def validate(s: Settings) -> list[dict]:
    """Every check that needs no work; the first problem raises IngestError. Returns the extra inputs."""
    if not s.chain.out_dir:
        raise ingest.IngestError("no output directory: set OUT_DIR (gin) or --out_dir")
    if not s.chain.source:
        raise ingest.IngestError("no source: set SOURCE (gin) or --source")
    ingest.parse_source(s.chain.source)
    for cfg in (s.ingest, s.dedup, s.annotate, s.classifier, s.filter, s.decontam):
        try:
            cfg.validate()
        except generator.GeneratorError as e:  # annotate's
            raise ingest.IngestError(str(e)) from None
    return extra_inputs(s.chain.extra_shards)


# --- stage bookkeeping ----------------------------------------------------------------------
class _Chain:
    def __init__(self, s: Settings, extra: list[dict], force: bool, engine_config):
        self.s, self.extra, self.force = s, extra, force
        self.out = Path(s.chain.out_dir)
        self.rows: dict[str, dict] = {}
        self._counter: filter_lib.TokenCounter | None = None
        self.engine_config = engine_config

    def dir(self, name: str) -> Path:
        return self.out / name

    @property
    def counter(self) -> filter_lib.TokenCounter:
        if self._counter is None:
            self._counter = filter_lib.TokenCounter(self.s.filter.tokenizer)
        return self._counter

    def shards(self, name: str, sub: str = ingest.SHARDS_DIR) -> list[Path]:
        d = self.dir(name) / sub
        return sorted(p for p in d.iterdir() if p.name.endswith(".jsonl")) if d.is_dir() else []

    def tokens(self, files: Sequence[Path], text_field: str = "text") -> tuple[int, int]:
        return filter_lib.count_tokens(files, self.counter, text_field, self.s.filter.chunk)

    def stage(self, name: str, fn: Callable[[], tuple[dict, bool, str]], measure: Callable[[dict], dict]) -> dict:
        """Runs ``fn`` -> (stage report, resumed, fingerprint); ``measure(report)`` -> docs/tokens
        in/out. Timing of a skipped stage comes from its stored STAGE_FILE."""
        t0, c0 = time.perf_counter(), time.process_time()
        report, resumed, fp = fn()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        path = self.dir(name) / STAGE_FILE
        stored = json.loads(path.read_text()) if path.is_file() else None
        if resumed and stored and stored.get("fingerprint") == fp:
            row = dict(stored, resumed=True)
        else:
            row = {"stage": name, "fingerprint": fp, **measure(report), "seconds": round(seconds, 3),
                   "cpu_seconds": round(cpu, 3)}
            docs = row.get("docs_in")
            row["docs_per_s_per_core"] = round(docs / cpu, 1) if docs and cpu > 0 else None
            stage.write_json(path, row)
            row["resumed"] = resumed
        self.rows[name] = row
        log.info("quality_filter: %s %s (%s docs in -> %s out)", name,
                 "already complete, skipped" if resumed else f"done in {row['seconds']:.1f}s",
                 row.get("docs_in"), row.get("docs_out"))
        return report


# --- stages -----------------------------------------------------------------------------------
def _ingest(c: _Chain) -> dict:
    def fn():
        r = ingest.run(c.s.chain.source, c.dir("ingest"), c.s.ingest, c.s.chain.so_tag, c.force)
        return r, r["resumed"], r["fingerprint"]

    def measure(r):
        _, toks = c.tokens(c.shards("ingest"))
        return {"docs_in": r["n_read"], "docs_out": r["n_kept"], "tokens_in": None, "tokens_out": toks}

    return c.stage("ingest", fn, measure)


def _dedup(c: _Chain) -> dict:
    def fn():
        r = dedup.run([str(c.dir("ingest") / ingest.SHARDS_DIR)], c.dir("dedup"), c.s.dedup, c.force)
        return r, r["resumed"], r["fingerprint"]

    def measure(r):
        _, toks = c.tokens(c.shards("dedup"))
        return {"docs_in": r["n_in"], "docs_out": r["kept"], "tokens_in": c.rows["ingest"]["tokens_out"],
                "tokens_out": toks}

    return c.stage("dedup", fn, measure)


class Incomplete(RuntimeError):
    """A stage stopped short (LLM budget cap, network): rerun the same command to finish (exit 3)."""


def _annotate(c: _Chain) -> dict:
    a = c.s.annotate

    def fn():
        try:
            r = annotate_lib.run([str(c.dir("dedup") / ingest.SHARDS_DIR)], c.dir("annotate"), n_samples=a.n_samples,
                                 seed=a.seed, annotator=a.annotator, config=a, engine_config=c.engine_config,
                                 force=c.force)
        except (generator.GeneratorError, engine_lib.EngineError) as e:
            raise ingest.IngestError(f"annotate: {e}") from None
        if not r.get("complete", True):
            raise Incomplete(f"annotate: {r['pending']} of {r['sampled']} documents still without an answer "
                             f"(budget cap or network); rerun to finish")
        return r, r["resumed"], r["fingerprint"]

    def measure(r):
        # In: the documents sampled from; out: the annotated sample (the classifier's training data).
        everything = r["annotated"] == r["n_input"]  # then the sample holds every input document
        toks = c.rows["dedup"]["tokens_out"] if everything else c.tokens(c.shards("annotate"))[1]
        return {"docs_in": r["n_input"], "docs_out": r["annotated"], "tokens_in": c.rows["dedup"]["tokens_out"],
                "tokens_out": toks, "annotator": r["annotator"], "sampled": r["sampled"], "rejected": r["rejected"]}

    return c.stage("annotate", fn, measure)


def _classifier(c: _Chain) -> dict:
    k = c.s.classifier
    d = c.dir("classifier")

    def fn():
        files = c.shards("annotate")
        if not files:
            raise ingest.IngestError(f"{c.dir('annotate')}: no annotated shards")
        fp = ingest.fingerprint("classifier", files, extra={"classifier": dataclasses.asdict(k),
                                                            "settings": k.settings()})
        st = stage.Stage(d, fp, CLASSIFIER_STAGE, "classifier")
        if (stored := st.resume_or_start(c.force)) is not None:
            return stored, True, fp
        recs = [r for r in classifier_lib.read_records(files) if isinstance(r.get("text"), str)]
        # Samples the annotator could not score are recorded by it without a number: not labels.
        labelled = [r for r in recs if isinstance(r.get(k.label_field), (int, float))
                    and not isinstance(r.get(k.label_field), bool)]
        try:
            scores, annotator = classifier_lib.labels_from_records(labelled, "text", k.label_field)
            info = classifier_lib.train([r["text"] for r in labelled], scores, k.settings(), d,
                                        annotator=annotator, label_threshold=k.label_threshold,
                                        threshold=k.threshold, test_fraction=k.test_fraction, seed=k.seed,
                                        n_estimators=k.n_estimators)
        except classifier_lib.InputError as e:
            raise ingest.IngestError(f"classifier: {e}") from None
        info = dict(info, n_annotated=len(recs), n_labelled=len(labelled))
        st.finish(info)
        return info, False, fp

    def measure(info):
        return {"docs_in": info.get("n_labelled", info["metrics"]["n_train"] + info["metrics"]["n_held_out"]),
                "docs_out": None, "tokens_in": c.rows["annotate"]["tokens_out"], "tokens_out": None}

    return c.stage("classifier", fn, measure)


def _filter(c: _Chain) -> dict:
    def fn():
        r = filter_lib.run([str(c.dir("dedup") / ingest.SHARDS_DIR)], c.dir("filter"), c.dir("classifier"),
                           c.s.filter, c.force)
        return r, r["resumed"], r["fingerprint"]

    def measure(r):
        return {k: r[k] for k in ("docs_in", "docs_out", "tokens_in", "tokens_out")}

    return c.stage("filter", fn, measure)


def _decontaminate(c: _Chain) -> dict:
    final = c.dir("decontaminate")
    k = c.s.decontam

    def fn():
        files = c.shards("filter")
        extra_files = [f for e in c.extra for f in e["files"]]
        fp = ingest.fingerprint("decontaminate", files + extra_files, extra={
            "decontam": dataclasses.asdict(k), "extra": [[e["name"], e["text_field"]] for e in c.extra]})
        st = stage.Stage(final, fp, DECONTAM_STAGE, "decontaminate")
        if (stored := st.done(c.force)) is not None:
            return stored, True, fp
        # Into a temp dir that replaces the stage dir whole: a killed run leaves no mix of two runs.
        tmp = st.begin_dir()
        try:
            report = decontaminate.run([str(f) for f in files], "text", tmp, **k.run_kwargs()) if files else None
            extra = {}
            for e in c.extra:
                extra[e["name"]] = decontaminate.run([str(f) for f in e["files"]], e["text_field"],
                                                     tmp / "extra" / e["name"], **k.run_kwargs())
        except decontaminate.DecontamError as e:
            raise ingest.IngestError(f"decontaminate: {e}") from None
        if report is None:  # nothing survived the filter: an empty clean set, still a finished stage
            (tmp / "clean").mkdir()
            report = {"docs": 0, "removed": 0, "kept": 0, "ast": {}, "ngram_overlap": {}}
            atomic_write_bytes(tmp / "report.json", (json.dumps(report) + "\n").encode())
        report = dict(report, extra=extra)
        st.publish_dir(tmp, report)
        return report, False, fp

    def measure(r):
        _, toks = c.tokens(c.shards("decontaminate", "clean"))
        row = {"docs_in": r["docs"], "docs_out": r["kept"], "tokens_in": c.rows["filter"]["tokens_out"],
               "tokens_out": toks}
        for name, er in r.get("extra", {}).items():
            e = next(x for x in c.extra if x["name"] == name)
            row.setdefault("extra", {})[name] = {
                "docs_in": er["docs"], "docs_out": er["kept"], "tokens_in": c.tokens(e["files"], e["text_field"])[1],
                "tokens_out": c.tokens(c.shards(f"decontaminate/extra/{name}", "clean"), e["text_field"])[1]}
        return row

    return c.stage("decontaminate", fn, measure)


# --- the chain --------------------------------------------------------------------------------
def run(s: Settings, force: bool = False, engine_config=None) -> dict:
    """Runs (or resumes) every stage; writes OUT_DIR/report.json + report.md; returns the report.
    ``engine_config`` (data_gen.llm.engine.EngineConfig) None: as gin binds it. Bad input raises
    ingest.IngestError before any stage runs; an unfinished LLM annotation raises Incomplete."""
    extra = validate(s)
    c = _Chain(s, extra, force, engine_config if engine_config is not None else generator.engine_config(False))
    c.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ing = _ingest(c)
    dd = _dedup(c)
    ann = _annotate(c)
    clf = _classifier(c)
    flt = _filter(c)
    dec = _decontaminate(c)
    report = _report(c, ing, dd, ann, clf, flt, dec, time.perf_counter() - t0)
    stage.write_json(c.out / REPORT_JSON, report)
    atomic_write_bytes(c.out / REPORT_MD, render_markdown(report).encode())
    return report


def _taus(r: dict) -> dict:
    return {t: {"docs": v["docs"], "items": v["items"], "pairs": v["pairs"]} for t, v in r.get("ast", {}).items()}


def _read_counts(r: dict) -> dict:
    """Unreadable lines skipped and documents whose code could not be analysed, by reason."""
    return {"skipped_lines": r.get("skipped_lines", {}), "ast_unanalysed": r.get("ast_unanalysed", {})}


def _report(c: _Chain, ing, dd, ann, clf, flt, dec, seconds: float) -> dict:
    m = clf["metrics"]
    final = c.dir("decontaminate") / "clean"
    dec_row = c.rows["decontaminate"]
    return {
        "out_dir": str(c.out.resolve()), "source": c.s.chain.source, "seconds": round(seconds, 2),
        "stages": [c.rows[s] for s in STAGES],
        "ingest": {"read": ing["n_read"], "kept": ing["n_kept"], "skipped": ing["skipped"]},
        "dedup": {k: dd[k] for k in ("n_in", "kept", "exact_removed", "near_removed")},
        "annotate": {"annotator": ann["annotator"], "heuristic": ann["heuristic"], "sampled": ann["sampled"],
                     "annotated": ann["annotated"], "rejected": ann["rejected"]},
        "classifier": {"annotator": clf["annotator"], "features": clf["features"].get("kind"),
                       "threshold": clf["threshold"], "label_threshold": clf["label_threshold"],
                       **{k: m[k] for k in ("precision", "recall", "f1", "accuracy", "n_train", "n_held_out",
                                            "all_positive_f1", "majority_class_accuracy")}},
        "filter": {"threshold": flt["threshold"], "kept_fraction": flt["kept_fraction"],
                   "kept_token_fraction": flt["kept_token_fraction"], "histogram_png": flt["histogram_png"],
                   "tokenizer": flt["tokenizer"]},
        "decontaminate": {
            "filtered_code": {"docs": dec["docs"], "removed": dec["removed"], "kept": dec["kept"],
                              "ngram_overlap": dec.get("ngram_overlap"), "ast": _taus(dec),
                              **_read_counts(dec)},
            "extra": {n: {"spec": e["spec"], "text_field": e["text_field"], **dec_row.get("extra", {}).get(n, {}),
                          "removed": dec["extra"][n]["removed"], "ngram_overlap": dec["extra"][n]["ngram_overlap"],
                          "ast": _taus(dec["extra"][n]), **_read_counts(dec["extra"][n])}
                      for n, e in ((e["name"], e) for e in c.extra)},
            "rule": dec.get("rule")},
        "dataset": {"path": str(final.resolve()), "docs": dec_row["docs_out"], "tokens": dec_row["tokens_out"],
                    "eos_per_doc": True,
                    "gin": ["--gin_file=gin/data/codetextbook.gin", f"--gin_param=CODE_SOURCES = ['{final.resolve()}']",
                            "--gin_param=phijax.tasks.register_codetextbook.content_field = 'text'"]},
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.1f}" if v >= 100 else f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def render_markdown(r: dict) -> str:
    k, f, dd = r["classifier"], r["filter"], r["dedup"]
    lines = ["# Code-quality filter report", "", f"Source `{r['source']}` → `{r['out_dir']}`; "
             f"{r['seconds']:.1f} s this run (skipped stages report their original timing).", "",
             "| stage | docs in | docs out | tokens in | tokens out | seconds | CPU s | docs/s per core | resumed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["stages"]:
        lines.append("| " + " | ".join(_fmt(row.get(x)) for x in (
            "stage", "docs_in", "docs_out", "tokens_in", "tokens_out", "seconds", "cpu_seconds",
            "docs_per_s_per_core")) + f" | {'yes' if row.get('resumed') else 'no'} |")
    lines += ["", f"Tokens: `{f['tokenizer']['path']}` (no EOS counted; a SeqIO task adds one per document).", "",
              f"**Dedup**: {dd['n_in']:,} in, {dd['exact_removed']:,} exact and {dd['near_removed']:,} near "
              f"duplicates removed, {dd['kept']:,} kept.", "",
              f"**Annotation**: {r['annotate']['annotated']:,} of {r['annotate']['sampled']:,} sampled documents "
              f"scored by `{r['annotate']['annotator']}`"
              + (" (the HEURISTIC stand-in, not an LLM: no endpoint configured)" if r["annotate"]["heuristic"] else "")
              + f", {r['annotate']['rejected']} rejected.", "",
              f"**Classifier** ({k['features']} features, labels by `{k['annotator']}` >= {k['label_threshold']}): "
              f"held-out precision {k['precision']:.3f}, recall {k['recall']:.3f}, F1 {k['f1']:.3f} "
              f"({k['n_held_out']} docs; keep-everything F1 {k['all_positive_f1']:.3f}) at threshold "
              f"{k['threshold']:.4f}.", "",
              f"**Filter**: threshold {f['threshold']:.4f}, kept {f['kept_fraction']:.1%} of documents and "
              f"{f['kept_token_fraction']:.1%} of tokens; histogram `{f['histogram_png']}`.", "",
              "## Decontamination (AST match rate ≥ τ; 13-gram overlap)", "",
              "| input | docs | removed | τ: docs (pairs) | n-gram docs |", "|---|---|---|---|---|"]
    dc = r["decontaminate"]
    rows = [("filtered code", dc["filtered_code"])] + [(n, v) for n, v in dc["extra"].items()]
    for name, v in rows:
        taus = "; ".join(f"{t}: {x['docs']} ({sum(x['pairs'].values())})" for t, x in v["ast"].items())
        docs = v.get("docs", v.get("docs_in"))
        lines.append(f"| {name} | {docs} | {v['removed']} | {taus} | {(v.get('ngram_overlap') or {}).get('docs')} |")
    ds = r["dataset"]
    lines += ["", f"Rule: {dc['rule']}.", "", "## Training on the result", "",
              f"`{ds['path']}`: {ds['docs']:,} documents, {ds['tokens']:,} tokens. Add to a training command:", "",
              "```", *ds["gin"], "--gin_param=TEXTBOOK_SOURCES = None  # or your textbook shards",
              "--gin_param=TOKENIZER = None  # or the tokenizer.json the counts above used", "```", ""]
    return "\n".join(lines)


# --- CLI ----------------------------------------------------------------------------------------
def parse_gin(gin_files: Sequence[str], gin_params: Sequence[str], search_paths: Sequence[str] = ()) -> None:
    """Parses the files (default gin/data/quality_filter.gin) and bindings; GinError -> IngestError."""
    from phijax.util import gin_config

    try:
        gin_config.parse(list(gin_files) or [os.path.join(gin_config.REPO_GIN_DIR, DEFAULT_GIN)], list(gin_params),
                         list(search_paths))
    except gin_config.GinError as e:
        raise ingest.IngestError(str(e)) from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    # --out_dir / --source set the REQUIRED macros; gin checks those when parsing.
    params = list(args.gin_param) + [f"{macro} = {v!r}" for macro, v in (("OUT_DIR", args.out_dir),
                                                                          ("SOURCE", args.source)) if v is not None]
    parse_gin(args.gin_file, params, args.gin_search_path)
    chain = ChainConfig()
    if args.extra_shards is not None:
        chain = dataclasses.replace(chain, extra_shards=args.extra_shards)
    s = Settings(chain)
    for flag, part, field in (("limit", "ingest", "limit"), ("annotator", "annotate", "annotator"),
                              ("n_samples", "annotate", "n_samples"), ("features", "classifier", "features"),
                              ("threshold", "filter", "threshold"), ("tokenizer", "filter", "tokenizer")):
        if getattr(args, flag) is not None:
            s = dataclasses.replace(s, **{part: dataclasses.replace(getattr(s, part), **{field: getattr(args, flag)})})
    return s


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(description="ingest -> dedup -> annotate -> classifier -> filter -> decontaminate",
                           exit_codes=cli.INCOMPLETE_CODES)
    ingest.add_gin_flags(p)
    p.add_argument("--out_dir", help="overrides OUT_DIR")
    p.add_argument("--source", help="overrides SOURCE: stdlib | dir:PATH | jsonl:GLOB | parquet:GLOB | "
                                    "stackoverflow:Posts.xml")
    p.add_argument("--limit", type=int, help="ingest at most this many documents (a quick subset)")
    p.add_argument("--extra_shards", nargs="*", help="textbook / exercises shards to decontaminate too")
    p.add_argument("--annotator", help="auto | heuristic | llm (data_gen.annotate)")
    p.add_argument("--n_samples", type=int, help="documents to annotate")
    p.add_argument("--features", help="classifier features: text | model:PATH")
    p.add_argument("--threshold", type=float, help="filter threshold (default: the classifier's)")
    p.add_argument("--tokenizer", help="tokenizer.json for token counts (default: the stdlib BPE)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    args = p.parse_args(argv)
    cli.setup_logging()
    try:
        r = run(settings_from_args(args), args.force)
    except ingest.IngestError as e:
        return cli.fail(e, prog="quality_filter")
    except Incomplete as e:
        print(f"quality_filter: {e}", file=sys.stderr)
        return cli.EXIT_INCOMPLETE
    for row in r["stages"]:
        print(f"{row['stage']:>13}: {'skipped (complete)' if row.get('resumed') else 'ran':18} "
              f"docs {_fmt(row.get('docs_in'))} -> {_fmt(row.get('docs_out'))}, "
              f"tokens {_fmt(row.get('tokens_in'))} -> {_fmt(row.get('tokens_out'))}")
    print(f"final dataset: {r['dataset']['path']} ({r['dataset']['docs']} docs); report: "
          f"{Path(r['out_dir']) / REPORT_MD}")
    return cli.EXIT_OK


if __name__ == "__main__":
    from data_gen import quality_filter as _qf  # the registered module (see ingest.gin_register)

    sys.exit(_qf.main())
