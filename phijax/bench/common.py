"""What the benchmarks share: a compiled train step on synthetic tokens (no tensorflow, no gin)."""
from __future__ import annotations

import time

import jax
import numpy as np

from phijax import optim, sharding, train_step


def synthetic_tokens(vocab_size: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """[batch, seq + 1] int32 token ids: inputs are [:, :-1], targets [:, 1:] (the torch peer uses
    the same ones, so both sides see the same batch)."""
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, seq + 1)).astype(np.int32)


def synthetic_train_step(cfg, global_batch: int, seq: int, mesh_shape=(1, -1, 1), devices=None, seed: int = 0):
    """(jitted step, fresh state, global batch) for `cfg` on a mesh over `devices` (default: all)."""
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    rules = sharding.DEFAULT_RULES
    schedule = optim.warmup_linear_decay(1e-4, 10, 10_000)
    tx = optim.adamw(schedule)
    graphdef, _, shardings = train_step.state_shardings(cfg, tx, mesh, rules)
    state = train_step.init_state(cfg, tx, seed, shardings)
    bs = train_step.batch_shardings(("inputs", "targets", "loss_weights"), mesh, rules)
    step = train_step.make_train_step(graphdef, cfg, tx, schedule, mesh=mesh, rules=rules, microbatches=1,
                                      shardings=shardings, batch_sharding=bs)
    w = synthetic_tokens(cfg.vocab_size, global_batch, seq, seed)
    batch = train_step.to_global({"inputs": w[:, :-1], "targets": w[:, 1:],
                                  "loss_weights": np.ones((global_batch, seq), np.float32)}, bs)
    return step, state, batch


def time_steps(step, state, batch, steps: int, warmup: int = 2):
    """(seconds per step, last metrics, compile+first-step seconds, first metrics, every step's loss);
    the state is donated each step. The first metrics' loss is the loss of the initial parameters.
    The losses stay on the device until the timing ends (reading them would synchronise)."""
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    first, m0, losses = time.perf_counter() - t0, m, [m["loss"]]
    for _ in range(warmup - 1):
        state, m = step(state, batch)
        losses.append(m["loss"])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(m["loss"])
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    return dt, m, first, m0, [float(x) for x in jax.device_get(losses)]
