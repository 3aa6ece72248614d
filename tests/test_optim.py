"""The optimizer: decoupled weight decay on matrices only, clipping by the global norm."""
import jax
import jax.numpy as jnp
import optax
import pytest

from phijax import optim


def test_adamw_decays_matrices_only():
    params = {"w": {"kernel": jnp.ones((2, 2))}, "n": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    tx = optim.adamw(lambda _: 1.0, weight_decay=0.5, clip_norm=None)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)
    assert float(u["w"]["kernel"][0, 0]) == pytest.approx(-0.5)  # -lr * wd * p
    assert float(jnp.abs(u["n"]["scale"]).max()) == 0.0 and float(jnp.abs(u["n"]["bias"]).max()) == 0.0


def test_adamw_clips_by_the_global_norm():
    params = {"w": {"kernel": jnp.zeros(4)}}
    tx = optim.adamw(lambda _: 1.0, weight_decay=0.0, clip_norm=1.0)
    big = {"w": {"kernel": jnp.full(4, 100.0)}}
    _, state = tx.update(big, tx.init(params), params)
    mu = state[1][0].mu["w"]["kernel"]  # (clip, (adam, decay, lr)): adam's first moment saw the clipped gradient
    assert float(optax.global_norm(mu)) == pytest.approx(0.1, rel=1e-5)  # (1 - b1) * |clipped g| = 0.1 * 1.0
