"""Optimizer and learning-rate schedule (phi-1: AdamW, linear warmup then linear decay)."""
from __future__ import annotations

import jax
import optax


def warmup_linear_decay(peak_lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.0):
    """0 -> peak over `warmup_steps`, then linear to peak*end_lr_ratio at `total_steps`."""
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"warmup_steps={warmup_steps} and total_steps={total_steps} must be >= 0 and > 0")
    warmup_steps = min(warmup_steps, total_steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1)),
         optax.linear_schedule(peak_lr, peak_lr * end_lr_ratio, max(total_steps - warmup_steps, 1))],
        boundaries=[warmup_steps])


def decay_mask(params):
    """Weight decay on matrices only: biases, LayerNorm scales and shifts are not decayed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: not (path[-1].key in ("bias", "scale")), params)


def adamw(schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
          clip_norm: float | None = 1.0):
    chain = []
    if clip_norm:
        chain.append(optax.clip_by_global_norm(clip_norm))
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*chain)
