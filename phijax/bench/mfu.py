"""Accelerator MFU sweep for the phi-1 train step on synthetic tokens (no tensorflow, no gin).

    python -m phijax.bench.mfu --configs phi1_small,phi1 --batches 4,8 --remat none,save_dots_no_batch

Prints per (config, per-device batch, remat policy): step time, tokens/s, MFU against the
device's published bf16 peak (phijax.metrics.PEAK_FLOPS) and peak device memory.
"""
from __future__ import annotations

import argparse
import json
import os

import jax

from phijax import config as config_lib, metrics
from phijax.bench import common


def run_one(cfg, batch_per_device, seq, steps, warmup=2):
    n = jax.device_count()
    step, state, batch = common.synthetic_train_step(cfg, batch_per_device * n, seq, mesh_shape=(1, n, 1))
    dt, m, compile_s = common.time_steps(step, state, batch, steps, warmup)
    tps = batch_per_device * n * seq / dt
    peak = metrics.device_peak_flops() * n
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_s": dt, "tokens_per_s": tps, "mfu": tps * cfg.flops_per_token(seq) / peak,
            "peak_mem_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "compile_s": compile_s,
            "loss": float(m["loss"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="phi1_small,phi1")
    p.add_argument("--batches", default="4,8", help="per-device batch sizes")
    p.add_argument("--remat", default="none,save_dots_no_batch")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="auto")
    p.add_argument("--scan_unroll", default="1", help="layers per scan iteration, comma-separated values")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    print(f"device: {jax.device_count()} x {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"peak {metrics.device_peak_flops() / 1e12:.0f} TFLOP/s per device, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rows = []
    for name in args.configs.split(","):
        for policy in args.remat.split(","):
            for unroll, bpd in ((int(u), int(b)) for u in args.scan_unroll.split(",") for b in args.batches.split(",")):
                cfg = config_lib.preset(name, dtype=args.dtype, remat_policy=policy, attention=args.attention,
                                        scan_unroll=unroll)
                label = f"{name:10s} remat={policy:18s}" + (f" unroll={unroll:2d}" if unroll != 1 else "")
                try:
                    r = run_one(cfg, bpd, args.seq, args.steps)
                except Exception as e:  # noqa: BLE001 - report OOM etc. and go on with the sweep
                    print(f"{label} batch/dev={bpd:3d}: failed: {str(e).splitlines()[0][:160]}")
                    continue
                r.update(config=name, remat=policy, batch_per_device=bpd, seq=args.seq, device=dev.device_kind,
                         scan_unroll=unroll, xla_flags=os.environ.get("XLA_FLAGS", ""))
                rows.append(r)
                print(f"{label} batch/dev={bpd:3d}: step {r['step_s'] * 1e3:7.1f} ms | "
                      f"{r['tokens_per_s']:9,.0f} tok/s | MFU {100 * r['mfu']:5.1f}% | "
                      f"peak mem {r['peak_mem_gib']:6.1f} GiB | compile {r['compile_s']:5.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
