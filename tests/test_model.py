"""Model behaviour beyond HF parity: packing, remat, dtypes, dropout, import hygiene."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phijax import attention, config, model, train_step

CFG = config.preset("nano")


@pytest.fixture(scope="module")
def nano():
    graphdef, params, _ = model.split(model.init(CFG, 0))
    return graphdef, params


def _fwd(graphdef, params, tokens, **kw):
    return jax.jit(lambda p, t: model.apply(graphdef, p, t, **kw))(params, tokens)


def test_packed_examples_do_not_attend_to_each_other(nano):
    graphdef, params = nano
    rng = np.random.default_rng(0)
    a = rng.integers(0, CFG.vocab_size, (1, 7)).astype(np.int32)
    b = rng.integers(0, CFG.vocab_size, (1, 9)).astype(np.int32)
    packed = np.concatenate([a, b], axis=1)
    seg = np.array([[1] * 7 + [2] * 9], np.int32)
    pos = np.array([list(range(7)) + list(range(9))], np.int32)
    out = model.apply(graphdef, params, packed, segment_ids=seg, positions=pos)
    np.testing.assert_allclose(out[:, :7], model.apply(graphdef, params, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], model.apply(graphdef, params, b), atol=1e-5)
    # Without segment ids the second example does see the first.
    unmasked = model.apply(graphdef, params, packed, positions=pos)
    assert np.abs(unmasked[:, 7:] - out[:, 7:]).max() > 1e-3


def test_causal_mask_future_tokens_do_not_matter(nano):
    graphdef, params = nano
    t = np.arange(12, dtype=np.int32)[None] % CFG.vocab_size
    t2 = t.copy()
    t2[0, 8:] = 5
    o1, o2 = model.apply(graphdef, params, t), model.apply(graphdef, params, t2)
    np.testing.assert_allclose(o1[:, :8], o2[:, :8], atol=1e-6)
    assert np.abs(o1[:, 8:] - o2[:, 8:]).max() > 1e-4


def test_grouped_query_attention_equals_repeated_kv():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
    out = attention.xla_attention(q, k, v)
    ref = attention.xla_attention(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.get_backend("nope")


@pytest.mark.parametrize("t,kv,packed,causal", [(256, 2, True, True), (256, 1, False, True), (40, 2, True, False)])
def test_xla_attention_gradient_equals_autodiff_of_plain_softmax(t, kv, packed, causal):
    """xla_attention's written-out backward (query blocks, dS = P * (dP - rowsum(dO * O)), dK/dV
    formed transposed) against autodiff of one softmax over the whole masked score matrix."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, t, kv, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.repeat([[1, 2, 3]], [t // 3, t // 2, t - t // 3 - t // 2], axis=1).repeat(2, 0)) if packed else None
    if t == 256:
        assert attention.causal_blocks(t) == 2  # the blocked path really runs

    def plain(q, k, v, segment_ids, causal):
        return attention._attend(q, k, v, attention.make_mask(t, t, segment_ids, segment_ids, causal), 0.0, None)

    def value_and_grads(fn):
        def loss(q, k, v):
            out = fn(q, k, v, segment_ids=seg, causal=causal)
            return jnp.sum(out * jnp.cos(out)), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out), grads = value_and_grads(attention.xla_attention)
    (_, ref), ref_grads = value_and_grads(plain)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=2e-5)
        assert np.abs(np.asarray(r)).max() > 1e-2  # a real gradient, not zeros on both sides


def test_rotary_gradient_is_the_inverse_rotation():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 6, 3, 8)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 6, 3, 8)), jnp.float32)
    cos, sin = model.rotary_tables(jnp.asarray(rng.integers(0, 50, (2, 6))), 4, 10000.0)
    _, vjp = jax.vjp(lambda x: model.apply_rotary(x, cos, sin, 4), x)
    _, ref_vjp = jax.vjp(lambda x: model._rotate(x, cos, sin, 4), x)  # autodiff of the same forward
    np.testing.assert_allclose(vjp(g)[0], ref_vjp(g)[0], atol=1e-6)
    np.testing.assert_allclose(model.apply_rotary(x, cos, sin, 4)[..., 4:], x[..., 4:])  # only rotary_dim rotates


def test_gelu_and_layer_norm_gradients_equal_autodiff_of_their_forward():
    """The written-out VJPs (they keep less and recompute in one pass) against autodiff of the
    same forward, in fp32 and bf16."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 7, 32)) * 3, jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 7, 32)), jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=32), jnp.float32) for _ in range(2))

    def plain_gelu(x):
        return 0.5 * x * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * jnp.power(x, 3.0))))

    def plain_ln(x, scale, bias):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + 1e-5)
        return (y * scale + bias).astype(x.dtype)

    ln = lambda x, s, b: model.layer_norm(x, s, b, 1e-5)
    for dtype, atol in ((jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)):
        xd, gd = x.astype(dtype), g.astype(dtype)
        for fn, ref, args in ((model.gelu_new, plain_gelu, (xd,)), (ln, plain_ln, (xd, scale, bias))):
            out, vjp = jax.vjp(fn, *args)
            ref_out, ref_vjp = jax.vjp(ref, *args)
            assert out.dtype == dtype
            np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref_out, np.float32))
            for a, b in zip(vjp(gd), ref_vjp(gd)):
                assert a.dtype == b.dtype
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol,
                                           rtol=atol)


def _loss_and_grads(cfg, params, graphdef, key=None):
    rng = np.random.default_rng(2)
    w = rng.integers(0, cfg.vocab_size, (2, 17)).astype(np.int32)

    def loss(p):
        logits = model.apply(graphdef, p, w[:, :-1], dropout_key=key)
        s, n = train_step.token_loss_sums(logits, w[:, 1:], np.ones((2, 16), np.float32))
        return s / n

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_dots_no_batch", "save_dots_attn", "save_attn_mlp"])
def test_remat_policies_give_the_same_gradients(nano, no_remat_grads, policy):
    graphdef, params = nano
    ref_l, ref_g = no_remat_grads
    g2, _, _ = model.abstract(CFG.replace(remat_policy=policy))
    l, g = _loss_and_grads(CFG, params, g2)
    np.testing.assert_allclose(l, ref_l, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, ref_g)


@pytest.fixture(scope="module")
def no_remat_grads(nano):
    graphdef, params = nano
    return _loss_and_grads(CFG, params, graphdef)


def test_unknown_remat_policy_is_refused(nano):
    with pytest.raises(ValueError, match="unknown remat policy"):
        _loss_and_grads(CFG, nano[1], model.abstract(CFG.replace(remat_policy="bogus"))[0])


def test_scan_unroll_gives_the_same_logits(nano):
    graphdef, params = nano
    t = np.arange(16, dtype=np.int32)[None]
    unrolled = model.abstract(CFG.replace(scan_unroll=CFG.n_layers))[0]
    np.testing.assert_allclose(model.apply(unrolled, params, t), model.apply(graphdef, params, t), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="scan_unroll"):
        CFG.replace(scan_unroll=CFG.n_layers + 1)


def test_bf16_compute_keeps_fp32_params_and_is_close(nano):
    graphdef, params = nano
    g16, p_abs, _ = model.abstract(CFG.replace(dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p_abs))
    t = np.arange(16, dtype=np.int32)[None]
    out16 = model.apply(g16, params, t)
    out32 = model.apply(graphdef, params, t)
    assert out16.dtype == jnp.float32  # logits always fp32
    assert np.abs(np.asarray(out16) - np.asarray(out32)).max() < 0.1


def test_dropout_is_keyed_and_off_without_key(nano):
    _, params = nano
    cfg = CFG.replace(attn_dropout=0.1, resid_dropout=0.1, embd_dropout=0.1)
    g, _, _ = model.abstract(cfg)
    t = np.arange(16, dtype=np.int32)[None]
    k = jax.random.key(0)
    with_key = jax.jit(lambda p, key: model.apply(g, p, t, dropout_key=key))  # one compile, not op by op
    a, b = with_key(params, k), with_key(params, k)
    np.testing.assert_array_equal(a, b)
    c = with_key(params, jax.random.key(1))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    np.testing.assert_allclose(_fwd(g, params, t), _fwd(nano[0], params, t), atol=1e-6)


def test_config_validation_and_presets():
    assert abs(config.preset("phi1").param_count() / 1e9 - 1.418) < 0.001  # phi-1 "1.3B" (untied head)
    assert abs(config.preset("tiny").param_count() / 1e6 - 7.36) < 0.01
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of n_kv_heads=4"):
        config.PhiConfig(n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="rotary_dim=65"):
        config.PhiConfig(rotary_dim=65)
    with pytest.raises(ValueError, match="unknown model preset"):
        config.preset("phi9")


def test_core_modules_import_without_tensorflow():
    code = ("import sys, phijax.model, phijax.train_step, phijax.checkpoint, phijax.convert, phijax.metrics, "
            "phijax.data.pipeline; bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
