"""The CPU train step's matmuls alone: XLA:CPU (its default GEMM library, and oneDNN as the CPU
settings compile them) against PyTorch on the same shapes, in the same process.

    python -m phijax.bench.cpu_gemms [--config tiny --batch 8 --seq 512 --loss_chunk 32] [--json out.json]

Every matmul of a layer and of the fused LM-head loss (phijax.loss: `loss_chunk` positions of
every row at a time) in its three forms: the forward x @ W, the input gradient g @ Wᵀ and the
weight gradient xᵀ @ g, which contracts over the tokens (the leading dim of both operands). fp32,
each side's best of `--rounds` alternating rounds; GFLOP/s per shape and how many times faster
PyTorch is (XLA time / PyTorch time). It says how far the step's GEMMs alone leave phijax from PyTorch's oneDNN/MKL
calls (docs/benchmarks.md).
"""
from __future__ import annotations

import time

import jax
import numpy as np

from phijax import config as config_lib, train_setup
from phijax.bench import save_json
from phijax.util import cli

FORMS = {  # operand shapes of (m, k, n) and the product, the same for both frameworks
    "x@W": (lambda m, k, n: ((m, k), (k, n)), lambda a, b: a @ b),
    "g@W^T": (lambda m, k, n: ((m, k), (n, k)), lambda a, b: a @ b.T),
    "x^T@g": (lambda m, k, n: ((k, m), (k, n)), lambda a, b: a.T @ b),
}


def step_gemms(cfg, batch: int, seq: int, loss_chunk: int):
    """(name, m, k, n, form, times per step) of each distinct matmul in a train step of `cfg`
    (attention's excluded)."""
    tokens, rows, d = batch * seq, batch * loss_chunk, cfg.d_model
    qkv = (cfg.n_heads + 2 * (cfg.n_kv_heads or cfg.n_heads)) * cfg.head_dim
    out = []
    for name, m, k, n, count in (("qkv", tokens, d, qkv, cfg.n_layers),
                                 ("attn out", tokens, cfg.n_heads * cfg.head_dim, d, cfg.n_layers),
                                 ("fc1", tokens, d, cfg.d_mlp, cfg.n_layers), ("fc2", tokens, cfg.d_mlp, d, cfg.n_layers),
                                 ("lm head chunk", rows, d, cfg.vocab_size, seq // loss_chunk)):
        out += [(f"{name} fwd", m, k, n, "x@W", count), (f"{name} dx", m, n, k, "g@W^T", count),
                (f"{name} dW", k, m, n, "x^T@g", count)]
    return out


def _time(f, args, reps, block):
    t0 = time.perf_counter()
    for _ in range(reps):
        r = f(*args)
    block(r)
    return (time.perf_counter() - t0) / reps


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--loss_chunk", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cli.setup_logging()
    import torch

    cfg = config_lib.preset(args.config)
    rng = np.random.default_rng(0)
    print(f"{args.config} step GEMMs, batch {args.batch} x {args.seq}, loss chunk {args.loss_chunk}, fp32; "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); best of {args.rounds}")
    rows = []
    for name, m, k, n, form, count in step_gemms(cfg, args.batch, args.seq, args.loss_chunk):
        shapes, fn = FORMS[form]
        host = [rng.standard_normal(s, dtype=np.float32) for s in shapes(m, k, n)]
        jx = [jax.device_put(a) for a in host]
        tx = [torch.from_numpy(a) for a in host]
        sides = {"xla": (jax.jit(fn), jx, jax.block_until_ready),
                 "xla_onednn": (jax.jit(fn, compiler_options=train_setup.CPU_ONEDNN_DOTS), jx, jax.block_until_ready),
                 "torch": (fn, tx, lambda r: None)}
        ref = fn(*host)
        for side, (f, xs, block) in sides.items():  # warm up (compile), and check the values
            np.testing.assert_allclose(np.asarray(f(*xs)), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
        best = {s: float("inf") for s in sides}
        for _ in range(args.rounds):
            for side, (f, xs, block) in sides.items():
                best[side] = min(best[side], _time(f, xs, args.reps, block))
        flops = 2.0 * m * k * n
        row = {"gemm": name, "m": m, "k": k, "n": n, "form": form, "per_step": count,
               **{f"{s}_gflops": flops / t / 1e9 for s, t in best.items()},
               "torch_over_xla": best["xla"] / best["torch"], "torch_over_xla_onednn": best["xla_onednn"] / best["torch"]}
        rows.append(row)
        print(f"  {name:20s} {form:6s} [{m}x{k}]x[{k}x{n}]: GFLOP/s xla {row['xla_gflops']:5.0f} | "
              f"xla+oneDNN {row['xla_onednn_gflops']:5.0f} | torch {row['torch_gflops']:5.0f} "
              f"(torch faster by {row['torch_over_xla']:.2f}x / {row['torch_over_xla_onednn']:.2f}x)")
    total = {s: sum(r["per_step"] * 2.0 * r["m"] * r["k"] * r["n"] / (r[f"{s}_gflops"] * 1e9) for r in rows)
             for s in ("xla", "xla_onednn", "torch")}
    print(f"a step's GEMMs (each shape x its count per step), back to back: xla {total['xla'] * 1e3:.1f} ms, "
          f"xla+oneDNN {total['xla_onednn'] * 1e3:.1f} ms, torch {total['torch'] * 1e3:.1f} ms")
    save_json(args.json, {"rows": rows, "total_s": total})
    return rows


if __name__ == "__main__":
    main()
