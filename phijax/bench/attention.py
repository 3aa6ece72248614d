"""Causal attention alone, forward and forward+backward: phijax's `xla_attention` against PyTorch's
`scaled_dot_product_attention` on the same shapes in the same process.

    python -m phijax.bench.attention [--batch 8 --seq 512 --heads 4 --head_dim 64] [--blocks 1,2,4,8]

The CPU train step's largest gap to PyTorch (docs/benchmarks.md): PyTorch runs a fused CPU
flash-attention kernel, XLA:CPU separate GEMMs and elementwise passes over copied block slices.
`--blocks` also times phijax's blocked attention with other query-block counts (the default is
`attention.causal_blocks(seq)`). On a CPU phijax is also timed compiled as the CPU train step
compiles it (its matmuls as oneDNN calls: train_setup.CPU_ONEDNN_DOTS), and its XLA:CPU FFI kernel
(attention='cpu', phijax/kernels/cpu_attention.py) is timed too. fp32; both sides
alternate rounds, the best counts. The backward is of sum(attention(q, k, v) * v) on both sides;
each side's output and gradients are compared with the first side's before timing (printed).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from phijax import attention, train_setup
from phijax.bench import save_json
from phijax.util import cli


def _phijax_fns(n_blocks: int | None, compiler_options: dict | None = None, fn=None):
    fn = fn or (attention.xla_attention if n_blocks is None else (
        lambda q, k, v: attention._blocked_attention(q, k, v, None, n_blocks, True)))
    fwd = jax.jit(fn, compiler_options=compiler_options)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * v), argnums=(0, 1, 2)),
                   compiler_options=compiler_options)
    return fwd, grad


def _torch_fns():
    import torch
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd(q, k, v):
        with torch.no_grad():
            return sdpa(q, k, v, is_causal=True)

    def grad(q, k, v):
        for t in (q, k, v):
            t.grad = None
        (sdpa(q, k, v, is_causal=True) * v).sum().backward()
        return q.grad, k.grad, v.grad
    return fwd, grad


def main(argv=None):
    ap = cli.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--blocks", default="", help="more query-block counts for phijax, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no_torch", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cli.setup_logging()
    b, t, h, d = args.batch, args.seq, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((b, t, h, d), dtype=np.float32) for _ in range(3)]
    jq, jk, jv = (jnp.asarray(x) for x in host)

    sides = {f"phijax ({attention.causal_blocks(t)} blocks, the default)": (_phijax_fns(None), (jq, jk, jv), True)}
    if jax.default_backend() == "cpu":
        sides["phijax (oneDNN dots)"] = (_phijax_fns(None, train_setup.CPU_ONEDNN_DOTS), (jq, jk, jv), True)
        sides["phijax cpu kernel (FFI)"] = (_phijax_fns(None, fn=attention.cpu_attention), (jq, jk, jv), True)
    for n in (int(x) for x in args.blocks.split(",") if x):
        sides[f"phijax ({n} blocks)"] = (_phijax_fns(n), (jq, jk, jv), True)
    if not args.no_torch:
        import torch
        # PyTorch's layout [b, heads, t, d]; the same values.
        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).requires_grad_() for x in host)
        sides[f"pytorch sdpa ({torch.get_num_threads()} threads)"] = (_torch_fns(), (tq, tk, tv), False)
    best = {(name, part): float("inf") for name in sides for part in ("fwd", "fwd+bwd")}
    results = {}
    for name, ((fwd, grad), xs, is_jax) in sides.items():  # compile / warm up, and keep the values
        results[name] = [np.asarray(x.detach() if not is_jax else x) for x in (fwd(*xs), *grad(*xs))]
        if not is_jax:  # back to phijax's [b, t, heads, d]
            results[name] = [x.transpose(0, 2, 1, 3) for x in results[name]]
    ref = next(iter(results.values()))
    diffs = {name: max(float(np.max(np.abs(a - r))) for a, r in zip(vals, ref)) for name, vals in results.items()}
    for _ in range(args.rounds):
        for name, ((fwd, grad), xs, is_jax) in sides.items():
            for part, f in (("fwd", fwd), ("fwd+bwd", grad)):
                t0 = time.perf_counter()
                out = f(*xs)
                if is_jax:
                    jax.block_until_ready(out)
                best[name, part] = min(best[name, part], time.perf_counter() - t0)
    print(f"causal attention, {b} x {t}, {h} heads x {d}, fp32, best of {args.rounds} rounds:")
    rows = []
    for name in sides:
        f, fb = best[name, "fwd"] * 1e3, best[name, "fwd+bwd"] * 1e3
        rows.append({"side": name, "fwd_ms": f, "fwd_bwd_ms": fb, "max_abs_diff": diffs[name]})
        print(f"  {name:36s} fwd {f:7.1f} ms   fwd+bwd {fb:7.1f} ms   output and gradients within {diffs[name]:.1e}")
    if not args.no_torch:
        ref = rows[-1]
        for row in rows[:-1]:
            print(f"{row['side']} / pytorch time: fwd {row['fwd_ms'] / ref['fwd_ms']:.2f}x, "
                  f"fwd+bwd {row['fwd_bwd_ms'] / ref['fwd_bwd_ms']:.2f}x")
    if args.json:
        save_json(args.json, {"shape": [b, t, h, d], "rows": rows})
    return rows


if __name__ == "__main__":
    main()
