"""The AdamW step alone on a model's parameters, against the fewest bytes it must move.

    python -m phijax.bench.optimizer_step --config phi1 [--steps 20]

Times jit(update + apply_updates) of phijax.optim.adamw (optax's clip_by_global_norm + adamw) with
the parameters and state donated, on fp32 parameters and gradients of the preset's shapes (random
values), and prints ms per step and the bandwidth it implies against the floor: one read of the
gradients for the global norm, then read p, g, mu, nu and write p, mu, nu (8 x 4 bytes per
parameter). At the device's copy bandwidth, XLA already makes the update one pass per array (on
an H200: 10.7 ms for phi-1, 4.25 TB/s of the 45.4 GB floor; docs/benchmarks.md). No tensorflow/gin.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

from phijax.bench import save_json
from phijax import config as config_lib, model as model_lib, optim
from phijax.util import cli


def time_update(tx, params, grads, steps: int):
    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    p, s = step(p, s, grads)  # compile + first step
    jax.block_until_ready(p)
    t0 = time.perf_counter()
    for _ in range(steps):
        p, s = step(p, s, grads)
    jax.block_until_ready(p)
    return (time.perf_counter() - t0) / steps, p


def main(argv=None):
    ap = cli.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="phi1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cli.setup_logging()
    cfg = config_lib.preset(args.config)
    _, abstract, _ = model_lib.abstract(cfg)
    keys = iter(jax.random.split(jax.random.key(0), 2 * len(jax.tree.leaves(abstract))))
    rand = lambda a, scale: scale * jax.random.normal(next(keys), a.shape, jnp.float32)
    params = jax.tree.map(lambda a: rand(a, 0.02), abstract)
    grads = jax.tree.map(lambda a: rand(a, 1e-4), abstract)
    n = sum(x.size for x in jax.tree.leaves(params))
    floor_bytes = 8 * 4 * n
    schedule = optim.warmup_linear_decay(1e-4, 10, 1000)
    dt, _ = time_update(optim.adamw(schedule), params, grads, args.steps)
    row = {"config": args.config, "params": n, "ms": dt * 1e3, "floor_gb": floor_bytes / 1e9,
           "gb_per_s": floor_bytes / dt / 1e9}
    print(f"{args.config} ({n / 1e6:,.0f}M params) AdamW: {dt * 1e3:8.2f} ms per step, "
          f"{row['gb_per_s']:7.1f} GB/s of the {floor_bytes / 1e9:.1f} GB floor", flush=True)
    save_json(args.json, row)
    return row


if __name__ == "__main__":
    main()
