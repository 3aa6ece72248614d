"""Greedy agreement between phijax's Sampler and transformers' PhiForCausalLM, and why it breaks in bf16.

    python -m phijax.bench.greedy_agreement --config tiny --dtypes float32,bfloat16 [--rows 16]
        [--new_tokens 64] [--prompt_lengths 8,128] [--device cpu|cuda] [--json out.json]

Both sides get the same random weights (a transformers model initialised with a seed, converted
with `convert.params_from_hf_state`; in bf16 both round the same fp32 weights) and the same seeded
prompts of varied lengths. phijax decodes them as one left-padded batch (`Sampler.generate_tokens`),
transformers each row alone (`generate(do_sample=False)`, no padding: simple and exact). Per dtype:

  * rows whose tokens are all identical; the share of identical tokens up to each row's first
    divergence and position by position;
  * at each first divergence, the top-1 minus top-2 logit margin on BOTH sides, from a
    teacher-forced forward over prompt + common prefix in that side's dtype, beside the largest
    difference between the two sides' logits there (the rounding noise between two correct
    implementations) and one bf16 step at the top logit;
  * the same margins at every position before a divergence, for contrast.

A bf16 divergence where the margin is within that noise is a near-tie that rounding decided, not
a bug: a bug shows up as divergences at ordinary margins. No tensorflow, seqio or gin.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np

from phijax import config as config_lib, convert, decode, model as model_lib
from phijax.bench import save_json
from phijax.bench.decode_throughput import hf_model, prompts_for
from phijax.util import cli


def bf16_step(x) -> np.ndarray:
    """The spacing of bfloat16 numbers (8 significant bits) at |x|."""
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), 1e-30))) - 7)


def margins(logits) -> np.ndarray:
    """Top-1 minus top-2 logit over the last axis."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def _stats(x) -> dict:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return {"n": 0}
    return {"n": int(x.size), "median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def _right_padded(seqs) -> np.ndarray:
    out = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def torch_greedy(model, prompts, new_tokens) -> list[list[int]]:
    import torch

    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    """fp32 copy of the model's logits (computed in its dtype) for right-padded tokens [rows, len]:
    causal, so the padding changes no earlier position."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long, device=model.device)).logits
    return out.float().cpu().numpy()


def compare(cfg, master: dict, torch_model, prompts, new_tokens: int) -> dict:
    """Greedy tokens of both sides and the margins at and before each first divergence, in cfg.dtype."""
    import torch

    dtype = cfg.dtype
    torch_model.to(torch.float32).load_state_dict({k: torch.from_numpy(v) for k, v in master.items()})
    torch_model.to(getattr(torch, dtype))
    graphdef, _, _ = model_lib.abstract(cfg)
    params = convert.params_from_hf_state(cfg, master, dtype=cfg.param_dtype)
    sampler = decode.Sampler(decode.InferenceModel(graphdef, params, cfg), batch_size=len(prompts), eos_id=None)
    ours = [o[0] for o in sampler.generate_tokens(prompts, new_tokens, stop_at_eos=False)]
    theirs = torch_greedy(torch_model, prompts, new_tokens)

    # Teacher-forced logits on both sides over prompt + phijax's tokens: up to and including a row's
    # first divergence every position sees the common prefix only.
    tokens = _right_padded([p + o for p, o in zip(prompts, ours)])
    jl = np.asarray(jax.jit(functools.partial(model_lib.apply, graphdef))(sampler.params, tokens))
    tl = torch_logits(torch_model, tokens)

    rows, divergences = [], []
    agree = {"phijax": [], "torch": [], "logit_diff": [], "top_logit": []}
    forward_matches = total_positions = 0
    for r, (p, a, b) in enumerate(zip(prompts, ours, theirs)):
        d = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), new_tokens)
        at = np.arange(len(p) - 1, len(p) + min(d, new_tokens - 1))  # positions predicting tokens 0..d
        mj, mt = margins(jl[r, at]), margins(tl[r, at])
        diff = np.abs(jl[r, at] - tl[r, at]).max(axis=-1)
        # Does the teacher-forced forward pick what each side decoded? (the margins are about those picks)
        forward_matches += int((jl[r, at].argmax(-1) == np.asarray(a[:len(at)])).sum())
        forward_matches += int((tl[r, at].argmax(-1) == np.asarray(b[:len(at)])).sum())
        total_positions += 2 * len(at)
        n_agree = min(d, len(at))
        agree["phijax"] += mj[:n_agree].tolist()
        agree["torch"] += mt[:n_agree].tolist()
        agree["logit_diff"] += diff[:n_agree].tolist()
        agree["top_logit"] += jl[r, at[:n_agree]].max(axis=-1).tolist()
        rows.append({"prompt_len": len(p), "first_divergence": d,
                     "identical_positions": int(sum(x == y for x, y in zip(a, b)))})
        if d < new_tokens:
            top = float(jl[r, at[-1]].max())
            divergences.append({"row": r, "position": d, "phijax_token": a[d], "torch_token": b[d],
                                "margin_phijax": float(mj[-1]), "margin_torch": float(mt[-1]),
                                "logit_diff": float(diff[-1]), "top_logit": top, "bf16_step": float(bf16_step(top))})
    for dv in divergences:  # where the divergence margins lie among the margins of agreeing positions
        dv["margin_percentile"] = float(100.0 * np.mean(np.asarray(agree["phijax"]) < dv["margin_phijax"])) \
            if agree["phijax"] else None
    n = len(prompts) * new_tokens
    return {
        "dtype": dtype, "rows": len(prompts), "new_tokens": new_tokens,
        "rows_identical": sum(r["first_divergence"] == new_tokens for r in rows),
        "prefix_token_share": sum(r["first_divergence"] for r in rows) / n,
        "position_token_share": sum(r["identical_positions"] for r in rows) / n,
        "forward_matches_decode": forward_matches / max(total_positions, 1),
        "margin_at_divergence": {"phijax": _stats([d["margin_phijax"] for d in divergences]),
                                 "torch": _stats([d["margin_torch"] for d in divergences])},
        "margin_elsewhere": {"phijax": _stats(agree["phijax"]), "torch": _stats(agree["torch"])},
        "logit_diff_elsewhere": _stats(agree["logit_diff"]), "top_logit_elsewhere": _stats(agree["top_logit"]),
        "divergences": divergences, "per_row": rows,
    }


def report(res: dict) -> None:
    r, n = res["rows"], res["new_tokens"]
    print(f"{res['dtype']}: rows identical {res['rows_identical']}/{r} | identical tokens: "
          f"{100 * res['prefix_token_share']:.1f}% up to the first divergence, "
          f"{100 * res['position_token_share']:.1f}% position by position ({r} x {n}) | teacher-forced argmax = decoded token at "
          f"{100 * res['forward_matches_decode']:.1f}% of positions", flush=True)
    fmt = lambda s: (f"median {s['median']:.3g} min {s['min']:.3g} max {s['max']:.3g} (n={s['n']})"
                     if s["n"] else "none")
    for side in ("phijax", "torch"):
        print(f"  top-2 margin {side:6s}: at divergences {fmt(res['margin_at_divergence'][side])} | elsewhere "
              f"{fmt(res['margin_elsewhere'][side])}")
    print(f"  max |logit difference| between the sides elsewhere: {fmt(res['logit_diff_elsewhere'])} | top logit "
          f"{fmt(res['top_logit_elsewhere'])}")
    for d in res["divergences"]:
        print(f"  row {d['row']:2d} diverges at token {d['position']:3d}: margin phijax {d['margin_phijax']:.3g}, "
              f"torch {d['margin_torch']:.3g} | logit diff {d['logit_diff']:.3g} | bf16 step at top logit "
              f"{d['top_logit']:.3g}: {d['bf16_step']:.3g} | percentile among agreeing margins "
              f"{'n/a' if d['margin_percentile'] is None else format(d['margin_percentile'], '.1f')}")


def main(argv=None) -> dict:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="a preset: tiny, phi1_small, phi1, nano")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--prompt_lengths", default="8,128", help="shortest,longest prompt (spread evenly)")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts")
    p.add_argument("--device", default="cpu", help="where transformers runs (cuda beside a jax GPU)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    cli.setup_logging()
    import torch
    import transformers

    lo, hi = (int(x) for x in args.prompt_lengths.split(","))
    base = config_lib.preset(args.config)
    if hi + args.new_tokens > base.max_len:
        p.error(f"prompts of up to {hi} + {args.new_tokens} new tokens exceed {args.config}'s max_len={base.max_len}")
    print(f"machine: {os.cpu_count()} cpus, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({args.device}), transformers {transformers.__version__}", flush=True)
    model = hf_model(base, seed=args.seed, dtype="float32", device=args.device)
    master = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    prompts = prompts_for(base, args.rows, (lo, hi), seed=args.seed)
    print(f"{args.config}: {base.param_count() / 1e6:.2f}M params, {args.rows} prompts of {lo}-{hi} tokens, "
          f"{args.new_tokens} greedy tokens, transformers attention {model.config._attn_implementation}", flush=True)
    results = {"config": args.config, "seed": args.seed, "prompt_lengths": [lo, hi], "by_dtype": {}}
    for dtype in args.dtypes.split(","):
        res = compare(base.replace(dtype=dtype, param_dtype=dtype), master, model, prompts, args.new_tokens)
        report(res)
        results["by_dtype"][dtype] = res
    save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
