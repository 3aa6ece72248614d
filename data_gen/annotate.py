"""Annotate: an LLM rates the educational value of a sample (phi-1 quality filter, stage 3).

    python -m data_gen.annotate --inputs /data/qf/dedup/shards --out_dir /data/qf/annotate --n_samples 100000
    python -m data_gen.annotate --inputs ... --out_dir ... --n_samples 100000 --dry_run   # tokens, cost
    python -m data_gen.annotate --inputs ... --out_dir ... --n_samples 1000 --annotator heuristic

phi-1 had GPT-4 annotate ~100K of >35M files with the prompt "determine its educational value
for a student whose goal is to learn basic coding concepts"; a classifier trained on those
labels then scored everything (data_gen/classifier.py). Here:

* Sample: the ``n_samples`` records whose sha256(seed, content hash) is smallest (ties: the
  hash of the whole record). It depends on the records only, not on their order or on how they
  are split into shards; a larger ``n_samples`` extends a smaller one. Two streaming passes over
  ``--inputs`` (files, globs or directories, as dedup takes them); memory: ``n_samples`` small
  tuples. The chosen records are written to ``sample.jsonl`` in that order.
* Annotator ``llm``: one chat request per document through the generation engine
  (data_gen/llm: ledger, rate limits, retries, budget cap, Batch API with ``--batch``) with the
  prompt files gin/data/annotate_{system,prompt}.txt; documents longer than ``max_doc_chars``
  are cut at a line boundary (the prompt and the record say so). The answer must hold a JSON
  object ``{"educational_value": <integer 0-10>, "reason": "..."}`` (JSON mode is asked for;
  a fenced or prose-wrapped object is accepted). An unparseable, out-of-range or cut-off answer
  is asked again as a new request (another sampling seed and a note that the previous answer
  could not be parsed) up to ``max_parse_retries`` times, then recorded in ``rejects.jsonl``
  with the answer's start: it never becomes a score. ``heuristic``: the clearly named stand-in
  (data_gen/heuristic_annotator.py), NOT an LLM judgement. ``auto``: ``llm`` when an endpoint
  is configured (``data_gen.EngineConfig.base_url``, $OPENAI_BASE_URL, or an API key in
  ``$api_key_env`` for api.openai.com), else ``heuristic``.

Output (``out_dir``)::

    shards/annotate-NNNNN.jsonl   the input record + "educational_value" (score / 10, in [0, 1]:
                                  what `classifier train --label_field educational_value` reads),
                                  "educational_value_raw" (0-10), "annotator" ("llm:<model>" or
                                  "heuristic"); llm also "annotation_reason",
                                  "annotation_truncated", "annotation_attempts"
    rejects.jsonl                 documents without a score: reason, attempts, answer excerpt
    annotate_report.json          counts, score histogram, annotator, engine tokens and cost
    sample.jsonl                  the sampled records, in sample order
    ledger.sqlite, responses.jsonl, batches/   the engine's (llm only)
    _COMPLETE                     written last; holds the input fingerprint

Resumable: a rerun after a kill sends only what the ledger does not hold yet (nothing already
paid for is requested again), and with a matching ``_COMPLETE`` does nothing. A run that the
budget cap or exhausted network retries left unfinished writes what it has, no marker, and
exits 3: rerun to finish.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_gen import dedup, generator, heuristic_annotator, ingest, stage
from data_gen.llm import engine as engine_lib
from data_gen.llm import ledger as ledger_lib
from data_gen.llm import lock as lock_lib
from data_gen.llm.request import Request, canonical_json, messages_from, seed_from_key
from phijax.data import records

log = logging.getLogger(__name__)

REPORT_FILE = "annotate_report.json"
SAMPLE_FILE = "sample.jsonl"
REJECTS_FILE = generator.REJECTS_FILE
ANNOTATORS = ("llm", "heuristic", "auto")
TEMPLATE_FIELDS = ("code", "note")
MAX_SCORE = 10
MAX_PARSE_RETRIES = 20  # the attempt is the last two digits of a request's sample_index


class AnnotateError(generator.GeneratorError):
    """Bad input or setting, found before any request is sent (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class JsonAnswerSettings:
    """What every prompt that wants a JSON answer back sets (annotation here, data_gen.llm_grade's
    grading): the request parameters (`answer_params`) and the parse retries."""
    max_tokens: int = 200
    temperature: float | None = 0.0
    send_seed: bool = True  # a seed per (item, attempt): a retry is a different sample
    json_mode: bool = True  # response_format {"type": "json_object"}
    max_parse_retries: int = 2
    retry_note: str = "Your previous answer could not be parsed. Reply with only the JSON object."

    def check_answer_settings(self, error: type[Exception]) -> None:
        if self.max_tokens < 1:
            raise error(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.max_parse_retries <= MAX_PARSE_RETRIES:
            raise error(f"max_parse_retries must be in [0, {MAX_PARSE_RETRIES}], got {self.max_parse_retries}")


@dataclasses.dataclass(frozen=True)
class AnnotateConfig(JsonAnswerSettings):
    n_samples: int = 100_000  # the CLI's default; run() takes it as an argument
    seed: int = 0
    annotator: str = "auto"
    text_field: str = "text"
    system_template_file: str | None = "gin/data/annotate_system.txt"
    prompt_template_file: str = "gin/data/annotate_prompt.txt"
    max_doc_chars: int = 6000  # of the document in the prompt (~1.5K tokens)
    truncation_note: str = "(The file is longer; only its first {chars} characters are shown.)\n\n"
    shard_size: int = 10000

    def validate(self) -> None:
        if self.n_samples < 1:
            raise AnnotateError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.annotator not in ANNOTATORS:
            raise AnnotateError(f"annotator must be one of {ANNOTATORS}, got {self.annotator!r}")
        for name in ("max_doc_chars", "shard_size"):
            if getattr(self, name) < 1:
                raise AnnotateError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.check_answer_settings(AnnotateError)
        try:
            self.truncation_note.format(chars=1)
        except (KeyError, IndexError, ValueError) as e:
            raise AnnotateError(f"truncation_note may only use {{chars}}: {e!r}") from None


AnnotateConfig = ingest.gin_register(AnnotateConfig, __name__)


# --- the answer ---------------------------------------------------------------------------
class AnswerError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _json_objects(text: str, limit: int = 50) -> Iterator[dict]:
    """The JSON objects embedded in ``text`` (plain, fenced or wrapped in prose), in order."""
    dec = json.JSONDecoder()
    i = text.find("{")
    while i != -1 and limit > 0:
        limit -= 1
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            yield obj
        i = text.find("{", end)


def parse_answer(text: str) -> tuple[int, str]:
    """(score 0-10, reason) from an answer; AnswerError(reason code) if there is none."""
    objs = list(_json_objects(text or ""))
    if not objs:
        raise AnswerError("unparseable", "no JSON object in the answer")
    obj = next((o for o in objs if "educational_value" in o), None)
    if obj is None:
        raise AnswerError("missing_score", f"keys {sorted(objs[0])[:5]}")
    v = obj["educational_value"]
    if (isinstance(v, str) and v.strip().lstrip("-").isdigit()) or (isinstance(v, float) and v.is_integer()):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise AnswerError("not_integer", repr(v)[:40])
    if not 0 <= v <= MAX_SCORE:
        raise AnswerError("out_of_range", f"{v} not in [0, {MAX_SCORE}]")
    reason = obj.get("reason")
    return v, reason.strip() if isinstance(reason, str) else ""


# --- the sample ---------------------------------------------------------------------------
def _sample_keys(files: Sequence[Path], text_field: str, seed: int, report: records.ReadReport):
    for fi, f in enumerate(files):
        for rec in records.iter_jsonl(f, report, required=(text_field,), where_prefix=f"{f.name}:"):
            line = rec.pop("_line")
            prio = hashlib.sha256(f"annotate/{seed}/{dedup.content_hash(rec[text_field])}".encode()).hexdigest()
            tie = hashlib.sha256(canonical_json(rec).encode("utf-8")).hexdigest()
            yield prio, tie, fi, line


def write_sample(files: Sequence[Path], n: int, text_field: str, seed: int, path: Path) -> records.ReadReport:
    """Writes the ``n`` chosen records to ``path`` in sample order; returns pass 1's read report."""
    report = records.ReadReport()
    chosen = heapq.nsmallest(n, _sample_keys(files, text_field, seed, report))  # bounded heap
    want = {(fi, line): rank for rank, (_, _, fi, line) in enumerate(chosen)}
    offsets = [0] * len(chosen)
    unordered = path.with_name(f".{path.name}.unordered")
    with open(unordered, "wb") as out:  # pass 2: fetch the chosen lines
        for fi in sorted({fi for fi, _ in want}):
            for rec in records.iter_jsonl(files[fi], required=(text_field,)):
                rank = want.get((fi, rec.pop("_line")))
                if rank is not None:
                    offsets[rank] = out.tell()
                    out.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(unordered, "rb") as src, stage.AtomicFile(path, "wb") as dst:  # ... and put them in sample order
        for off in offsets:
            src.seek(off)
            dst.write(src.readline())
    unordered.unlink()
    return report


def iter_sample(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for rank, line in enumerate(f):
            yield rank, json.loads(line)


# --- requests -----------------------------------------------------------------------------
def resolve_annotator(choice: str, ecfg: engine_lib.EngineConfig) -> tuple[str, str]:
    """("llm" | "heuristic", why)."""
    if choice not in ANNOTATORS:
        raise AnnotateError(f"annotator must be one of {ANNOTATORS}, got {choice!r}")
    if choice != "auto":
        return choice, f"--annotator {choice}"
    if ecfg.base_url:
        return "llm", "auto: data_gen.EngineConfig.base_url is set"
    if os.environ.get("OPENAI_BASE_URL"):
        return "llm", "auto: $OPENAI_BASE_URL is set"
    if engine_lib.api_key_of(ecfg):
        return "llm", f"auto: ${ecfg.api_key_env} is set (api.openai.com)"
    return "heuristic", "auto: no LLM endpoint configured (no base_url, $OPENAI_BASE_URL or API key)"


class Prompter:
    """Document (+ attempt) -> chat Request. The key covers model, messages (the document), the
    sampling parameters (seed per document and attempt) and the attempt, so a parse retry is a
    new request and a rerun finds every answered one in the ledger."""

    def __init__(self, cfg: AnnotateConfig, model: str):
        self.cfg, self.model = cfg, model
        self.user_t = generator.read_template(cfg.prompt_template_file, TEMPLATE_FIELDS)
        self.sys_t = generator.read_template(cfg.system_template_file, ()) if cfg.system_template_file else None
        if "{code}" not in self.user_t:
            raise AnnotateError(f"{cfg.prompt_template_file}: the prompt must contain {{code}}")

    def document(self, text: str) -> tuple[str, bool]:
        """(the text shown, truncated?): cut at a line boundary within ``max_doc_chars``."""
        limit = self.cfg.max_doc_chars
        if len(text) <= limit:
            return text, False
        cut = text[:limit]
        nl = cut.rfind("\n")
        return (cut[:nl + 1] if nl >= limit // 2 else cut), True

    def request(self, text: str, attempt: int) -> Request:
        doc_hash = dedup.content_hash(text)
        shown, truncated = self.document(text)
        note = self.cfg.truncation_note.format(chars=len(shown)) if truncated else ""
        user = self.user_t.format(code=shown, note=note).strip()
        if attempt:
            user += "\n\n" + self.cfg.retry_note
        params = answer_params(self.cfg, f"annotate/{doc_hash}/{attempt}")
        # sample_index names the document in engine log lines: 32 bits of its hash, then the attempt.
        index = int(doc_hash[:8], 16) * 100 + attempt
        return Request(model=self.model, sample_index=index, kind="chat",
                       messages=messages_from(self.sys_t.strip() if self.sys_t else None, user), params=params,
                       meta={"doc": doc_hash[:16], "attempt": attempt, "truncated": truncated})


def answer_params(cfg: JsonAnswerSettings, seed_key: str) -> dict[str, Any]:
    """A JSON-answer request's parameters (annotation, grading): max_tokens, temperature, a seed
    per document and attempt (servers that honour it reproduce the answer), JSON mode."""
    params: dict[str, Any] = {"max_tokens": cfg.max_tokens}
    if cfg.temperature is not None:
        params["temperature"] = cfg.temperature
    if cfg.send_seed:
        params["seed"] = seed_from_key(seed_key)
    if cfg.json_mode:
        params["response_format"] = {"type": "json_object"}
    return params


@dataclasses.dataclass
class _Doc:
    """One sampled document's state: annotated (score), rejected (reject), or pending."""
    attempts: int = 0
    score: int | None = None
    reason: str = ""
    truncated: bool = False
    reject: str | None = None
    detail: str = ""
    answer: str | None = None
    key: str = ""


def _merge_engine(reports: list[engine_lib.RunReport]) -> dict[str, Any] | None:
    if not reports:
        return None
    d: dict[str, Any] = {"rounds": len(reports)}
    for name in ("n_requests", "n_already_done", "n_skipped_failed", "n_sent", "n_failed", "n_not_sent",
                 "n_http_attempts", "prompt_tokens", "completion_tokens"):
        d[name] = sum(getattr(r, name) for r in reports)
    d["spent_usd"] = round(sum(r.spent_usd for r in reports), 10)
    d["total_spent_usd"] = round(reports[-1].total_spent_usd, 10)  # this out_dir, all runs
    d["by_status"] = dict(sum((r.by_status for r in reports), collections.Counter()))
    d["retries_by_reason"] = dict(sum((r.retries_by_reason for r in reports), collections.Counter()))
    d["stopped"] = next((r.stopped for r in reports if r.stopped), None)
    return d


def _annotate_llm(out: Path, sample: Path, n: int, cfg: AnnotateConfig, eng: engine_lib.Engine,
                  prompter: Prompter) -> tuple[dict[int, _Doc], list[engine_lib.RunReport], dict[str, int]]:
    """Round k sends attempt k of every document still without a usable answer. Which documents
    need round k follows from the ledger's answers to rounds < k, so a rerun rebuilds the same
    requests and the engine skips those already answered."""
    docs = {rank: _Doc() for rank in range(n)}
    todo = set(docs)
    reports: list[engine_lib.RunReport] = []
    counts = {"parse_retries": 0, "docs_retried": 0}
    for attempt in range(cfg.max_parse_retries + 1):
        if not todo:
            break
        keys: dict[int, str] = {}

        def requests(todo: set[int], attempt: int, keys: dict[int, str]) -> Iterator[Request]:
            for rank, rec in iter_sample(sample):
                if rank in todo:
                    req = prompter.request(rec[cfg.text_field], attempt)
                    keys[rank] = req.key
                    docs[rank].truncated = bool(req.meta["truncated"])
                    yield req
        reports.append(eng.run_sync(requests(todo, attempt, keys), total=len(todo)))
        assert len(keys) == len(todo), "the engine stopped reading requests early"
        results, failed = ledger_lib.answers_and_failures(out, keys.values())
        nxt = set()
        for rank in sorted(todo):
            d, key = docs[rank], keys[rank]
            d.key, res = key, results.get(key)
            if res is None:
                if key in failed:  # a 4xx the engine does not resend: final
                    d.attempts, d.reject, d.detail = attempt + 1, "request_failed", failed[key].get("error") or ""
                continue  # else pending: retryable failure or budget stop; a rerun sends it
            d.attempts = attempt + 1
            try:
                if res["status"] != "ok":
                    raise AnswerError(f"not_served_ok:{res['status']}", res.get("error") or "")
                d.score, d.reason = parse_answer(res["text"])
                d.reject = d.answer = None
            except AnswerError as e:
                d.reject, d.detail, d.answer = e.reason, e.detail, (res.get("text") or "")[:500]
                if attempt < cfg.max_parse_retries:
                    nxt.add(rank)
        counts["parse_retries"] += len(nxt)
        if attempt == 0:
            counts["docs_retried"] = len(nxt)
        todo = nxt
    return docs, reports, counts


# --- run -----------------------------------------------------------------------------------
def _template_digest(cfg: AnnotateConfig) -> str:
    h = hashlib.sha256()
    for f in (cfg.system_template_file, cfg.prompt_template_file):
        if f:
            h.update(generator.resolve_path(f).read_bytes())
    return h.hexdigest()[:16]


def run(inputs: Sequence[str], out_dir: str | os.PathLike, *, n_samples: int, seed: int = 0,
        annotator: str = "auto", config: AnnotateConfig | None = None,
        engine_config: engine_lib.EngineConfig | None = None, force: bool = False,
        dry_run: bool = False) -> dict:
    """Annotates a sample of ``inputs`` into ``out_dir``; returns the report (the stored one, with
    ``"resumed": True``, when already complete). ``config`` / ``engine_config`` None: as gin
    binds them; ``n_samples``, ``seed`` and ``annotator`` override the config's. Raises
    AnnotateError / ingest.IngestError / EngineError on bad input before any request is sent."""
    t0, c0 = time.monotonic(), time.process_time()
    cfg = dataclasses.replace(config if config is not None else AnnotateConfig(), n_samples=n_samples, seed=seed,
                              annotator=annotator)
    cfg.validate()
    ecfg = engine_config if engine_config is not None else engine_lib.EngineConfig()
    kind, why = resolve_annotator(cfg.annotator, ecfg)
    files = dedup.expand_inputs(inputs)
    out = Path(out_dir)
    name = f"llm:{ecfg.model}" if kind == "llm" else heuristic_annotator.ANNOTATOR_NAME
    eng = prompter = None
    if dry_run and kind != "llm":
        raise AnnotateError(f"--dry_run estimates LLM cost, but the annotator is {kind} ({why})")
    if kind == "llm":
        prompter = Prompter(cfg, ecfg.model)  # template errors
        eng = engine_lib.Engine(out, ecfg)  # engine config errors
        eng.check_prices([ecfg.model])
    fp = ingest.fingerprint("annotate", files, extra={"annotate": dataclasses.asdict(cfg), "annotator": name,
                                                      "templates": _template_digest(cfg) if kind == "llm" else None})
    st = stage.Stage(out, fp, REPORT_FILE, "annotate")
    with lock_lib.hold(out):  # one run per output directory (a second one: OutputDirError)
        if not dry_run and (stored := st.done(force)) is not None:
            return stored
        if eng is not None:
            _ = eng.client  # no API key: an error now, not after sampling
        if kind == "heuristic":
            log.warning("annotate: using the HEURISTIC annotator (%s); its scores are not LLM judgements", why)
        else:
            log.info("annotate: annotator %s (%s)", name, why)
        if dry_run:  # leaves a finished output as it is
            out.mkdir(parents=True, exist_ok=True)
            sample = out / f".dry_run_{SAMPLE_FILE}"
            n = min(cfg.n_samples, write_sample(files, cfg.n_samples, cfg.text_field, cfg.seed, sample).n_ok)
            est = eng.estimate(prompter.request(rec[cfg.text_field], 0) for _, rec in iter_sample(sample))
            sample.unlink()
            return {"dry_run": True, "sampled": n, "estimate": dataclasses.asdict(est), "lines": est.lines(),
                    "note": "first attempts only; parse retries add to this"}
        st.start()
        read_report = write_sample(files, cfg.n_samples, cfg.text_field, cfg.seed, out / SAMPLE_FILE)
        n = min(cfg.n_samples, read_report.n_ok)
        if n == 0:
            raise AnnotateError(f"no usable records (with a non-empty {cfg.text_field!r}) in {inputs}")

        counts = {"parse_retries": 0, "docs_retried": 0}
        reports: list[engine_lib.RunReport] = []
        if kind == "llm":
            docs, reports, counts = _annotate_llm(out, out / SAMPLE_FILE, n, cfg, eng, prompter)
        hist = collections.Counter()
        rejects, pending_keys, n_truncated, total = [], [], 0, 0.0
        writer = st.shard_writer("annotate", cfg.shard_size)
        for rank, rec in iter_sample(out / SAMPLE_FILE):
            if kind == "heuristic":
                res = heuristic_annotator.annotate(rec, cfg.text_field)
                raw = round(res["educational_value"] * MAX_SCORE, 4)
                res["educational_value_raw"] = raw
            else:
                d = docs[rank]
                n_truncated += d.truncated
                if d.score is None:
                    if d.reject is not None and (d.reject == "request_failed" or d.attempts > cfg.max_parse_retries):
                        rejects.append({"rank": rank, "id": rec.get("id"), "key": d.key, "reason": d.reject,
                                        "detail": eng.redact(d.detail)[:500], "attempts": d.attempts,
                                        "answer": d.answer})
                    else:
                        pending_keys.append(d.key)
                    continue
                raw = d.score
                res = dict(rec, educational_value=raw / MAX_SCORE, educational_value_raw=raw, annotator=name,
                           annotation_reason=d.reason, annotation_truncated=d.truncated,
                           annotation_attempts=d.attempts)
            hist[min(int(raw), MAX_SCORE)] += 1
            total += res["educational_value"]
            writer.write(res)
        shards = writer.commit()
        stage.write_jsonl(out / REJECTS_FILE, rejects)
        n_annotated = writer.n
        pending = n - n_annotated - len(rejects)
        pending_reasons: dict[str, int] = {}
        if pending_keys:
            pending_reasons = dict(ledger_lib.why_missing(out, pending_keys).most_common())
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        report = {"annotator": name, "annotator_choice": why, "heuristic": kind == "heuristic",
                  "inputs": [str(f) for f in files], "fingerprint": fp, "n_input": read_report.n_ok,
                  "unreadable": read_report.as_dict(), "n_samples": cfg.n_samples, "seed": cfg.seed,
                  "sampled": n, "annotated": n_annotated, "rejected": len(rejects),
                  "rejects_by_reason": dict(sorted(collections.Counter(r["reason"] for r in rejects).items())),
                  "pending": pending, "pending_reasons": pending_reasons, "parse_retries": counts["parse_retries"],
                  "docs_retried": counts["docs_retried"],
                  "truncated": n_truncated, "mean_educational_value": round(total / n_annotated, 6) if n_annotated else None,
                  "histogram": {str(k): hist[k] for k in range(MAX_SCORE + 1)},
                  "model": ecfg.model if kind == "llm" else None, "engine": _merge_engine(reports),
                  "complete": pending == 0, "shards": shards, "options": dataclasses.asdict(cfg),
                  "timing": {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                             "docs_per_cpu_s": round(n / cpu, 2) if cpu > 0 else None},
                  "resumed": False}
        if pending:  # no marker: a rerun sends what is missing
            st.save_report(report)
            log.warning("annotate: %d of %d documents still without an answer (%s); rerun to finish", pending, n,
                        ", ".join(f"{c} {r}" for r, c in pending_reasons.items()))
        else:
            st.finish(report)
        log.info("annotate: %d sampled of %d, %d annotated by %s, %d rejected %s, %d parse retries",
                 n, read_report.n_ok, n_annotated, name, len(rejects), report["rejects_by_reason"],
                 counts["parse_retries"])
        return report


# --- CLI -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    from phijax.util import cli, gin_config

    p = cli.ArgumentParser(description="Annotate a sample of JSONL shards with an educational-value score.",
                           exit_codes=cli.INCOMPLETE_CODES)
    gin_config.add_gin_flags(p)
    p.add_argument("--inputs", nargs="+", required=True, help="JSONL files, globs or directories (dedup's shards)")
    p.add_argument("--out_dir", required=True, help="output directory; rerun the same command to resume")
    # Flags left unset keep the gin binding (data_gen.AnnotateConfig.*), else the default.
    p.add_argument("--n_samples", type=int, help="documents to annotate (more than the corpus: all)")
    p.add_argument("--seed", type=int, help="which documents are sampled")
    p.add_argument("--annotator", help="llm | heuristic | auto (llm when an endpoint is configured)")
    p.add_argument("--max_parse_retries", type=int)
    p.add_argument("--max_doc_chars", type=int)
    p.add_argument("--text_field")
    p.add_argument("--shard_size", type=int)
    p.add_argument("--batch", action="store_true", help="use the Batch API (half price, asynchronous)")
    p.add_argument("--dry_run", action="store_true", help="sample, estimate tokens and cost; send nothing")
    p.add_argument("--force", action="store_true", help="rerun even if the output is complete")
    p.add_argument("--log_level", default="INFO")
    args = p.parse_args(argv)
    try:
        generator.setup(args, "data/annotate.gin")  # logging + gin (a bad binding: GeneratorError)
        ecfg = generator.engine_config(args.batch)  # installs key redaction on the log handlers
        overrides = ingest.flag_overrides(args, ("max_parse_retries", "max_doc_chars", "text_field", "shard_size"))
        cfg = dataclasses.replace(AnnotateConfig(), **overrides)
        res = run(args.inputs, args.out_dir, n_samples=cfg.n_samples if args.n_samples is None else args.n_samples,
                  seed=cfg.seed if args.seed is None else args.seed,
                  annotator=cfg.annotator if args.annotator is None else args.annotator,
                  config=cfg, engine_config=ecfg, force=args.force,
                  dry_run=args.dry_run)
    except (generator.GeneratorError, ingest.IngestError, engine_lib.EngineError) as e:
        return cli.fail(e, prog="annotate")
    except KeyboardInterrupt:
        print(f"annotate: interrupted: what was annotated is kept in {args.out_dir}; rerun the same command to"
              " resume", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    if args.dry_run:
        print("\n".join([f"sampled {res['sampled']} documents ({res['note']})", *res["lines"]]))
        return cli.EXIT_OK
    print(json.dumps({k: res[k] for k in ("annotator", "sampled", "annotated", "rejected", "pending",
                                          "parse_retries", "resumed")}))
    return cli.EXIT_OK if res.get("complete", True) else cli.EXIT_INCOMPLETE


if __name__ == "__main__":
    from data_gen import (
        annotate as _annotate,  # the registered module (see ingest.gin_register)
    )

    sys.exit(_annotate.main())
