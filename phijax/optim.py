"""Optimizer and learning-rate schedule (phi-1: AdamW, linear warmup then linear decay).

`adamw` is optax's clip_by_global_norm + adamw (decoupled weight decay on matrices only), with
the update written as one elementwise function per parameter: clip scale, both moments, bias
correction, decay, learning rate and the parameter step, so XLA emits one multi-output pass per
parameter array (read p, g, mu, nu; write p, mu, nu) after the one global-norm reduction. Its
state is exactly optax's chain state (`optax_adamw(...).init`), so checkpoints written with
either restore into the other, and the arithmetic follows optax's order of operations (a test
holds the two equal).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
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


def optax_adamw(schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
                clip_norm: float | None = 1.0):
    """The reference: optax's own transformations, chained."""
    chain = []
    if clip_norm:
        chain.append(optax.clip_by_global_norm(clip_norm))
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*chain)


def adamw(schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
          clip_norm: float | None = 1.0):
    """AdamW with global-norm clipping: `optax_adamw`'s math and state, one fused pass per array."""
    reference = optax_adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, clip_norm=clip_norm)

    def update(grads, state, params):
        if params is None:
            raise ValueError("adamw needs the parameters (weight decay)")
        clip_state, (adam, masked, sched) = state if clip_norm else ((), *state)
        if clip_norm:
            g_norm = optax.global_norm(grads)
            keep = g_norm < clip_norm
        count = optax.safe_increment(adam.count)
        bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count
        lr = -schedule(sched.count)

        def one(g, p, mu, nu, decay):
            if clip_norm:  # optax.clip_by_global_norm
                g = jax.lax.select(keep, g, (g / g_norm.astype(g.dtype)) * clip_norm)
            mu = (1 - b1) * g + b1 * mu
            nu = (1 - b2) * (g ** 2) + b2 * nu
            u = (mu / bc1.astype(mu.dtype)) / (jnp.sqrt(nu / bc2.astype(nu.dtype) + 0.0) + eps)
            if decay and weight_decay:
                u = u + weight_decay * p
            return jnp.array(lr, dtype=u.dtype) * u, mu, nu

        out = jax.tree.map(one, grads, params, adam.mu, adam.nu, decay_mask(params))
        pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)
        adam = adam._replace(count=count, mu=pick(1), nu=pick(2))
        rest = (adam, masked, sched._replace(count=optax.safe_increment(sched.count)))
        return pick(0), ((clip_state, rest) if clip_norm else (rest,))

    return optax.GradientTransformation(reference.init, update)
