"""The fused AdamW against optax's chained clip_by_global_norm + adamw: same state, same steps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from phijax import optim


def _tree(rng, scale=1.0):
    shapes = {"layers": {"fc1": {"kernel": (2, 8, 16), "bias": (2, 16)}, "ln": {"scale": (2, 8), "bias": (2, 8)}},
              "lm_head": {"kernel": (8, 32), "bias": (32,)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("clip_norm,grad_scale", [(1.0, 1.0), (1.0, 1e-3), (None, 1.0)])  # clipped, not, none
def test_fused_adamw_equals_optax(clip_norm, grad_scale):
    rng = np.random.default_rng(0)
    schedule = optim.warmup_linear_decay(1e-2, 2, 10)
    kw = dict(weight_decay=0.1, clip_norm=clip_norm)
    fused, ref = optim.adamw(schedule, **kw), optim.optax_adamw(schedule, **kw)
    params = _tree(rng)
    p1, s1, p2, s2 = params, fused.init(params), params, ref.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)  # checkpoints restore into either

    def step(tx):
        @jax.jit
        def f(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        return f

    f1, f2 = step(fused), step(ref)
    for _ in range(5):
        g = _tree(rng, grad_scale)
        (p1, s1), (p2, s2) = f1(p1, s1, g), f2(p2, s2, g)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    assert moved > 1e-4  # the steps did something


def test_fused_adamw_decays_matrices_only():
    params = {"w": {"kernel": jnp.ones((2, 2))}, "n": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    tx = optim.adamw(lambda _: 1.0, weight_decay=0.5, clip_norm=None)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)
    assert float(u["w"]["kernel"][0, 0]) == pytest.approx(-0.5)  # -lr * wd * p
    assert float(jnp.abs(u["n"]["scale"]).max()) == 0.0 and float(jnp.abs(u["n"]["bias"]).max()) == 0.0
