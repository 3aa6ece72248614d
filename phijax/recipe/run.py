"""`python -m phijax.recipe --gin_file=gin/recipes/cpu_demo.gin [--out_dir=DIR] [--dry_run]`: the
phi-1 recipe end to end, one resumable command from raw code to a scored model and its report.

Stages (phijax/recipe/stages.py): teacher -> quality_filter -> textbooks, exercises,
mined_exercises -> decontaminate -> pretrain -> finetune -> evaluate -> report, each in
``<out_dir>/<stage>/`` with a marker holding the fingerprint of its settings and inputs. A
rerun skips complete stages, resumes an unfinished one where its tool left it (ledgers,
checkpoints), and redoes a stage whose settings changed together with the stages that read it.
Kill it at any moment and rerun the same command: nothing saved or paid for is lost.

``--dry_run`` sends nothing and trains nothing: each stage's state (complete / to run / to
resume / settings changed) and, for the generation stages, the requests, tokens and worst-case
cost at the configured prices (the data_gen generators' own estimate).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import gin

from data_gen.llm import lock as lock_lib
from phijax.recipe import config as config_lib
from phijax.recipe import runner, stages
from phijax.recipe.config import RecipeError
from phijax.util import cli, files, gin_config

log = logging.getLogger("phijax.recipe")

OPERATIVE_GIN = "recipe.gin"


def load(gin_files: list[str], gin_params: list[str], out_dir: str | None, search_paths=()) -> stages.Context:
    # --out_dir sets recipes/base.gin's OUT_DIR macro (every recipe gin includes it).
    extra = [f"OUT_DIR = {str(out_dir)!r}"] if out_dir else []
    gin_config.parse(gin_files, [*gin_params, *extra], search_paths)
    gin_config.check_macros_used()
    try:
        recipe = config_lib.Recipe()
    except ValueError as e:
        raise RecipeError(gin_config.explain(e)) from None
    recipe.validate()
    cfgs = {name: config_lib.stage_config(name) for name in (*config_lib.STAGES, *config_lib.EXTRA_SCOPES)}
    ctx = stages.Context(recipe, cfgs, search_paths=tuple(search_paths))
    for name in config_lib.STAGES:  # every gin file a stage names exists (fingerprints read them)
        ctx.fps[name] = stages.fingerprint(ctx, name)
    return ctx


def _prepare(ctx: stages.Context, name: str, state: str, force: bool) -> None:
    d = ctx.dir(name)
    old = runner.read_marker(d)
    if (state == "changed" or force) and d.exists():
        policy = stages.STAGE_DEFS[name].on_change
        if policy == "aside":
            dest = runner.set_aside(d, (old or {}).get("fingerprint", "unknown"))
            log.warning("%s: settings changed; the previous run's directory is kept at %s (delete it when no "
                        "longer needed)", name, dest)
        elif policy == "delete":
            shutil.rmtree(d)


def execute(ctx: stages.Context, until: str | None = None, force: tuple[str, ...] = ()) -> dict:
    """Runs every stage not complete; returns {stage: marker}."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    forced = set()
    for f in force:  # a forced stage reruns, and so do the stages that read it
        forced |= {f} | {s for s in config_lib.STAGES if _downstream(f, s)}
    with lock_lib.hold(ctx.out):
        files.atomic_write_text(ctx.out / OPERATIVE_GIN, gin.config_str())
        try:
            for name in config_lib.STAGES:
                fp = ctx.fps[name]  # computed once, by load()
                if fp == "disabled":
                    log.info("%s: disabled", name)
                    continue
                d = ctx.dir(name)
                state = runner.status(d, fp)
                if state == "complete" and name not in forced:
                    log.info("%s: complete, skipped", name)
                    done[name] = runner.read_marker(d)
                else:
                    _prepare(ctx, name, state, name in forced)
                    prev = runner.read_marker(d) or {}
                    attempts = prev.get("attempts", 0) + 1 if prev.get("fingerprint") == fp else 1
                    record = {"stage": name, "fingerprint": fp, "complete": False, "attempts": attempts,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
                    runner.write_marker(d, record)
                    log.info("%s: %s", name, {"new": "running", "resume": f"resuming (attempt {attempts})",
                                              "changed": "settings changed: running again",
                                              "complete": "forced: running again"}[state])
                    t0 = time.perf_counter()
                    try:
                        summary = stages.STAGE_DEFS[name].run(ctx)
                    except runner.StageFailed as e:  # e.g. the served teacher's failure, named by this stage
                        if e.stage == name:
                            raise
                        raise runner.StageFailed(name, e.rc, f"stage {name}: {e}") from None
                    record.update(complete=True, seconds=round(time.perf_counter() - t0, 1), summary=summary,
                                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
                    runner.write_marker(d, record)
                    done[name] = record
                    log.info("%s: done in %.0f s", name, record["seconds"])
                if name == "exercises" or (name == "textbooks" and not ctx.enabled("exercises")):
                    ctx.stop_teacher()  # the last stage that asks the teacher
                if name == until:
                    break
        finally:
            ctx.stop_teacher()
    return done


def _downstream(a: str, b: str) -> bool:
    """Whether stage b reads (directly or not) from stage a."""
    deps = stages.STAGE_DEFS[b].deps
    return a in deps or any(_downstream(a, d) for d in deps)


def dry_run(ctx: stages.Context) -> dict:
    """Prints what a run would do and what the generation stages would cost; returns it."""
    rows, estimates = [], {}
    label = {"new": "to run", "resume": "to resume", "changed": "settings changed: to run again",
             "complete": "complete"}
    for name in config_lib.STAGES:
        fp = ctx.fps[name]
        state = "disabled" if fp == "disabled" else runner.status(ctx.dir(name), fp)
        rows.append((name, label.get(state, state)))
    print(f"recipe {ctx.recipe.title!r} -> {ctx.out}")
    for name, state in rows:
        print(f"  {name:<16} {state}")
    print("generation (nothing is sent):")
    total = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0.0, "batch_usd": 0.0}
    priced = True
    for name in config_lib.GENERATION_STAGES:
        if not ctx.enabled(name):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "estimate.json")
            ctx.run(name, stages.GENERATION_MODULES[name],
                    stages.generation_args(ctx, name) + ["--dry_run", f"--estimate_json={path}"],
                    log_path=Path(tmp, "dry_run.log"))  # a dry run writes nothing under out_dir
            est = json.loads(path.read_text())
        estimates[name] = est
        free = ctx.recipe.served_teacher
        cost = ("free: phijax.serve on this machine" if free else
                f"at most ${est['worst_case_usd']:,.2f} online, ${est['batch_worst_case_usd']:,.2f} with the Batch API"
                if est["priced"] else f"unknown: no price for {est['model']!r} in data_gen.EngineConfig.prices")
        print(f"  {name:<10} {est['model']}: {est['n_requests']:,} requests ({est['n_to_send']:,} to send), "
              f"prompt ≈ {_tok(est['prompt_tokens'])} tokens, completion ≤ {_tok(est['max_completion_tokens'])} "
              f"tokens ({est['max_tokens']} per request); cost {cost}")
        total["requests"] += est["n_to_send"]
        total["prompt_tokens"] += est["prompt_tokens"]
        total["completion_tokens"] += est["max_completion_tokens"]
        total["usd"] += est["worst_case_usd"]
        total["batch_usd"] += est["batch_worst_case_usd"]
        priced &= est["priced"] or free
    if ctx.enabled("quality_filter"):
        print("  (the quality filter's LLM annotation, when an endpoint is configured, is not included: "
              "python -m data_gen.annotate --dry_run prices it once its input exists)")
    if estimates:
        cost = ("free (served locally)" if ctx.recipe.served_teacher else
                f"at most ${total['usd']:,.2f} online, ${total['batch_usd']:,.2f} with the Batch API" if priced
                else "unknown (a model has no price)")
        print(f"  total      {total['requests']:,} requests, prompt ≈ {_tok(total['prompt_tokens'])}, completion ≤ "
              f"{_tok(total['completion_tokens'])} tokens; cost {cost}")
    return {"stages": dict(rows), "estimates": estimates, "total": total}


def _tok(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0].split(": ", 1)[-1], exit_codes=cli.INCOMPLETE_CODES)
    gin_config.add_gin_flags(p)
    p.add_argument("--out_dir", help="the run's directory (default: the recipe gin's OUT_DIR)")
    p.add_argument("--dry_run", action="store_true", help="print each stage's state and the generation cost; "
                   "send and train nothing")
    p.add_argument("--until", choices=config_lib.STAGES, help="stop after this stage")
    p.add_argument("--force", nargs="+", default=(), choices=config_lib.STAGES, metavar="STAGE",
                   help="run these stages (and the ones that read them) again even if complete")
    p.add_argument("--quiet", action="store_true", help="stage output only in <stage>/recipe.log, not on stderr")
    args = p.parse_args(argv)
    cli.setup_logging()
    try:
        ctx = load(args.gin_file, args.gin_param, args.out_dir, args.gin_search_path)
        ctx.echo = not args.quiet
        if args.dry_run:
            dry_run(ctx)
            return cli.EXIT_OK
        t0 = time.perf_counter()
        execute(ctx, until=args.until, force=tuple(args.force))
    except (RecipeError, gin_config.GinError) as e:
        return cli.fail(e)
    except runner.StageFailed as e:
        code = e.rc if e.rc in (cli.EXIT_BAD_INPUT, cli.EXIT_INCOMPLETE, cli.EXIT_INTERRUPTED) else cli.EXIT_FAILED
        print(f"{'error' if code != cli.EXIT_INCOMPLETE else 'incomplete'}: {e}\n"
              f"rerun the same command to continue from stage {e.stage}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted: every finished stage and what the running one saved are kept; rerun the same "
              "command to resume", file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    report = ctx.dir("report") / "report.md"
    print(f"done in {time.perf_counter() - t0:.0f} s" + (f": {report}" if report.is_file() else ""))
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
