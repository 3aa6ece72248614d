"""Train-step throughput: phijax vs transformers' PhiForCausalLM (PyTorch), same run, same config.

    python -m phijax.bench.train_throughput [--steps 10] [--configs tiny,small] [--json out.json]

For each config both frameworks run the same model shape, batch and AdamW step on this
machine's CPU; the script prints tokens/s, the ratio phijax/PyTorch, and each one's MFU
against a fp32 matmul peak measured in this run (the better of jax's and torch's
1024^3 matmul). FLOPs per token: PhiConfig.flops_per_token (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from phijax import config as config_lib, metrics
from phijax.bench import common

CONFIGS = {
    # The reference point: 7.4M params, batch 8 x 512 (compute-bound on 2 cores).
    "tiny": (config_lib.preset("tiny"), 8, 512),
    # Overhead-bound: tiny matmuls, where per-op dispatch dominates an eager framework.
    "small": (config_lib.preset("nano", vocab_size=512, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_mlp=256,
                                max_len=128, rotary_dim=8), 8, 64),
}


def bench_phijax(cfg, batch, seq, steps, warmup=2):
    step, state, b = common.synthetic_train_step(cfg, batch, seq, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
    dt, m, _ = common.time_steps(step, state, b, steps, warmup)
    return batch * seq / dt, float(m["loss"])


def bench_torch(cfg, batch, seq, steps, warmup=2):
    import torch
    from transformers import PhiConfig as HFPhiConfig, PhiForCausalLM

    from phijax import convert

    torch.manual_seed(0)
    hf_cfg = HFPhiConfig(**convert.config_to_hf(cfg))
    model = PhiForCausalLM(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    w = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)))
    inputs, targets = w[:, :-1], w[:, 1:]

    def one():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one()
    dt = time.perf_counter() - t0
    return batch * seq * steps / dt, float(loss.detach())


def torch_matmul_peak(n=1024, seconds=1.0):
    import torch
    a = torch.ones(n, n)
    a @ a
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    peak_jax = metrics.measure_matmul_peak()
    peak_torch = torch_matmul_peak()
    peak = max(peak_jax, peak_torch)
    print(f"machine: {os.cpu_count()} cpus, jax {jax.__version__} ({jax.default_backend()}), "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (jax {peak_jax / 1e9:.1f}, torch {peak_torch / 1e9:.1f})")
    results = []
    for name in args.configs.split(","):
        cfg, batch, seq = CONFIGS[name]
        fpt = cfg.flops_per_token(seq)
        j_tps, j_loss = bench_phijax(cfg, batch, seq, args.steps)
        t_tps, t_loss = bench_torch(cfg, batch, seq, args.steps)
        row = {"config": name, "params_M": cfg.param_count() / 1e6, "batch": batch, "seq": seq,
               "phijax_tokens_per_s": j_tps, "torch_tokens_per_s": t_tps, "ratio": j_tps / t_tps,
               "phijax_mfu": j_tps * fpt / peak, "torch_mfu": t_tps * fpt / peak, "peak_gflops": peak / 1e9}
        results.append(row)
        print(f"{name:6s} {row['params_M']:.2f}M params, batch {batch}x{seq}: "
              f"phijax {j_tps:,.0f} tok/s (MFU {100 * row['phijax_mfu']:.0f}%) | "
              f"pytorch {t_tps:,.0f} tok/s (MFU {100 * row['torch_mfu']:.0f}%) | ratio {row['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
