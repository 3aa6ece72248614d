"""Decoding throughput: phijax's KV-cache Sampler vs transformers' `generate`, same run, same weights.

    python -m phijax.bench.decode_throughput [--configs tiny,small] [--repeats 3] [--json out.json]

Per config both sides decode the same batch of prompts (random ids, lengths spread over the
given range, so padding is exercised) for exactly `new` tokens (end-of-text disabled), greedy, fp32,
from the same random weights (a transformers PhiForCausalLM converted in memory). Prints generated
tokens/s (batch x new tokens / best wall time of `repeats` interleaved rounds, prefill included)
for each, the ratio, phijax's compile time (first call minus a warm call; excluded from its timed
runs, as transformers' warm-up call is) and whether both produced the same tokens.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from phijax import config as config_lib, convert, decode, model as model_lib
from phijax.bench import save_json
from phijax.util import cli

CONFIGS = {
    # The CPU demo model (7.4M params, 8k vocabulary): what a CPU user decodes with.
    "tiny": dict(cfg=config_lib.preset("tiny"), batch=8, prompt=(64, 128), new=128),
    # 2.9M params: the tiny model at half the width (d 128, 4 layers, 8k vocabulary).
    "mini": dict(cfg=config_lib.preset("tiny", d_model=128, head_dim=32, d_mlp=512, rotary_dim=16), batch=8,
                 prompt=(64, 128), new=128),
    # Overhead-bound: 2 layers of d 64; per-op dispatch dominates an eager framework.
    "small": dict(cfg=config_lib.preset("nano", vocab_size=512, max_len=512), batch=8, prompt=(64, 128), new=128),
    # phi-1-small's shape (350M params, 51k vocabulary), shorter run: compute-bound on a CPU.
    "phi1_small": dict(cfg=config_lib.preset("phi1_small"), batch=8, prompt=(64, 128), new=32),
    # phi-1 (1.3B) at HumanEval-like lengths: for an accelerator (--dtype bfloat16 --torch_device cuda).
    "phi1": dict(cfg=config_lib.preset("phi1"), batch=16, prompt=(128, 384), new=256),
}


def hf_model(cfg, seed: int = 0, dtype: str = "float32", device: str = "cpu"):
    import torch
    from transformers import PhiConfig as HFPhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it runs (phi-1's 1.3B initialise slowly on a CPU)
        model = PhiForCausalLM(HFPhiConfig(**convert.config_to_hf(cfg))).eval()
    return model.to(dtype=getattr(torch, dtype))


def prompts_for(cfg, batch, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lo, hi = lengths
    return [rng.integers(2, cfg.vocab_size, int(n)).tolist() for n in np.linspace(lo, hi, batch).round()]


def phijax_runner(inference_model, prompts, new):
    """(run() -> generated ids, compile seconds): the first call compiles (timed separately)."""
    sampler = decode.Sampler(inference_model, batch_size=len(prompts), eos_id=None)

    def run_once():
        return [o[0] for o in sampler.generate_tokens(prompts, new, stop_at_eos=False)]

    t0 = time.perf_counter()
    run_once()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_once()
    return run_once, first - (time.perf_counter() - t0)


def torch_runner(model, prompts, new, pad_id=0):
    """run() -> generated ids with transformers' generate, warmed up once."""
    import torch

    p = max(map(len, prompts))
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(prompts):  # left-padded, as transformers recommends for batched generate
        ids[i, p - len(x):] = torch.tensor(x)
        mask[i, p - len(x):] = 1
    kw = dict(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new,
              min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=pad_id)

    def run_once():
        with torch.inference_mode():
            out = model.generate(**kw)
        return out[:, p:].tolist()

    run_once()
    return run_once


def best_times(runners, repeats):
    """Best wall time of each runner over `repeats` interleaved rounds (a shared machine's load
    then hits both sides alike), and each runner's last output."""
    best, outs = [float("inf")] * len(runners), [None] * len(runners)
    for _ in range(repeats):
        for i, fn in enumerate(runners):
            t0 = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, outs


def run(name, repeats, dtype="float32", torch_device="cpu"):
    spec = CONFIGS[name]
    cfg, batch, new = spec["cfg"], spec["batch"], spec["new"]
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    model = hf_model(cfg, dtype=dtype, device=torch_device)
    tensors = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    graphdef, _, _ = model_lib.abstract(cfg)
    im = decode.InferenceModel(graphdef, convert.params_from_hf_state(cfg, tensors, dtype=cfg.param_dtype), cfg)
    del tensors
    prompts = prompts_for(cfg, batch, spec["prompt"])
    ours, compile_s = phijax_runner(im, prompts, new)
    theirs = torch_runner(model, prompts, new)
    (j_s, t_s), (j_out, t_out) = best_times([ours, theirs], repeats)
    j_tps, t_tps = batch * new / j_s, batch * new / t_s
    same = sum(a == b for a, b in zip(j_out, t_out))
    # In bf16 the two sides round differently and greedy paths part after a while: how long they agree.
    prefix = float(np.mean([next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), new)
                            for a, b in zip(j_out, t_out)]))
    row = {"config": name, "dtype": dtype, "params_M": cfg.param_count() / 1e6, "batch": batch,
           "prompt_lengths": spec["prompt"],
           "new_tokens": new, "phijax_tokens_per_s": j_tps, "torch_tokens_per_s": t_tps, "ratio": j_tps / t_tps,
           "phijax_compile_s": compile_s, "rows_identical": f"{same}/{batch}", "mean_common_prefix": prefix}
    lo, hi = spec["prompt"]
    print(f"{name:10s} {row['params_M']:.2f}M params, batch {batch}, prompts {lo}-{hi}, "
          f"{new} new: phijax {j_tps:,.0f} tok/s | transformers {t_tps:,.0f} tok/s | ratio {row['ratio']:.2f}x | "
          f"phijax compile {compile_s:.1f}s | identical rows {same}/{batch} (mean common prefix {prefix:.0f})", flush=True)
    return row


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,mini,small")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="both sides' weights and compute (bfloat16 on a GPU)")
    p.add_argument("--torch_device", default="cpu", help="where transformers runs (cuda beside a jax GPU)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    cli.setup_logging()
    import torch
    import transformers

    print(f"machine: {os.cpu_count()} cpus, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}", flush=True)
    print(f"jax devices: {jax.devices()}", flush=True)
    results = [run(name, args.repeats, args.dtype, args.torch_device) for name in args.configs.split(",")]
    save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
