"""`python -m phijax.evaluate.robustness --model PATH --classes typo,paraphrase,rename,format,funcname`

Robustness to prompt variations (ReCode, Wang et al. 2022): greedy pass@1 on the HumanEval
prompts as shipped (or MBPP's 500 test problems in the ``docstring`` prompt format: --benchmark mbpp) and on seeded perturbations of them (phijax/evaluate/perturb.py), one
generation per perturbed prompt, scored in the sandbox as `phijax evaluate` scores. Reports per class:

* pass@1: the mean over the class's variants (and the worst variant), its absolute and relative
  drop from the unperturbed pass@1;
* robust pass@1 (ReCode's RP_s@1): the share of problems solved under EVERY variant of the class;
  robust drop = (unperturbed - robust) / unperturbed;
* robust change (ReCode's RC_s@1): the share of problems whose outcome under some variant differs
  from the unperturbed one.

Writes to --output_dir: perturbed/<benchmark>_<class>_v<k>.jsonl (the perturbed problems,
HumanEval's schema plus "perturbation"; MBPP's records add benchmark and prompt_format), samples/<set>.jsonl(_results.jsonl), robustness.json and
robustness.md. The model is a Hugging Face Phi directory / hub id / phijax export / MODEL_DIR
(--model) or an OpenAI-compatible endpoint (--endpoint, --endpoint_model).
"""
from __future__ import annotations

import json
import os
import time

from phijax.evaluate import endpoint as endpoint_lib
from phijax.evaluate import execution, perturb, run
from phijax.evaluate import problems as problems_lib

DEFAULT_VARIANTS = 3  # per class and problem (the CLI's default; every one is tested to keep a passing solution)
BENCHMARKS = {"humaneval": ("humaneval",), "mbpp": ("docstring",)}  # benchmark -> prompt formats perturbed
NOMINAL = "nominal"


class RobustnessError(ValueError):
    """A bad option; raised before any model is loaded."""


def perturbed_records(records: list[dict], cls: str, *, seed: int, variant: int) -> list[dict]:
    return [perturb.perturb_record(r, cls, seed=seed, variant=variant) for r in records]


def read_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mbpp_records(prompt_format: str = "docstring", limit: int | None = None) -> list[dict]:
    """MBPP's test problems in `prompt_format` as records perturb_record takes: HumanEval's fields
    (test = setup code + the three asserts) plus benchmark and prompt_format."""
    if prompt_format not in BENCHMARKS["mbpp"]:
        raise ValueError(f"robustness perturbs MBPP in the {BENCHMARKS['mbpp']} format(s), not {prompt_format!r}")
    return [{"task_id": p.task_id, "prompt": p.prompt, "canonical_solution": p.canonical_solution, "test": p.test,
             "entry_point": p.entry_point, "benchmark": p.benchmark, "prompt_format": p.prompt_format}
            for p in problems_lib.load_problems("mbpp", prompt_format, limit=limit)]


def to_problem(r: dict) -> problems_lib.Problem:
    """A record (perturbed or not) -> its Problem: HumanEval's schema, or an MBPP record."""
    if r.get("benchmark", "humaneval") == "humaneval":
        return problems_lib._humaneval(r)
    if r["benchmark"] != "mbpp" or r.get("prompt_format") not in BENCHMARKS["mbpp"]:
        raise ValueError(f"{r['task_id']}: no robustness records for {r['benchmark']}/{r.get('prompt_format')}")
    fmt = r["prompt_format"]
    return problems_lib.Problem(task_id=r["task_id"], benchmark="mbpp", prompt_format=fmt, prompt=r["prompt"],
                                entry_point=r["entry_point"], test=r["test"],
                                canonical_solution=r["canonical_solution"], completion_prefix=r["prompt"],
                                stop=problems_lib.STOP[fmt])


def to_problems(records: list[dict]) -> list[problems_lib.Problem]:
    """Records (perturbed or not; HumanEval's schema or MBPP's) -> Problems."""
    return [to_problem(r) for r in records]


def build_sets(records: list[dict], classes, variants: int, seed: int, out_dir: str | None = None,
               benchmark: str = "humaneval") -> dict[str, list[dict]]:
    """{"nominal": records, "<class>/v<k>": perturbed records}; written as JSONL under out_dir/perturbed."""
    sets = {NOMINAL: [dict(r) for r in records]}
    for cls in classes:
        for v in range(variants):
            sets[f"{cls}/v{v}"] = perturbed_records(records, cls, seed=seed, variant=v)
    if out_dir:
        for name, recs in sets.items():
            if name != NOMINAL:
                execution.write_jsonl(os.path.join(out_dir, "perturbed", f"{benchmark}_{name.replace('/', '_')}.jsonl"),
                                      recs)
    return sets


def metrics(passed: dict[str, dict[str, bool]], classes, variants: int) -> dict:
    """passed[set name][task_id] -> the report's numbers."""
    nominal = passed[NOMINAL]
    ids = list(nominal)
    n = len(ids)
    base = sum(nominal.values()) / n
    out = {"problems": n, NOMINAL: {"pass@1": base, "solved": sum(nominal.values())}, "classes": {}}
    for cls in classes:
        per_v = [passed[f"{cls}/v{v}"] for v in range(variants)]
        scores = [sum(p[t] for t in ids) / n for p in per_v]
        mean = sum(scores) / len(scores)
        robust = sum(all(p[t] for p in per_v) for t in ids) / n
        changed = sum(any(p[t] != nominal[t] for p in per_v) for t in ids) / n
        out["classes"][cls] = {
            "problems": n, "variants": variants, "pass@1_per_variant": scores, "pass@1": mean,
            "worst_variant_pass@1": min(scores), "drop": base - mean,
            "relative_drop": (base - mean) / base if base else None,
            "robust_pass@1": robust, "robust_drop": (base - robust) / base if base else None,
            "robust_change": changed,
        }
    return out


def markdown(summary: dict) -> str:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    fmt = summary.get("prompt_format")
    bench = summary["benchmark"] + (f", {fmt} prompt format" if fmt and fmt != summary["benchmark"] else "")
    lines = [f"# Robustness to prompt variations ({bench})", "",
             f"Model: {summary['source']}; greedy, max_new_tokens={summary['max_new_tokens']}, seed={summary['seed']}, "
             f"{summary['problems']} problems, {summary['variants']} variant(s) per class.", "",
             f"Unperturbed pass@1: **{pct(summary[NOMINAL]['pass@1'])}** ({summary[NOMINAL]['solved']} solved).", "",
             "| class | pass@1 (mean of variants) | worst variant | drop | relative drop | robust pass@1 | "
             "robust drop | robust change |", "|---|---|---|---|---|---|---|---|"]
    for cls, m in summary["classes"].items():
        lines.append(f"| {cls} | {pct(m['pass@1'])} | {pct(m['worst_variant_pass@1'])} | {pct(m['drop'])} | "
                     f"{pct(m['relative_drop'])} | {pct(m['robust_pass@1'])} | {pct(m['robust_drop'])} | "
                     f"{pct(m['robust_change'])} |")
    lines += ["", "robust pass@1: share of problems solved under every variant of the class (ReCode RP); robust "
              "drop: (unperturbed - robust) / unperturbed; robust change: share of problems whose outcome differs "
              "from the unperturbed one under some variant (ReCode RC). Perturbed problems: perturbed/*.jsonl."]
    return "\n".join(lines) + "\n"


def robustness(sampler, *, benchmark: str = "humaneval", prompt_format: str | None = None, classes=perturb.CLASSES, variants: int = 3, seed: int = 0,
               limit: int | None = None, max_new_tokens: int = 512, output_dir: str, workers: int | None = None,
               timeout_s: float = 10.0, source: str = "", humaneval_path: str | None = None) -> dict:
    """Generate (greedy, once per prompt) on the unperturbed and perturbed problems, score, report."""
    from phijax.data.benchmarks import load_humaneval
    if benchmark not in BENCHMARKS:
        raise RobustnessError(f"benchmark={benchmark!r}: robustness supports {', '.join(BENCHMARKS)}")
    prompt_format = prompt_format or BENCHMARKS[benchmark][0]
    if prompt_format not in BENCHMARKS[benchmark]:
        raise RobustnessError(f"prompt_format={prompt_format!r}: {benchmark} is perturbed in "
                              f"{', '.join(BENCHMARKS[benchmark])}")
    if benchmark == "humaneval":
        records = list(load_humaneval(humaneval_path))[:limit]
    else:
        records = mbpp_records(prompt_format, limit)
    sets = build_sets(records, classes, variants, seed, output_dir, benchmark)
    names = list(sets)
    probs = {name: to_problems(recs) for name, recs in sets.items()}
    flat = [p for name in names for p in probs[name]]
    t0 = time.monotonic()
    samples = run._generate(sampler, flat, num_samples=1, temperature=0.0, top_p=1.0,
                            max_new_tokens=max_new_tokens, seed=seed)  # one batched pass over every set
    gen_s = time.monotonic() - t0
    passed, i = {}, 0
    limits = run._sandbox_limits(2 << 30, 16)
    for name in names:
        ps = probs[name]
        rows = samples[i:i + len(ps)]
        i += len(ps)
        stem = os.path.join(output_dir, "samples", name.replace("/", "_") + ".jsonl")
        execution.write_jsonl(stem, rows)
        s = run._score(ps, rows, ks=[1], workers=workers, timeout_s=timeout_s, sandbox_limits=limits, meta={},
                       output_dir=None, results_file=None)
        execution.write_jsonl(execution.results_path(stem), s["results"])
        passed[name] = {r["task_id"]: r["passed"] for r in s["results"]}
    summary = {"benchmark": benchmark, "prompt_format": prompt_format, "source": source, "seed": seed, "variants": variants,
               "max_new_tokens": max_new_tokens, "classes_run": list(classes),
               **metrics(passed, classes, variants), "generation_wall_s": round(gen_s, 2),
               "per_problem": {t: {name: passed[name][t] for name in names} for t in passed[NOMINAL]}}
    summary["json_path"] = os.path.join(output_dir, "robustness.json")
    summary["report_path"] = os.path.join(output_dir, "robustness.md")
    with open(summary["json_path"], "w") as f:
        json.dump(summary, f, indent=1)
    with open(summary["report_path"], "w") as f:
        f.write(markdown(summary))
    return summary


def main(argv=None) -> int:
    from phijax.util import cli

    p = cli.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("--model", help="a Hugging Face Phi directory or hub id, a phijax export or a MODEL_DIR")
    p.add_argument("--tokenizer", help="tokenizer.json (when the model directory has none)")
    p.add_argument("--endpoint", help="an OpenAI-compatible endpoint URL instead of --model")
    p.add_argument("--endpoint_model", help="the endpoint's model name")
    p.add_argument("--endpoint_api", default="completions", choices=sorted(endpoint_lib.APIS))
    p.add_argument("--endpoint_concurrency", type=int, default=8)
    p.add_argument("--benchmark", default="humaneval", help=f"one of {', '.join(BENCHMARKS)}")
    p.add_argument("--prompt_format", help="default: humaneval for humaneval, docstring for mbpp (the only ones)")
    p.add_argument("--classes", default=",".join(perturb.CLASSES), help="comma-separated perturbation classes")
    p.add_argument("--variants", type=int, default=DEFAULT_VARIANTS, help="perturbed variants per class and problem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="the first N problems only")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--workers", type=int, help="sandbox workers (default: CPU count)")
    p.add_argument("--timeout_s", type=float, default=10.0)
    p.add_argument("--output_dir", required=True)
    args = p.parse_args(argv)
    cli.setup_logging()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    bad = []
    if args.benchmark not in BENCHMARKS:
        bad.append(f"--benchmark={args.benchmark!r}: robustness supports {', '.join(BENCHMARKS)}")
    elif args.prompt_format is not None and args.prompt_format not in BENCHMARKS[args.benchmark]:
        bad.append(f"--prompt_format={args.prompt_format!r}: robustness perturbs {args.benchmark} in "
                   f"{', '.join(BENCHMARKS[args.benchmark])}")
    unknown = [c for c in classes if c not in perturb.CLASSES]
    if unknown or not classes:
        bad.append(f"--classes: unknown class(es) {unknown or classes}; expected some of {', '.join(perturb.CLASSES)}")
    if len(set(classes)) != len(classes):
        bad.append(f"--classes={args.classes!r} names a class twice")
    if args.variants < 1:
        bad.append(f"--variants={args.variants} must be >= 1")
    if args.limit is not None and args.limit < 1:
        bad.append(f"--limit={args.limit} must be >= 1")
    if args.max_new_tokens < 1:
        bad.append(f"--max_new_tokens={args.max_new_tokens} must be >= 1")
    if args.workers is not None and args.workers < 1:
        bad.append(f"--workers={args.workers} must be >= 1")
    if (args.model is None) == (args.endpoint is None):
        bad.append("set exactly one of --model and --endpoint")
    if args.endpoint is not None:
        bad += [f"--{b}" for b in endpoint_lib.check(args.endpoint, args.endpoint_model, args.endpoint_api,
                                                      args.endpoint_concurrency)]
    model_dir = None
    if args.model is not None:
        from phijax import convert
        try:
            model_dir = convert.resolve_model_dir(args.model)
        except ValueError as e:
            bad.append(f"--model={e}")
        else:
            if not os.path.isdir(model_dir):
                bad.append(f"--model={args.model!r}: no such directory")
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        bad.append(f"--tokenizer={args.tokenizer!r}: no such file")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        bad.append(f"--output_dir={args.output_dir!r}: {e.strerror}")
    if bad:
        return cli.fail("; ".join(bad))
    if args.endpoint is not None:
        sampler = endpoint_lib.EndpointSampler(args.endpoint, args.endpoint_model, api=args.endpoint_api,
                                               concurrency=args.endpoint_concurrency)
        try:
            sampler.probe()
        except endpoint_lib.EndpointError as e:
            return cli.fail(e)
        source = f"{args.endpoint_model} at {sampler.url}"
    else:
        from phijax import decode
        model = decode.load_for_inference(model_dir, args.tokenizer)
        if model.tokenizer is None:
            return cli.fail(f"{args.model} has no tokenizer.json: set --tokenizer")
        sampler = decode.Sampler(model, batch_size=args.batch_size)
        source = args.model
    try:
        s = robustness(sampler, benchmark=args.benchmark, prompt_format=args.prompt_format, classes=classes, variants=args.variants, seed=args.seed,
                       limit=args.limit, max_new_tokens=args.max_new_tokens, output_dir=args.output_dir,
                       workers=args.workers, timeout_s=args.timeout_s, source=source)
    except (ValueError, endpoint_lib.EndpointError) as e:  # e.g. a prompt longer than the model's context
        return cli.fail(e)
    print(f"unperturbed pass@1 {100 * s[NOMINAL]['pass@1']:.1f}% over {s['problems']} problems")
    for cls, m in s["classes"].items():
        print(f"  {cls:<10} pass@1 {100 * m['pass@1']:.1f}%  robust pass@1 {100 * m['robust_pass@1']:.1f}%  "
              f"drop {100 * m['drop']:+.1f} pts")
    print(f"report: {s['report_path']}")
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
