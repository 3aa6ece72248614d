"""What the training benchmarks share: the trainer's own set-up on synthetic tokens (no tensorflow,
no gin), and a timer that keeps the device busy."""
from __future__ import annotations

import time

import jax
import numpy as np

from phijax import train_setup
from phijax.data.pipeline import DataSource

SYNTHETIC = DataSource("synthetic")


def synthetic_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Step 0's global batch of the synthetic source (numpy): what phijax's benchmarks train on,
    and what the torch peer trains on too."""
    return SYNTHETIC.make(seq_len=seq, global_batch_size=batch, seed=seed, model_vocab_size=vocab_size).global_batch(0)


def synthetic_train_step(cfg, global_batch: int, seq: int, mesh_shape=(1, -1, 1), devices=None, seed: int = 0,
                         compiler_options: dict | None = None):
    """(jitted step, fresh state, global batch) for `cfg` on a mesh over `devices` (default: all),
    built by phijax.train_setup exactly as a training run builds them."""
    run = train_setup.RunConfig(model_config=cfg, batch_size=global_batch, seq_len=seq, seed=seed,
                                mesh_shape=tuple(mesh_shape), data_source=SYNTHETIC,
                                compiler_options=compiler_options)
    s = train_setup.setup(run, devices=devices)
    return s.step, s.init_state(), s.to_global(synthetic_batch(cfg.vocab_size, global_batch, seq, seed))


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
