"""Held-out loss of the benchmark's canonical solutions given their prompts: the mean negative
log-likelihood (nats/token) a model assigns to the reference solution tokens after the prompt. A
smooth signal that moves before pass@1 does (phi-1's fine-tuning report compares it before/after).

    from phijax import decode
    from phijax.evaluate import problems, solution_loss
    model = decode.load_for_inference(path)
    out = solution_loss.solution_loss(model, problems.load_problems("humaneval"))   # out["loss"]

    python -m phijax.evaluate.solution_loss --model PATH [--benchmark humaneval] [--limit N] [--out F.json]
    phijax solution-loss --model PATH ...

Tokens: the prompt and the solution are encoded separately and concatenated, exactly as
fine-tuning packs a (prompt, solution) pair (phijax/data/packing.py: prompt_ids + solution_ids),
so the boundary is exact and the figure measures what fine-tuning optimises. (Encoding the joined
text would merge BPE tokens across the boundary, e.g. a prompt's trailing newline with the
solution's indentation, and the model would be scored on a tokenization it never trained on.)
Only the solution tokens are scored (the end-of-text that packing also weighs: `score_eos=True`).

Batches: each sequence is right-padded to a power-of-two bucket (at least `min_bucket`, at most the
model's max positions) and the last batch of a bucket filled with empty rows, so one program is
compiled per bucket. Attention is causal, so right padding changes no real position's logits, and
a problem's loss does not depend on the batch it runs in. A sequence longer than the model's
positions (or `max_len`) is skipped and listed.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Sequence

from phijax.evaluate import problems as problems_lib
from phijax.util import cli, files

log = logging.getLogger("phijax.evaluate.solution_loss")

MIN_BUCKET = 64


def _bucket(n: int, minimum: int, cap: int) -> int:
    return min(max(minimum, 1 << (max(n, 1) - 1).bit_length()), cap)


def _examples(tokenizer, probs, score_eos: bool):
    """[(task_id, input ids, target ids, weights)] for each problem; targets[j] = ids[j + 1]."""
    prompts = tokenizer.encode_batch([p.prompt for p in probs])
    solutions = tokenizer.encode_batch([p.canonical_solution for p in probs])
    out = []
    for p, pi, si in zip(probs, prompts, solutions):
        ids = list(pi) + list(si) + ([tokenizer.eos_id] if score_eos else [])
        # target j is ids[j + 1]: scored iff it is a solution token (or the end-of-text)
        weights = [1.0 if j + 1 >= len(pi) else 0.0 for j in range(len(ids) - 1)]
        weights = weights if any(weights) else None  # nothing to score
        out.append((p.task_id, ids[:-1], ids[1:], weights))
    return out


def _row_nll_fn(graphdef):
    import jax
    import jax.numpy as jnp

    from phijax import model as model_lib

    @jax.jit
    def row_nll(params, tokens, targets, weights):
        logits = model_lib.apply(graphdef, params, tokens)  # fp32 [b, t, vocab]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - picked) * weights, axis=-1)  # [b] summed NLL of the scored tokens

    return row_nll


def solution_loss(model, problems: Sequence[problems_lib.Problem] | str, *, batch_size: int = 8,
                  max_len: int | None = None, min_bucket: int = MIN_BUCKET, score_eos: bool = False,
                  model_name: str | None = None) -> dict[str, Any]:
    """The token-weighted mean NLL (nats/token) of each problem's `canonical_solution` given its
    `prompt`, for a `decode.InferenceModel` (with a tokenizer); `problems` as load_problems gives
    them, or a benchmark name (all its problems, default prompt format).

    Returns {"benchmark", "prompt_format", "problems" (scored), "tokens" (solution tokens scored),
    "loss", "per_problem_loss_mean" (unweighted mean over problems), "skipped": {"count", "ids"},
    "per_problem": [{"task_id", "tokens", "loss"}], "model", ...}."""
    import jax
    import numpy as np

    from phijax import decode

    if isinstance(problems, str):
        problems = problems_lib.load_problems(problems)
    problems = list(problems)
    if not problems:
        raise ValueError("no problems to score")
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer (tokenizer.json beside it, or tokenizer_path=...)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if not isinstance(min_bucket, int) or min_bucket < 1:
        raise ValueError(f"min_bucket={min_bucket!r} must be a positive int")
    cap = model.cfg.max_len if max_len is None else min(int(max_len), model.cfg.max_len)
    if cap < 2:
        raise ValueError(f"max_len={max_len!r} leaves no room for a prompt and a solution")
    t0 = time.monotonic()
    examples = _examples(model.tokenizer, problems, score_eos)
    skipped = [e[0] for e in examples if e[3] is None or len(e[1]) > cap]
    kept = [(i, e) for i, e in enumerate(examples) if e[3] is not None and len(e[1]) <= cap]
    by_bucket: dict[int, list] = {}
    for i, e in kept:  # problem order within each bucket: deterministic
        by_bucket.setdefault(_bucket(len(e[1]), min_bucket, cap), []).append((i, e))

    params = decode.place_params(model)
    row_nll = _row_nll_fn(model.graphdef)
    nll = {}
    for length in sorted(by_bucket):
        rows = by_bucket[length]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            tokens = np.zeros((batch_size, length), np.int32)
            targets = np.zeros((batch_size, length), np.int32)
            weights = np.zeros((batch_size, length), np.float32)
            for r, (_, (_, x, y, w)) in enumerate(chunk):
                tokens[r, :len(x)], targets[r, :len(y)], weights[r, :len(w)] = x, y, w
            sums = np.asarray(jax.device_get(row_nll(params, tokens, targets, weights)), np.float64)
            for r, (i, e) in enumerate(chunk):
                nll[i] = (float(sums[r]), int(sum(e[3])))

    per_problem = [{"task_id": examples[i][0], "tokens": n, "loss": s / n}
                   for i, (s, n) in sorted(nll.items())]
    total_nll = sum(s for s, _ in nll.values())
    total_tokens = sum(n for _, n in nll.values())
    if skipped:
        log.warning("skipped %d of %d problems longer than %d positions (or with no solution tokens): %s",
                    len(skipped), len(problems), cap, skipped[:10])
    return {
        "benchmark": problems[0].benchmark, "prompt_format": problems[0].prompt_format,
        "model": model_name, "problems": len(per_problem), "tokens": total_tokens,
        "loss": total_nll / total_tokens if total_tokens else None,  # None: nothing fit
        "per_problem_loss_mean": float(np.mean([p["loss"] for p in per_problem])) if per_problem else None,
        "skipped": {"count": len(skipped), "ids": skipped},
        "score_eos": score_eos, "max_len": cap, "buckets": sorted(by_bucket), "batch_size": batch_size,
        "dtype": model.cfg.dtype, "param_dtype": model.cfg.param_dtype,
        "wall_s": round(time.monotonic() - t0, 2), "per_problem": per_problem,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(description="Held-out loss (nats/token) of HumanEval / MBPP canonical solutions given "
                           "their prompts.")
    p.add_argument("--model", required=True, help="HF Phi directory or hub id, phijax export, or MODEL_DIR")
    p.add_argument("--benchmark", default="humaneval", help="humaneval (default) or mbpp (test split)")
    p.add_argument("--prompt_format", default=None, help="a prompt format of the benchmark (default: its own)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_len", type=int, default=None, help="skip longer sequences (default: model's positions)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one beside the model)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the model's)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a MODEL_DIR (default: newest)")
    p.add_argument("--score_eos", action="store_true", help="also score the end-of-text after the solution")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    cli.setup_logging()
    try:
        problems_lib.check_format(args.benchmark, args.prompt_format)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit={args.limit} must be a positive int")
        if args.batch_size < 1:
            raise ValueError(f"--batch_size={args.batch_size} must be a positive int")
        if args.max_len is not None and args.max_len < 2:
            raise ValueError(f"--max_len={args.max_len} must be at least 2")
        if args.out and os.path.isdir(args.out):
            raise ValueError(f"--out={args.out} is a directory")
        probs = problems_lib.load_problems(args.benchmark, args.prompt_format, args.limit)
        from phijax import decode
        model = decode.load_for_inference(args.model, args.tokenizer, dtype=args.dtype, step=args.step)
        if model.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json; pass --tokenizer")
    except (ValueError, FileNotFoundError) as e:
        return cli.fail(e)
    out = solution_loss(model, probs, batch_size=args.batch_size, max_len=args.max_len, score_eos=args.score_eos,
                        model_name=args.model)
    if not out["tokens"]:
        return cli.fail(f"none of the {len(probs)} problems fits {out['max_len']} positions (--max_len)")
    files.save_json(args.out, out)
    skipped = f", {out['skipped']['count']} skipped" if out["skipped"]["count"] else ""
    print(f"{out['benchmark']} solution loss: {out['loss']:.4f} nats/token over {out['tokens']} tokens "
          f"({out['problems']} problems{skipped})", flush=True)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
