"""The fused, chunked LM head + cross-entropy against the unfused loss, alone and in the train step."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phijax import config, loss, model
from phijax.bench import common

CFG = config.preset("nano")


def _data(b=2, t=24, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((b, t, CFG.d_model)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((CFG.d_model, CFG.vocab_size)) * 0.1, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(CFG.vocab_size) * 0.1, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, t)), jnp.int32)
    w = jnp.asarray(rng.integers(0, 2, (b, t)) * rng.uniform(0.5, 2.0, (b, t)), jnp.float32)  # zeros included
    return h, k, bias, tgt, w


def _unfused(h, k, bias, tgt, w):
    return loss.token_loss_sums(jnp.einsum("btd,dv->btv", h, k) + bias, tgt, w)


@pytest.mark.parametrize("chunk", [1, 10, 100])  # 10: falls back to 8, the largest divisor of 24
def test_fused_loss_and_gradients_equal_the_unfused_ones(chunk):
    h, k, bias, tgt, w = _data()

    def grads(fn):
        f = lambda h, k, b: fn(h, k, b, tgt, w)[0]
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, k, bias)

    (l1, g1), (l2, g2) = grads(lambda *a: loss.fused_lm_head_loss_sums(*a, chunk=chunk)), grads(_unfused)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(loss.fused_lm_head_loss_sums(h, k, bias, tgt, w, chunk)[1]) == pytest.approx(float(jnp.sum(w)))


def test_chunk_size_tiles_the_sequence():
    assert [loss.chunk_size(512, c) for c in (32, 33, 1000, 0)] == [32, 32, 512, 1]
    assert loss.chunk_size(24, 10) == 8 and loss.chunk_size(7, 4) == 1


def test_train_step_with_the_fused_loss_matches_the_unfused_one():
    def losses(cfg, devices):
        step, state, batch = common.synthetic_train_step(cfg, 4, 16, mesh_shape=(1, -1, 1), devices=devices)
        out = []
        for _ in range(2):
            state, m = step(state, batch)
            out.append(float(m["loss"]))
        return out, float(m["grad_norm"])

    one = jax.devices()[:1]
    plain, fused = losses(CFG, one), losses(CFG.replace(loss_chunk=8), one)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6)
    assert fused[1] == pytest.approx(plain[1], rel=1e-5)



def test_multi_device_meshes_keep_the_unfused_loss(caplog):
    # Under a multi-device mesh the chunk loop would all-reduce the LM-head gradient per chunk.
    from phijax import optim, sharding, train_step
    mesh1, mesh8 = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), sharding.make_mesh((1, -1, 1))
    assert loss.fused_applies(8, mesh1) and not loss.fused_applies(8, mesh8) and not loss.fused_applies(0, mesh1)
    cfg, rules = CFG.replace(loss_chunk=8), sharding.DEFAULT_RULES
    schedule = optim.warmup_linear_decay(1e-3, 1, 10)
    tx = optim.adamw(schedule)
    graphdef, _, shardings = train_step.state_shardings(cfg, tx, mesh8, rules)
    bs = train_step.batch_shardings(("inputs", "targets", "loss_weights"), mesh8, rules)
    with caplog.at_level(logging.WARNING, logger="phijax.train_step"):
        train_step.make_train_step(graphdef, cfg, tx, schedule, mesh=mesh8, rules=rules, microbatches=1,
                                   shardings=shardings, batch_sharding=bs)
    assert "loss_chunk=8 ignored" in caplog.text


def test_bad_loss_chunk_is_refused():
    with pytest.raises(ValueError, match="loss_chunk"):
        CFG.replace(loss_chunk=-1)
    assert model.abstract(CFG.replace(loss_chunk=16))  # a training option: the model is the same
