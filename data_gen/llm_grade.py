"""LLM grading of an evaluation's completions (phi-1, section 3: unconventional problems graded 0-10).

    phijax evaluate --gin_file=gin/eval/unseen.gin --gin_param="evaluate.endpoint = ..."   # execution first
    phijax llm-grade --results runs/eval/unseen --out_dir runs/eval/unseen/grade           # then the grader
    phijax llm-grade --results ... --out_dir ... --dry_run                                 # tokens, cost

phi-1 graded 50 new problems with GPT-4 on a 0-10 rubric beside execution, to see whether the
score agrees with pass/fail. Here, for every (problem, completion) of an evaluate run
(``--results``: its output_dir, its ``*_results.jsonl``, or a samples file, which is then run
in the sandbox first), one chat request with the rubric prompt gin/eval/grade_prompt.txt
(problem statement, reference solution, the candidate; correctness, edge cases, style) goes
through the generation engine (data_gen/llm: ledger, retries on 5xx / malformed bodies, rate
limits, budget cap). The answer must hold ``{"score": <int 0-10>, "reason": "..."}``; an
unparseable or out-of-range answer is asked again (another seed and a note) up to
``max_parse_retries`` times, then recorded with a null score and why -- never guessed.

Placement: this is data_gen (layer 4 of docs/architecture.md), not phijax.evaluate (layer 3),
because it drives data_gen.llm's engine and phijax.evaluate must not import data_gen
(tests/test_layering.py); it reads phijax.evaluate's problems and results (a downward import).

No endpoint configured (no ``data_gen.EngineConfig.base_url``, $OPENAI_BASE_URL or API key):
the grading is SKIPPED with one line and exit 0; nothing is written and no grade is made up.

Output (``out_dir``)::

    grades.jsonl   per solution: task_id, sample (index within the task), score (0-10 or null),
                   reason (the grader's, or why there is no score), status (graded | unparseable
                   | out_of_range | ... | request_failed | pending), grader, passed, attempts
    grade.json     mean score, histogram, execution pass rate, their agreement, engine counts
    grade.md       the same as a report
    ledger.sqlite, responses.jsonl   the engine's: a rerun sends only what is not answered yet

Exit codes: 0 graded (or skipped: no endpoint), 2 bad input (nothing sent), 3 incomplete (the
budget cap or exhausted retries left solutions ungraded: rerun to continue), 130 interrupted.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from data_gen import annotate, generator, ingest, stage
from data_gen.llm import engine as engine_lib
from data_gen.llm import ledger as ledger_lib
from data_gen.llm import lock as lock_lib
from data_gen.llm.request import Request, messages_from
from phijax.evaluate import execution
from phijax.evaluate import problems as problems_lib

log = logging.getLogger(__name__)

GRADES_FILE = "grades.jsonl"
SUMMARY_FILE = "grade.json"
REPORT_FILE = "grade.md"
TEMPLATE_FIELDS = ("problem", "reference", "candidate")
MAX_SCORE = 10
PASS_SCORE = 5  # agreement: score >= PASS_SCORE counts as the grader's "pass"
SKIP_LINE = ("llm-grade: SKIPPED: no grader endpoint configured (set data_gen.EngineConfig.base_url, "
             "$OPENAI_BASE_URL, or an API key in ${env} for api.openai.com); nothing was graded")


class GradeError(generator.GeneratorError):
    """Bad input or setting, found before any request is sent (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class GradeConfig(annotate.JsonAnswerSettings):  # + max_tokens, temperature, send_seed, json_mode, retries
    prompt_template_file: str = "gin/eval/grade_prompt.txt"   # {problem}, {reference}, {candidate}
    system_prompt: str | None = "You are a strict, fair grader of Python solutions. You answer in JSON."
    max_solution_chars: int = 8000   # of the candidate shown (longer: cut, and the prompt says so)
    max_tokens: int = 300

    def validate(self) -> None:
        if self.max_solution_chars < 1:
            raise GradeError(f"max_solution_chars must be >= 1, got {self.max_solution_chars}")
        self.check_answer_settings(GradeError)


GradeConfig = ingest.gin_register(GradeConfig, __name__)


# --- the answer ---------------------------------------------------------------------------
def parse_grade(text: str) -> tuple[int, str]:
    """(score 0-10, reason) from an answer; annotate.AnswerError(reason code) if there is none."""
    objs = list(annotate._json_objects(text or ""))
    if not objs:
        raise annotate.AnswerError("unparseable", "no JSON object in the answer")
    obj = next((o for o in objs if "score" in o), None)
    if obj is None:
        raise annotate.AnswerError("missing_score", f"keys {sorted(objs[0])[:5]}")
    v = obj["score"]
    if (isinstance(v, str) and v.strip().lstrip("-").isdigit()) or (isinstance(v, float) and v.is_integer()):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise annotate.AnswerError("not_integer", repr(v)[:40])
    if not 0 <= v <= MAX_SCORE:
        raise annotate.AnswerError("out_of_range", f"{v} not in [0, {MAX_SCORE}]")
    reason = obj.get("reason")
    return v, reason.strip() if isinstance(reason, str) else ""


# --- the input ----------------------------------------------------------------------------
def _benchmark_of(task_id: str) -> str:
    prefix = task_id.split("/", 1)[0].lower()
    bench = {"humaneval": "humaneval", "mbpp": "mbpp", "unseen": "unseen"}.get(prefix)
    if bench is None:
        raise GradeError(f"cannot tell the benchmark of task_id {task_id!r}")
    return bench


def read_results(path: str | os.PathLike) -> tuple[list[dict], str, str, str]:
    """(rows, benchmark, prompt_format, the file read) from an evaluate output_dir (its
    summary.json names the results), a ``*_results.jsonl`` or a samples file."""
    p, summary = Path(path), {}
    if p.is_dir():
        if (p / "summary.json").is_file():
            summary = json.loads((p / "summary.json").read_text(encoding="utf-8"))
        cand = summary.get("results_path")
        if not cand:
            found = sorted(glob.glob(str(p / "*_results.jsonl")))
            if len(found) != 1:
                raise GradeError(f"{p}: expected summary.json or exactly one *_results.jsonl, found {len(found)}")
            cand = found[0]
        p = Path(cand) if os.path.isabs(cand) else (p / cand if (p / cand).is_file() else Path(cand))
    if not p.is_file():
        raise GradeError(f"--results {str(path)!r}: no such file or evaluate output_dir")
    try:
        rows = execution.read_samples(p)
    except ValueError as e:
        raise GradeError(f"{p}: {e}") from None
    if not rows:
        raise GradeError(f"{p}: no samples")
    bench = summary.get("benchmark") or _benchmark_of(rows[0]["task_id"])
    fmt = summary.get("prompt_format") or problems_lib.DEFAULT_FORMAT.get(bench)
    try:
        problems_lib.check_format(bench, fmt)
    except ValueError as e:
        raise GradeError(str(e)) from None
    return rows, bench, fmt, str(p)


def _problems_for(rows: list[dict], bench: str, fmt: str) -> dict[str, problems_lib.Problem]:
    by_id = {p.task_id: p for p in problems_lib.load_problems(bench, fmt)}
    unknown = sorted({r["task_id"] for r in rows} - set(by_id))
    if unknown:
        raise GradeError(f"{len(unknown)} task_id(s) are not {bench} problems, e.g. {unknown[:3]}")
    return by_id


# --- requests -----------------------------------------------------------------------------
def endpoint_configured(ecfg: engine_lib.EngineConfig) -> tuple[bool, str]:
    if ecfg.base_url:
        return True, "data_gen.EngineConfig.base_url is set"
    if os.environ.get("OPENAI_BASE_URL"):
        return True, "$OPENAI_BASE_URL is set"
    if engine_lib.api_key_of(ecfg):
        return True, f"${ecfg.api_key_env} is set (api.openai.com)"
    return False, SKIP_LINE.format(env=ecfg.api_key_env)


def _statement(p: problems_lib.Problem) -> str:
    """What the solver was asked: the prompt (for the MBPP few-shot format, its last task only)."""
    if p.prompt_format == "mbpp_3shot":
        return p.prompt.rsplit("You are an expert Python programmer", 1)[-1].strip()
    return p.prompt.strip()


class Prompter:
    """(row index, problem, completion, attempt) -> chat Request. The key covers the model, the
    messages (problem, reference, candidate), the sampling parameters and the attempt, so a
    rerun rebuilds the same requests and finds every answered one in the ledger."""

    def __init__(self, cfg: GradeConfig, model: str):
        self.cfg, self.model = cfg, model
        self.template = generator.read_template(cfg.prompt_template_file, TEMPLATE_FIELDS)
        if "{candidate}" not in self.template:
            raise GradeError(f"{cfg.prompt_template_file}: the prompt must contain {{candidate}}")

    def request(self, index: int, p: problems_lib.Problem, completion: str, attempt: int) -> Request:
        cand = (p.completion_prefix + completion).rstrip()
        if len(cand) > self.cfg.max_solution_chars:
            cand = cand[:self.cfg.max_solution_chars] + "\n# ... (the solution is longer; cut here)"
        user = self.template.format(problem=_statement(p), reference=(p.completion_prefix + p.canonical_solution).rstrip(),
                                    candidate=cand or "# (empty)").strip()
        if attempt:
            user += "\n\n" + self.cfg.retry_note
        params = annotate.answer_params(self.cfg, f"llm_grade/{p.task_id}/{index}/{attempt}")
        return Request(model=self.model, sample_index=index * 100 + attempt, kind="chat",
                       messages=messages_from(self.cfg.system_prompt, user), params=params,
                       meta={"task_id": p.task_id, "attempt": attempt})


@dataclasses.dataclass
class _Grade:
    attempts: int = 0
    score: int | None = None
    reason: str = ""
    status: str = "pending"
    answer: str | None = None
    key: str = ""


def _grade_all(out: Path, jobs: list[tuple[problems_lib.Problem, str]], cfg: GradeConfig, eng: engine_lib.Engine,
               prompter: Prompter) -> tuple[list[_Grade], list[engine_lib.RunReport], int]:
    """Round k sends attempt k of every solution still without a usable answer (annotate's scheme)."""
    grades = [_Grade() for _ in jobs]
    todo = list(range(len(jobs)))
    reports, parse_retries = [], 0
    for attempt in range(cfg.max_parse_retries + 1):
        if not todo:
            break
        reqs = {i: prompter.request(i, jobs[i][0], jobs[i][1], attempt) for i in todo}
        reports.append(eng.run_sync(iter(reqs.values()), total=len(reqs)))
        answers, failed = ledger_lib.answers_and_failures(out, [r.key for r in reqs.values()])
        nxt = []
        for i in todo:
            g, key = grades[i], reqs[i].key
            g.key, res = key, answers.get(key)
            if res is None:
                if key in failed:  # a 4xx the engine does not resend: final
                    g.attempts, g.status = attempt + 1, "request_failed"
                    g.reason = "request failed: " + eng.redact(failed[key].get("error") or "")[:300]
                continue  # else pending (budget stop, retries exhausted): a rerun sends it
            g.attempts = attempt + 1
            try:
                if res["status"] != "ok":
                    raise annotate.AnswerError(f"not_served_ok:{res['status']}", res.get("error") or "")
                g.score, g.reason = parse_grade(res["text"])
                g.status, g.answer = "graded", None
            except annotate.AnswerError as e:
                g.status, g.answer = e.reason, (res.get("text") or "")[:300]
                g.reason = f"{e.reason} after {g.attempts} attempt(s): {e.detail}; answer starts {g.answer[:120]!r}"
                if attempt < cfg.max_parse_retries:
                    nxt.append(i)
        parse_retries += len(nxt)
        todo = nxt
    return grades, reports, parse_retries


# --- summary ------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> dict[str, Any]:
    scored = [r for r in rows if r["score"] is not None]
    known = [r for r in rows if r["passed"] is not None]
    both = [r for r in scored if r["passed"] is not None]
    hist = collections.Counter(r["score"] for r in scored)

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None
    return {
        "solutions": len(rows), "graded": len(scored),
        "ungraded_by_status": dict(sorted(collections.Counter(r["status"] for r in rows if r["score"] is None).items())),
        "mean_score": mean([r["score"] for r in scored]),
        "histogram": {str(k): hist[k] for k in range(MAX_SCORE + 1)},
        "execution_pass_rate": mean([float(r["passed"]) for r in known]),
        "agreement": {
            "mean_score_passed": mean([r["score"] for r in both if r["passed"]]),
            "mean_score_failed": mean([r["score"] for r in both if not r["passed"]]),
            "n_passed": sum(1 for r in both if r["passed"]), "n_failed": sum(1 for r in both if not r["passed"]),
            "threshold": PASS_SCORE,
            "agree_share": mean([float((r["score"] >= PASS_SCORE) == r["passed"]) for r in both]),
        },
    }


def render_md(summary: dict[str, Any]) -> str:
    def pct(v):
        return "" if v is None else f"{100 * v:.1f}%"
    a = summary["agreement"]
    lines = [f"# LLM grades: {summary['benchmark']} ({summary['grader']})", "",
             f"Results: `{summary['results']}`. Rubric: `{summary['prompt_template']}` (0-10: correctness, "
             "edge cases, style).", "", "| | |", "| --- | --- |",
             f"| solutions | {summary['solutions']} |", f"| graded | {summary['graded']} |",
             f"| ungraded | {', '.join(f'{k}: {v}' for k, v in summary['ungraded_by_status'].items()) or 'none'} |",
             f"| mean score | {summary['mean_score'] if summary['mean_score'] is not None else ''} |",
             f"| execution pass rate | {pct(summary['execution_pass_rate'])} |",
             f"| mean score of passing solutions | {a['mean_score_passed'] if a['mean_score_passed'] is not None else ''} "
             f"(n={a['n_passed']}) |",
             f"| mean score of failing solutions | {a['mean_score_failed'] if a['mean_score_failed'] is not None else ''} "
             f"(n={a['n_failed']}) |",
             f"| score >= {a['threshold']} agrees with execution | {pct(a['agree_share'])} |", "",
             "| score | " + " | ".join(summary["histogram"]) + " |", "|" + " --- |" * (len(summary["histogram"]) + 1),
             "| solutions | " + " | ".join(str(v) for v in summary["histogram"].values()) + " |", ""]
    if not summary["complete"]:
        lines += ["**Incomplete**: some solutions have no answer yet (see grades.jsonl, status `pending`); "
                  "rerun the same command to continue.", ""]
    return "\n".join(lines)


# --- run ------------------------------------------------------------------------------------
def run(results: str | os.PathLike, out_dir: str | os.PathLike, *, config: GradeConfig | None = None,
        engine_config: engine_lib.EngineConfig | None = None, dry_run: bool = False,
        workers: int | None = None) -> dict[str, Any]:
    """Grades the completions in ``results`` into ``out_dir``; returns the summary (``{"skipped":
    True, "line": ...}`` when no endpoint is configured; the estimate with ``dry_run``). Raises
    GradeError / EngineError on bad input before any request is sent."""
    cfg = config if config is not None else GradeConfig()
    cfg.validate()
    ecfg = engine_config if engine_config is not None else engine_lib.EngineConfig()
    rows, bench, fmt, source = read_results(results)
    by_id = _problems_for(rows, bench, fmt)
    prompter = Prompter(cfg, ecfg.model)
    out = Path(out_dir)
    eng = engine_lib.Engine(out, ecfg)
    eng.check_prices([ecfg.model])
    if dry_run:
        est = eng.estimate(prompter.request(i, by_id[r["task_id"]], r["completion"], 0) for i, r in enumerate(rows))
        return {"dry_run": True, "solutions": len(rows), "estimate": dataclasses.asdict(est), "lines": est.lines(),
                "note": "first attempts only; parse retries add to this"}
    ok, why = endpoint_configured(ecfg)
    if not ok:
        return {"skipped": True, "line": why}
    _ = eng.client  # no API key for api.openai.com: an error now
    if any("passed" not in r for r in rows):  # a samples file: run it first
        log.info("llm-grade: %s has no execution results; running the %d solutions in the sandbox", source, len(rows))
        rows = execution.execute(list(by_id.values()), rows, workers=workers)
    with lock_lib.hold(out):
        jobs = [(by_id[r["task_id"]], r["completion"]) for r in rows]
        grades, reports, parse_retries = _grade_all(out, jobs, cfg, eng, prompter)
        pending = [g.key for g in grades if g.status == "pending" or (g.score is None and g.status != "request_failed"
                                                                       and g.attempts <= cfg.max_parse_retries)]
        why_missing: dict[str, int] = {}
        if pending:
            why_missing = dict(ledger_lib.why_missing(out, pending).most_common())
        grader = f"llm:{ecfg.model}"
        seen: collections.Counter = collections.Counter()
        out_rows = []
        for r, g in zip(rows, grades):
            if g.key in pending:
                g.status, g.score = "pending", None
                g.reason = "not graded yet (" + ", ".join(f"{n} {w}" for w, n in why_missing.items()) + "); rerun"
            out_rows.append({"task_id": r["task_id"], "sample": seen[r["task_id"]], "score": g.score,
                             "reason": eng.redact(g.reason), "status": g.status, "grader": grader,
                             "passed": r.get("passed"), "execution_result": r.get("result"), "attempts": g.attempts})
            seen[r["task_id"]] += 1
        summary = {"benchmark": bench, "prompt_format": fmt, "results": source, "grader": grader,
                   "prompt_template": cfg.prompt_template_file, **summarize(out_rows),
                   "parse_retries": parse_retries, "pending": len(pending), "complete": not pending,
                   "engine": annotate._merge_engine(reports), "options": dataclasses.asdict(cfg)}
        stage.write_jsonl(out / GRADES_FILE, out_rows)
        stage.write_json(out / SUMMARY_FILE, summary)
        (out / REPORT_FILE).write_text(render_md(summary), encoding="utf-8")
    log.info("llm-grade: %d of %d solutions graded by %s, mean score %s, %d pending", summary["graded"],
             len(rows), grader, summary["mean_score"], len(pending))
    return summary


# --- CLI -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    from phijax.util import cli, gin_config

    p = cli.ArgumentParser(description="Grade an evaluation's completions 0-10 with an LLM (phi-1's rubric grading).",
                           exit_codes=cli.INCOMPLETE_CODES)
    gin_config.add_gin_flags(p)
    p.add_argument("--results", required=True,
                   help="an evaluate output_dir, its *_results.jsonl, or a samples file (then run in the sandbox)")
    p.add_argument("--out_dir", required=True, help="grades, report, ledger; rerun the same command to resume")
    p.add_argument("--max_parse_retries", type=int)
    p.add_argument("--dry_run", action="store_true", help="estimate tokens and cost; send nothing")
    p.add_argument("--log_level", default="INFO")
    args = p.parse_args(argv)
    try:
        generator.setup(args, "eval/grade.gin")
        ecfg = generator.engine_config(False)  # installs key redaction on the log handlers
        cfg = dataclasses.replace(GradeConfig(), **ingest.flag_overrides(args, ("max_parse_retries",)))
        res = run(args.results, args.out_dir, config=cfg, engine_config=ecfg, dry_run=args.dry_run)
    except (generator.GeneratorError, ingest.IngestError, engine_lib.EngineError) as e:
        return cli.fail(e, prog="llm-grade")
    except KeyboardInterrupt:
        print(f"llm-grade: interrupted: the answers so far are kept in {args.out_dir}; rerun to resume",
              file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    if res.get("skipped"):
        print(res["line"])
        return cli.EXIT_OK
    if args.dry_run:
        print("\n".join([f"solutions to grade: {res['solutions']} ({res['note']})", *res["lines"]]))
        return cli.EXIT_OK
    print(json.dumps({k: res[k] for k in ("benchmark", "grader", "solutions", "graded", "mean_score",
                                          "execution_pass_rate", "pending")} | {"agreement": res["agreement"]}))
    print(f"report: {Path(args.out_dir) / REPORT_FILE}")
    return cli.EXIT_OK if res["complete"] else cli.EXIT_INCOMPLETE


if __name__ == "__main__":
    from data_gen import llm_grade as _llm_grade  # the registered module (see ingest.gin_register)

    sys.exit(_llm_grade.main())
