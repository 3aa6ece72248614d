"""The recipe's stages: what each one reads, runs and leaves in ``<out_dir>/<stage>/``.

    teacher          phijax.train              (Recipe.teacher = 'train') the model phijax.serve serves
    quality_filter   data_gen.quality_filter   raw code -> decontaminate/clean/ (filtered code)
    textbooks        data_gen.textbook         the teacher's textbook sections -> shards/
    exercises        data_gen.exercises        the teacher's exercises, run in the sandbox -> shards/
    mined_exercises  data_gen.mine_exercises   exercises from the filtered code's documented functions
    decontaminate    data_gen.decontaminate    everything generated or mined vs HumanEval + MBPP ->
                                               textbooks/clean/, exercises.jsonl (the fine-tuning set)
    pretrain         phijax.train              filtered code + textbooks (the CodeTextbook mixture)
    finetune         phijax.train              exercises, from the pretraining export
    evaluate         phijax.evaluate (+ .solution_loss)   pass@k; held-out loss of canonical solutions
    report           phijax.recipe.report      report.md, report.json, plots

The recipe passes each child what joins the stages (paths, MODEL_DIR, the tokenizer, the teacher)
as the last gin bindings or flags; everything else comes from the stage's StageConfig.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from data_gen import decontaminate, dedup, stage
from phijax.recipe import config as config_lib
from phijax.recipe import report, runner
from phijax.recipe.config import RecipeError
from phijax.util import files

log = logging.getLogger("phijax.recipe")

EXERCISES_FILE = "exercises.jsonl"  # decontaminate/: the fine-tuning set, every record with its source
DEFAULT_GIN = {"quality_filter": ("data/quality_filter.gin",), "textbooks": ("data/textbook.gin",),
               "exercises": ("data/exercises.gin",), "evaluate": ()}
GENERATION_MODULES = {"textbooks": "data_gen.textbook", "exercises": "data_gen.exercises"}


class Context:
    """One recipe run: its settings, its directories, the tokenizer and the served teacher."""

    def __init__(self, recipe: config_lib.Recipe, stage_cfgs: dict[str, config_lib.StageConfig],
                 echo: bool = True, search_paths: tuple[str, ...] = ()):
        self.recipe, self.cfg, self.echo = recipe, stage_cfgs, echo
        self.search_paths = tuple(os.path.abspath(p) for p in search_paths)  # --gin_search_path, for children too
        self.out = Path(recipe.out_dir).expanduser().resolve()
        self.fps: dict[str, str] = {}
        self._tokenizer: str | None = None
        self._teacher: tuple[Any, dict] | None = None

    def dir(self, name: str) -> Path:
        return self.out / name

    def enabled(self, name: str) -> bool:
        if name == "teacher":
            return self.recipe.teacher == "train" and self.cfg[name].enabled
        if name == "pruned":
            return bool(self.recipe.prune_taus) and self.cfg[name].enabled
        return self.cfg[name].enabled

    @property
    def tokenizer(self) -> str:
        """The training tokenizer.json (the stdlib BPE is trained once and cached)."""
        if self._tokenizer is None:
            if self.recipe.tokenizer:
                self._tokenizer = str(Path(self.recipe.tokenizer).expanduser().resolve())
            else:
                from phijax.data import vocab

                self._tokenizer = str(vocab.stdlib_tokenizer_path(self.recipe.vocab_size))
        return self._tokenizer

    def tokenizer_key(self) -> str:
        return (f"file:{files.file_fingerprint(self.tokenizer)}" if self.recipe.tokenizer
                else f"stdlib-bpe:{self.recipe.vocab_size}")

    # --- the teacher -------------------------------------------------------------------------
    def teacher_name(self) -> str:
        """The served teacher's model name: its fingerprint, so that a retrained teacher's requests
        are new ones (the generators' ledgers key answers by model + prompt)."""
        fp = self.fps.get("teacher")
        return f"teacher-{(fp if fp and fp != 'disabled' else runner.digest(self.recipe.teacher))[:8]}"

    def teacher_model(self) -> str:
        if self.recipe.teacher == "train":
            return str(self.dir("teacher") / "export")
        return self.recipe.teacher.removeprefix("serve:")

    def teacher_env(self) -> dict[str, str]:
        """The env that points data_gen at the teacher: {} for 'endpoint' (the user's own
        OPENAI_BASE_URL / gin), else phijax.serve started now (once) on loopback."""
        if not self.recipe.served_teacher:
            return {}
        if self._teacher is None:
            cm = runner.served_model(self.teacher_model(), self.teacher_name(), self.tokenizer,
                                     self.dir("teacher_server") / runner.LOG_FILE, self.recipe.serve_args)
            self._teacher = (cm, cm.__enter__())
        return self._teacher[1]

    def stop_teacher(self) -> None:
        if self._teacher is not None:
            cm, self._teacher = self._teacher[0], None
            cm.__exit__(None, None, None)

    # --- children ----------------------------------------------------------------------------
    def gin_args(self, name: str, joins: list[str]) -> list[str]:
        """--gin_file / --gin_param flags: the stage's gin files and params, then the recipe's joins
        (last, so that they hold)."""
        c = self.cfg[name]
        gin_files = c.gin_files or DEFAULT_GIN.get(name, ())
        if not gin_files and name in config_lib.TRAINING_STAGES:
            raise RecipeError(f"{name}/phijax.recipe.StageConfig.gin_files is not set: name the experiment gin "
                              f"(e.g. experiments/phi1_{'finetune' if name == 'finetune' else 'pretrain'}.gin)")
        return ([f"--gin_search_path={p}" for p in self.search_paths] + [f"--gin_file={f}" for f in gin_files]
                + [f"--gin_param={p}" for p in c.gin_params] + [f"--gin_param={p}" for p in joins])

    def run(self, name: str, module: str, args: list[str], env: dict[str, str] | None = None,
            log_path: Path | None = None) -> None:
        runner.run_child(name, module, args, log_path or self.dir(name) / runner.LOG_FILE, env=env, echo=self.echo)


def _q(s: str | os.PathLike) -> str:
    """A Python/gin string literal."""
    return repr(str(s))


# --- the stages -------------------------------------------------------------------------------
def run_teacher(ctx: Context) -> dict:
    d = ctx.dir("teacher")
    ctx.run("teacher", "phijax.train", ctx.gin_args("teacher", [f"MODEL_DIR = {_q(d)}"]))
    if not (d / "export" / "export_info.json").is_file():
        raise RecipeError(f"teacher: no export in {d / 'export'} (train.export_dtype must not be None)")
    return {"export": str(d / "export")}


def code_dir(ctx: Context) -> Path:
    return ctx.dir("quality_filter") / "decontaminate" / "clean"


def run_quality_filter(ctx: Context) -> dict:
    d = ctx.dir("quality_filter")
    extra = ", ".join(map(_q, ctx.recipe.extra_bench_files()))
    ctx.run("quality_filter", "data_gen.quality_filter",
            ctx.gin_args("quality_filter", [f"OUT_DIR = {_q(d)}", f"SOURCE = {_q(ctx.recipe.source)}",
                                            f"data_gen.DecontamStage.extra_bench = [{extra}]"]))
    report = json.loads((d / "report.json").read_text())
    kept = runner.shard_files(code_dir(ctx))
    return {"documents": runner.count_records(kept), "shards": len(kept), "stages": len(report.get("stages", []))}


def generation_args(ctx: Context, name: str) -> list[str]:
    """A generator's flags (the run and its dry run alike): with a served teacher, its model name and
    base_url None (the env's OPENAI_BASE_URL, which points at it)."""
    joins = []
    if ctx.recipe.served_teacher:
        joins = [f"data_gen.EngineConfig.model = {_q(ctx.teacher_name())}", "data_gen.EngineConfig.base_url = None",
                 "data_gen.EngineConfig.api_key_env = 'OPENAI_API_KEY'"]
    return ctx.gin_args(name, joins) + [f"--out_dir={ctx.dir(name)}"]


def run_generation(ctx: Context, name: str) -> dict:
    d = ctx.dir(name)
    ctx.run(name, GENERATION_MODULES[name], generation_args(ctx, name), env=ctx.teacher_env())
    stats = json.loads((d / "stats.json").read_text())
    return {"accepted": stats["n_accepted"], "requests": stats["n_requests"], "rejects": stats["rejects"]}


def run_mined(ctx: Context) -> dict:
    d = ctx.dir("mined_exercises")
    ctx.run("mined_exercises", "data_gen.mine_exercises",
            ["--inputs", str(code_dir(ctx)), "--out_dir", str(d), *ctx.cfg["mined_exercises"].args])
    r = json.loads((d / "report.json").read_text())
    return {"kept": r["kept"], "documents": r["n_documents"]}


def decontam_inputs(ctx: Context) -> list[tuple[str, str, list[Path]]]:
    """(name, text field, shard files) of what the decontaminate stage cleans."""
    out = []
    if ctx.enabled("textbooks"):
        out.append(("textbooks", "text", runner.shard_files(ctx.dir("textbooks") / "shards")))
    if ctx.enabled("exercises"):
        out.append(("exercises", "prompt+solution", runner.shard_files(ctx.dir("exercises") / "shards")))
    if ctx.enabled("mined_exercises"):
        out.append(("mined_exercises", "prompt+solution", runner.shard_files(ctx.dir("mined_exercises") / "shards")))
    return out


def run_decontaminate(ctx: Context) -> dict:
    d = ctx.dir("decontaminate")
    summary: dict[str, Any] = {}
    for name, field, shards in decontam_inputs(ctx):
        n = runner.count_records(shards)
        if n == 0:  # nothing to clean: an empty clean set (the report says so)
            (d / name / "clean").mkdir(parents=True, exist_ok=True)
            files.save_json(d / name / "report.json", {"docs": 0, "kept": 0, "removed": 0, "empty_input": True})
            summary[name] = {"docs": 0, "kept": 0}
            continue
        ctx.run("decontaminate", "data_gen.decontaminate",
                ["--inputs", *map(str, shards), "--text_field", field, "--out_dir", str(d / name),
                 *(["--extra_bench", *ctx.recipe.extra_bench_files()] if ctx.recipe.extra_bench_files() else []),
                 *ctx.cfg["decontaminate"].args])
        r = json.loads((d / name / "report.json").read_text())
        summary[name] = {"docs": r["docs"], "kept": r["kept"]}
    summary["exercises_total"] = merge_exercises([d / n / "clean" for n in ("exercises", "mined_exercises")],
                                                 d / EXERCISES_FILE)
    return summary


def merge_exercises(dirs: list[Path], out: Path) -> int:
    """The fine-tuning set: generated then mined, in shard order, each record naming its source."""
    recs = []
    for r in runner.read_jsonl([p for d in dirs for p in runner.shard_files(d)]):
        r.setdefault("source", f"generated:{r.get('model', 'teacher')}")
        recs.append(r)
    files.atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return len(recs)


def textbook_sources(ctx: Context) -> list[str]:
    d = ctx.dir("decontaminate") / "textbooks" / "clean"
    return [str(d)] if ctx.enabled("textbooks") and runner.count_records(runner.shard_files(d)) else []


def run_pretrain(ctx: Context) -> dict:
    return pretrain(ctx, "pretrain", "pretrain", ctx.dir("pretrain"), code_dir(ctx), textbook_sources(ctx))


def run_finetune(ctx: Context) -> dict:
    return finetune(ctx, "finetune", "finetune", ctx.dir("finetune"), ctx.dir("decontaminate") / EXERCISES_FILE,
                    ctx.dir("pretrain") / "export")


def pretrain(ctx: Context, stage: str, cfg: str, model_dir: Path, code: Path, textbooks: list[str]) -> dict:
    """phijax.train with StageConfig `cfg` on the CodeTextbook mixture of `code` + `textbooks`."""
    if not runner.count_records(runner.shard_files(code)):
        raise RecipeError(f"{stage}: no code to pretrain on ({code} is empty): loosen data_gen.FilterConfig or "
                          f"give a larger source")
    joins = [f"MODEL_DIR = {_q(model_dir)}", f"CODE_SOURCES = [{_q(code)}]",
             f"TEXTBOOK_SOURCES = [{', '.join(map(_q, textbooks))}]", f"TOKENIZER = {_q(ctx.tokenizer)}",
             "phijax.tasks.register_codetextbook.content_field = 'text'"]  # data_gen's records hold 'text'
    ctx.run(stage, "phijax.train", ctx.gin_args(cfg, joins))
    return _training_summary(model_dir)


def finetune(ctx: Context, stage: str, cfg: str, model_dir: Path, exercises: Path, pretrained: Path) -> dict:
    """phijax.train with StageConfig `cfg` on the exercises JSONL, from the `pretrained` export."""
    if not runner.count_records([exercises]):
        raise RecipeError(f"{stage}: no exercises survived generation, mining and decontamination ({exercises} "
                          f"is empty); see the rejects in {ctx.dir('exercises')} and {ctx.dir('mined_exercises')}")
    joins = [f"MODEL_DIR = {_q(model_dir)}", f"EXERCISES = {_q(exercises)}", f"TOKENIZER = {_q(ctx.tokenizer)}",
             f"PRETRAINED = {_q(pretrained)}"]
    ctx.run(stage, "phijax.train", ctx.gin_args(cfg, joins))
    return _training_summary(model_dir)


def _training_summary(d: Path) -> dict:
    losses = [(r["step"], r["loss"]) for r in runner.metrics(d) if "loss" in r]
    return {"first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
            "steps": losses[-1][0] if losses else 0}


def finetuned_model(ctx: Context) -> Path:
    d = ctx.dir("finetune")
    if ctx.recipe.eval_checkpoint == "best" and (d / "best.json").is_file():
        return Path(json.loads((d / "best.json").read_text())["export"])
    return d / "export"


def eval_runs(ctx: Context) -> list[dict]:
    """Each phijax.evaluate run of the stage: {label, model, benchmark, output_dir, params}."""
    r = ctx.recipe
    models = [("finetuned", None)] + ([("pretrained", ctx.dir("pretrain") / "export")] if r.evaluate_pretrained else [])
    out = []
    for label, model in models:
        for b in r.benchmarks:
            out.append({"label": label, "model": model, "benchmark": b, "kind": "greedy",
                        "output_dir": ctx.dir("evaluate") / f"{label}_{b}", "params": []})
            if r.pass_at_k_samples > 1:
                out.append({"label": label, "model": model, "benchmark": b, "kind": "sampled",
                            "output_dir": ctx.dir("evaluate") / f"{label}_{b}_sampled",
                            "params": [f"evaluate.num_samples = {r.pass_at_k_samples}",
                                       f"evaluate.temperature = {r.pass_at_k_temperature}",
                                       f"evaluate.ks = {list(r.pass_at_k_ks)}"]})
    return out


def evaluate(ctx: Context, stage: str, model: Path, benchmark: str, output_dir: Path, params=()) -> dict:
    """phijax.evaluate of `model` on `benchmark` (the evaluate StageConfig's gin, then the recipe's
    eval_params for it, then `params`); returns its pass@k figures."""
    c = ctx.cfg["evaluate"]
    args = ([f"--gin_search_path={p}" for p in ctx.search_paths]
            + [f"--gin_file=eval/{benchmark}.gin", *[f"--gin_file={f}" for f in c.gin_files]]
            + [f"--gin_param={p}" for p in (*c.gin_params, *ctx.recipe.eval_params.get(benchmark, ()), *params,
                                            f"evaluate.model_path = {_q(model)}",
                                            f"evaluate.tokenizer_path = {_q(ctx.tokenizer)}",
                                            f"evaluate.output_dir = {_q(output_dir)}")])
    ctx.run(stage, "phijax.evaluate", args)
    s = json.loads((output_dir / "summary.json").read_text())
    return {k: v for k, v in s.items() if k.startswith("pass@")}


def solution_loss(ctx: Context, stage: str, model: Path, benchmark: str, path: Path) -> float:
    ctx.run(stage, "phijax.evaluate.solution_loss",
            ["--model", str(model), "--tokenizer", ctx.tokenizer, "--benchmark", benchmark, "--out", str(path)])
    return json.loads(path.read_text())["loss"]


def run_evaluate(ctx: Context) -> dict:
    summary = {}
    for e in eval_runs(ctx):
        summary[e["output_dir"].name] = evaluate(ctx, "evaluate", e["model"] or finetuned_model(ctx), e["benchmark"],
                                                 e["output_dir"], e["params"])
    for b in ctx.recipe.solution_loss:
        for label, model in (("pretrained", ctx.dir("pretrain") / "export"), ("finetuned", ctx.dir("finetune") / "export")):
            path = ctx.dir("evaluate") / f"solution_loss_{label}_{b}.json"
            summary[path.stem] = solution_loss(ctx, "evaluate", model, b, path)
    return summary


def pruned_variants(ctx: Context) -> list[float | None]:
    """The runs of the pruned-data experiment: each τ, and an unpruned baseline (None) when the
    experiment trains its own (smaller) models; otherwise the main run is the baseline."""
    own = bool(ctx.cfg["pruned_pretrain"].gin_files)
    return ([None] if own else []) + list(ctx.recipe.prune_taus)


def pruned_label(tau: float | None) -> str:
    return "unpruned" if tau is None else f"tau_{tau}"


def run_pruned(ctx: Context) -> dict:
    """Paper §5: for each τ, the pretraining and fine-tuning data less everything decontamination
    flags at AST match >= τ against `Recipe.prune_benchmarks`, retrained and scored."""
    r = ctx.recipe
    own = bool(ctx.cfg["pruned_pretrain"].gin_files)
    cfgs = ("pruned_pretrain", "pruned_finetune") if own else ("pretrain", "finetune")
    summary = {}
    for tau in pruned_variants(ctx):
        vd = ctx.dir("pruned") / pruned_label(tau)
        fp = runner.digest({"pruned": ctx.fps["pruned"], "tau": tau})
        if runner.status(vd, fp) == "complete":  # a kill between two τ keeps the finished ones
            summary[vd.name] = runner.read_marker(vd)["summary"]
            continue
        runner.write_marker(vd, {"fingerprint": fp, "complete": False})
        data, counts = vd / "data", {}
        if tau is None:
            code, textbooks, exercises = code_dir(ctx), textbook_sources(ctx), ctx.dir("decontaminate") / EXERCISES_FILE
        else:
            qf = ctx.dir("quality_filter")
            counts["code"] = decontaminate.prune(runner.shard_files(qf / "filter" / "shards"), "text",
                                                 qf / "decontaminate" / "flagged.jsonl", data / "code", tau,
                                                 r.prune_benchmarks)
            code, textbooks, ex_dirs = data / "code", [], []
            for name, field, shards in decontam_inputs(ctx):
                if not runner.count_records(shards):
                    continue
                counts[name] = decontaminate.prune(shards, field, ctx.dir("decontaminate") / name / "flagged.jsonl",
                                                   data / name, tau, r.prune_benchmarks)
                if name == "textbooks":
                    textbooks = [str(data / name)] if counts[name]["kept"] else []
                else:
                    ex_dirs.append(data / name)
            exercises = data / EXERCISES_FILE
            merge_exercises(ex_dirs, exercises)
        pretrain(ctx, "pruned", cfgs[0], vd / "pretrain", code, textbooks)
        finetune(ctx, "pruned", cfgs[1], vd / "finetune", exercises, vd / "pretrain" / "export")
        result = {"tau": tau, "data": counts, "training": _training_summary(vd / "finetune")}
        for b in r.prune_benchmarks:
            result[b] = evaluate(ctx, "pruned", vd / "finetune" / "export", b, vd / "evaluate" / b)
            if b in r.solution_loss:
                result[f"solution_loss_{b}"] = solution_loss(ctx, "pruned", vd / "finetune" / "export", b,
                                                             vd / "evaluate" / f"solution_loss_{b}.json")
        runner.write_marker(vd, {"fingerprint": fp, "complete": True, "summary": result})
        summary[vd.name] = result
    return summary


def run_report(ctx: Context) -> dict:
    manifest = {"title": ctx.recipe.title, "note": ctx.recipe.note, "source": ctx.recipe.source,
                "teacher": ctx.recipe.teacher, "tokenizer": ctx.tokenizer,
                "dirs": {s: str(ctx.dir(s)) for s in config_lib.STAGES},
                "enabled": {s: ctx.enabled(s) for s in config_lib.STAGES},
                "decontaminated": [name for name, _, _ in decontam_inputs(ctx)],
                "exercises_file": str(ctx.dir("decontaminate") / EXERCISES_FILE),
                "eval_runs": [dict(e, output_dir=str(e["output_dir"]), model=None) for e in eval_runs(ctx)],
                "solution_loss": list(ctx.recipe.solution_loss),
                "pruned": [pruned_label(t) for t in pruned_variants(ctx)] if ctx.enabled("pruned") else [],
                "prune_benchmarks": list(ctx.recipe.prune_benchmarks)}
    r = report.write(ctx.dir("report"), manifest)
    return {"report": str(ctx.dir("report") / report.REPORT_MD), "pass_at_1": r.get("pass_at_1", {})}


# --- the table ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageDef:
    name: str
    deps: tuple[str, ...]
    run: Callable[[Context], dict]
    key: Callable[[Context], dict]  # the recipe settings (beyond its StageConfig) the stage reads
    # Changed settings: 'aside' moves the old directory to <out>/stale/ (what was trained or scored is
    # kept), 'delete' removes it (cheap to redo), None reruns in place (the tool resumes by content:
    # the quality filter's stage markers, the generators' ledgers, the miner's fingerprint).
    on_change: str | None = None


def _teacher_key(ctx: Context) -> dict:
    r = ctx.recipe
    # Not serve_args: phijax.serve's answers do not depend on its slots or batching.
    return {"teacher": r.teacher, "tokenizer": ctx.tokenizer_key() if r.served_teacher else None}


def _bench_key(ctx: Context) -> dict:
    return {"extra_bench": [(Path(p).name, files.file_fingerprint(p)) for p in ctx.recipe.extra_bench_files()]}


def _source_key(ctx: Context) -> dict:
    src = ctx.recipe.source
    if src == "stdlib":
        return {"source": src, "python": sys.version, **_bench_key(ctx)}
    kind, _, path = src.partition(":")
    try:  # the files' names, sizes and mtimes: an edited corpus reruns the chain
        found = dedup.expand_inputs([path]) if kind in ("jsonl", "parquet") else sorted(Path(path).rglob("*.py"))
    except Exception:  # noqa: BLE001 (the quality filter names a bad source itself)
        found = []
    return {"source": src, "files": stage.fingerprint(found, {}), **_bench_key(ctx)}


STAGE_DEFS: dict[str, StageDef] = {s.name: s for s in [
    StageDef("teacher", (), run_teacher, lambda c: {"tokenizer": c.tokenizer_key()}, on_change="aside"),
    StageDef("quality_filter", (), run_quality_filter, _source_key),
    StageDef("textbooks", ("teacher",), lambda c: run_generation(c, "textbooks"), _teacher_key),
    StageDef("exercises", ("teacher",), lambda c: run_generation(c, "exercises"), _teacher_key),
    StageDef("mined_exercises", ("quality_filter",), run_mined, lambda c: {}),
    StageDef("decontaminate", ("textbooks", "exercises", "mined_exercises"), run_decontaminate, _bench_key,
             on_change="delete"),
    StageDef("pretrain", ("quality_filter", "decontaminate"), run_pretrain,
             lambda c: {"tokenizer": c.tokenizer_key()}, on_change="aside"),
    StageDef("finetune", ("pretrain", "decontaminate"), run_finetune,
             lambda c: {"tokenizer": c.tokenizer_key()}, on_change="aside"),
    StageDef("evaluate", ("pretrain", "finetune"), run_evaluate,
             lambda c: {k: getattr(c.recipe, k) for k in (
                 "benchmarks", "evaluate_pretrained", "eval_checkpoint", "eval_params", "pass_at_k_samples",
                 "pass_at_k_temperature", "pass_at_k_ks", "solution_loss")}, on_change="aside"),
    StageDef("pruned", ("quality_filter", "decontaminate", "pretrain", "finetune"), run_pruned,
             lambda c: {"taus": c.recipe.prune_taus, "benchmarks": c.recipe.prune_benchmarks,
                        "solution_loss": c.recipe.solution_loss, "eval_params": c.recipe.eval_params,
                        "evaluate": dataclasses.asdict(c.cfg["evaluate"]),
                        "own": [(dataclasses.asdict(c.cfg[n]), runner.gin_digest(c.cfg[n].gin_files, c.cfg[n].gin_params,
                                                                                  c.search_paths))
                                for n in config_lib.EXTRA_SCOPES],
                        "tokenizer": c.tokenizer_key()}, on_change="aside"),
    StageDef("report", tuple(s for s in config_lib.STAGES if s != "report"), run_report,
             lambda c: {"title": c.recipe.title, "note": c.recipe.note}, on_change="delete"),
]}
assert tuple(STAGE_DEFS) == config_lib.STAGES


def fingerprint(ctx: Context, name: str) -> str:
    """The stage's settings + what it reads from the recipe + its inputs' fingerprints."""
    if not ctx.enabled(name):
        return "disabled"
    s = STAGE_DEFS[name]
    c = ctx.cfg[name]
    gin_files = c.gin_files or DEFAULT_GIN.get(name, ())
    return runner.digest({"stage": name, "config": dataclasses.asdict(c), "key": s.key(ctx),
                          "gin": runner.gin_digest(gin_files, c.gin_params, ctx.search_paths),
                          "deps": {d: ctx.fps[d] for d in s.deps}})


