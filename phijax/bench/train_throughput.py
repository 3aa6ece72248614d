"""Train-step throughput: phijax vs transformers' PhiForCausalLM (PyTorch), same run, same config.

    python -m phijax.bench.train_throughput [--steps 10] [--rounds 2] [--configs tiny,small] [--json out.json]

For each config both frameworks run the same model shape, batch and AdamW step on this
machine's CPU; the script prints tokens/s, the ratio phijax/PyTorch, and each one's MFU
against a fp32 matmul peak measured in this run (the better of jax's and torch's
1024^3 matmul). FLOPs per token: PhiConfig.flops_per_token (docs/benchmarks.md).

phijax runs twice: with the PhiConfig defaults, and with the CPU settings (`cpu_settings`: every
layer unrolled in the scan, the fused chunked LM-head loss with its softmax cross-entropy in the
XLA:CPU kernel, attention + RoPE in the XLA:CPU kernel, the matmuls compiled to oneDNN calls,
train_setup.CPU_ONEDNN_DOTS), which gin/experiments/cpu_demo.gin also uses. Both sides are timed in alternating rounds (compiled /
warmed up once); each reports its best round, so a burst of load on the shared machine does
not decide the ratio.
"""
from __future__ import annotations

import os
import time

import jax

from phijax import config as config_lib, metrics, train_setup
from phijax.bench import save_json, step_timing
from phijax.util import cli

CONFIGS = {
    # The reference point: 7.4M params, batch 8 x 512 (compute-bound on 2 cores).
    "tiny": (config_lib.preset("tiny"), 8, 512),
    # Overhead-bound: tiny matmuls, where per-op dispatch dominates an eager framework.
    "small": (config_lib.preset("nano", vocab_size=512, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_mlp=256,
                                max_len=128, rotary_dim=8), 8, 64),
}


def cpu_settings(cfg):
    """phijax's execution settings for a CPU (the model and its numerics are unchanged): the
    config, and the step's XLA compiler options."""
    return (cfg.replace(scan_unroll=cfg.n_layers, loss_chunk=32, attention="cpu", loss_kernel="cpu"),
            train_setup.CPU_ONEDNN_DOTS)


def bench_phijax(cfg, batch, seq, steps, warmup=2, compiler_options=None):
    """A function that times `steps` more steps: (tokens/s, loss). Compiled and warmed up here."""
    step, state, b = step_timing.synthetic_train_step(cfg, batch, seq, mesh_shape=(1, 1, 1), devices=jax.devices()[:1],
                                                      compiler_options=compiler_options)
    box = {"state": state}
    for _ in range(warmup):
        box["state"], m = step(box["state"], b)
    jax.block_until_ready(m)

    def run():
        t0 = time.perf_counter()
        for _ in range(steps):
            box["state"], m = step(box["state"], b)
        jax.block_until_ready(m)
        return batch * seq * steps / (time.perf_counter() - t0), float(m["loss"])
    return run


def bench_torch(cfg, batch, seq, steps, warmup=2):
    """The same for transformers' PhiForCausalLM (phijax.bench.torch_peer: eager, fp32, on the CPU)."""
    from phijax.bench import torch_peer

    step = torch_peer.TrainStep(cfg, batch, seq, device="cpu")
    for _ in range(warmup):
        step()

    def run():
        dt, loss = step.timed(steps)
        return batch * seq / dt, loss
    return run


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
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="alternating timed rounds per side (best counts)")
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    cli.setup_logging()

    peak_jax = metrics.measure_matmul_peak()
    peak_torch = torch_matmul_peak()
    peak = max(peak_jax, peak_torch)
    print(f"machine: {os.cpu_count()} cpus, jax {jax.__version__} ({jax.default_backend()}), "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (jax {peak_jax / 1e9:.1f}, torch {peak_torch / 1e9:.1f})")
    results = []
    for name in args.configs.split(","):
        cfg, batch, seq = CONFIGS[name]
        fpt = cfg.flops_per_token(seq)
        cpu_cfg, cpu_options = cpu_settings(cfg)
        runners = {"phijax": bench_phijax(cpu_cfg, batch, seq, args.steps, compiler_options=cpu_options),
                   "phijax_defaults": bench_phijax(cfg, batch, seq, args.steps),
                   "torch": bench_torch(cfg, batch, seq, args.steps)}
        best = {k: 0.0 for k in runners}
        for _ in range(args.rounds):
            for k, run in runners.items():
                best[k] = max(best[k], run()[0])
        j_tps, d_tps, t_tps = best["phijax"], best["phijax_defaults"], best["torch"]
        row = {"config": name, "params_M": cfg.param_count() / 1e6, "batch": batch, "seq": seq,
               "phijax_tokens_per_s": j_tps, "phijax_defaults_tokens_per_s": d_tps, "torch_tokens_per_s": t_tps,
               "ratio": j_tps / t_tps, "ratio_defaults": d_tps / t_tps,
               "phijax_mfu": j_tps * fpt / peak, "torch_mfu": t_tps * fpt / peak, "peak_gflops": peak / 1e9}
        results.append(row)
        print(f"{name:6s} {row['params_M']:.2f}M params, batch {batch}x{seq}: "
              f"phijax {j_tps:,.0f} tok/s (MFU {100 * row['phijax_mfu']:.0f}%) | "
              f"pytorch {t_tps:,.0f} tok/s (MFU {100 * row['torch_mfu']:.0f}%) | ratio {row['ratio']:.2f}x "
              f"(phijax with PhiConfig defaults: {d_tps:,.0f} tok/s, {row['ratio_defaults']:.2f}x)")
    save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
