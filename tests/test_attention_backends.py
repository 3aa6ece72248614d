"""Fused attention backends against the XLA reference, where they can run on a CPU.

- cudnn: the exact jax.nn.dot_product_attention call (causal + segment mask argument) with
  implementation='xla'; the cuDNN kernel itself needs a GPU (scripts/device_attention_check.py).
- splash: the Pallas TPU kernel in interpret mode, forward and gradients, GQA and packed
  segments, alone and inside the model's train step under an 8-device mesh (shard_map path).
- auto: which backend each compile target gets.
- remat: the host-offload policies compute the same gradients as no remat; save_dots_attn keeps
  the fused kernel's forward outputs.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phijax import attention, config, model, remat, sharding
from phijax.kernels import splash


def _qkv(b, t, h, kv, d, seed=0):
    rng = np.random.default_rng(seed)  # numpy: no XLA compile per shape
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d)))


def _segments(t):
    # Row 0: two examples; row 1: three, the last one crossing the middle of the row.
    return jnp.asarray(np.stack([np.repeat([1, 2], [t // 2, t - t // 2]),
                                 np.repeat([1, 2, 3], [t // 4, t // 4 + 8, t - t // 2 - 8])]), jnp.int32)


def test_cudnn_call_with_segment_mask_matches_reference():
    q, k, v = _qkv(2, 64, 4, 2, 16)
    tol = 1e-5
    seg = _segments(64)

    @jax.jit
    def run(q, k, v, seg):
        return (attention.xla_attention(q, k, v, segment_ids=seg),
                attention.cudnn_attention(q, k, v, segment_ids=seg, implementation="xla"),
                attention.cudnn_attention(q, k, v, implementation="xla"))

    ref, out, unmasked = (np.asarray(x, np.float32) for x in run(q, k, v, seg))
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    # The segment mask is what makes them agree: causal alone lets examples see each other.
    assert np.max(np.abs(unmasked - ref)) > 10 * tol


def test_cudnn_refuses_attention_dropout():
    q, k, v = _qkv(1, 16, 2, 2, 8)
    with pytest.raises(NotImplementedError, match="dropout"):
        attention.cudnn_attention(q, k, v, dropout_rate=0.1, dropout_key=jax.random.key(0))


def test_splash_interpret_matches_reference_forward_and_grads():
    # t=256 in 128-blocks: the causal mask skips the upper tile; GQA with 2 q heads per kv head.
    q, k, v = _qkv(2, 256, 2, 1, 16)
    seg = _segments(256)

    def value_and_grads(fn):
        def loss(q, k, v):
            out = fn(q, k, v, segment_ids=seg)
            return jnp.sum(out * jnp.cos(out)), out  # a non-trivial cotangent
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out), grads = value_and_grads(functools.partial(splash.splash_attention, block_size=128))
    (_, ref_out), ref_grads = value_and_grads(attention.xla_attention)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=2e-4, rtol=2e-4)


def test_splash_refuses_what_it_cannot_do():
    q, k, v = _qkv(1, 96, 2, 2, 8)
    with pytest.raises(NotImplementedError, match="multiples of 128"):
        splash.splash_attention(q, k, v)
    q, k, v = _qkv(1, 128, 2, 2, 8)
    with pytest.raises(NotImplementedError, match="dropout"):
        splash.splash_attention(q, k, v, dropout_rate=0.1, dropout_key=jax.random.key(0))


def test_splash_under_the_trainer_mesh_matches_xla():
    # 8 CPU devices as (data 4, fsdp 1, tensor 2), inputs laid out as the model's activations:
    # splash runs in shard_map over batch and heads (its TPU lowering: tests/test_compile_check.py).
    mesh = sharding.make_mesh((4, 1, 2))
    rules = sharding.DEFAULT_RULES
    q, k, v = _qkv(4, 128, 4, 2, 16, seed=1)
    seg = jnp.tile(_segments(128), (2, 1))
    q = jax.device_put(q, sharding.named_sharding(("activation_batch", None, "activation_heads", None), rules, mesh))
    kv_sharding = sharding.named_sharding(("activation_batch", None, "activation_kv_heads", None), rules, mesh)
    k, v = jax.device_put(k, kv_sharding), jax.device_put(v, kv_sharding)

    def run(fn):
        def f(q, k, v, seg):
            with sharding.use_mesh_rules(mesh, rules):
                return fn(q, k, v, segment_ids=seg)
        return jax.jit(f)(q, k, v, seg)

    out = run(attention.splash_attention)
    assert out.sharding.spec[0] == ("data", "fsdp")  # stays batch-sharded
    np.testing.assert_allclose(out, run(attention.xla_attention), atol=2e-5, rtol=2e-5)


def test_auto_picks_by_compile_target():
    shape_q, shape_kv = (2, 2048, 32, 64), (2, 2048, 32, 64)
    assert jax.default_backend() == "cpu"
    assert attention.auto_choice(shape_q, shape_kv, jnp.bfloat16, dropout=False) == "xla"
    # Inside a mesh of TPU devices (as in phijax.compile_check) auto means splash where it can.
    from phijax import compile_check
    tpu_mesh = sharding.make_mesh((-1, 1, 1), devices=compile_check.parse_topology("v5e:2x2").devices())
    with sharding.use_mesh_rules(tpu_mesh, sharding.DEFAULT_RULES):
        assert attention.auto_choice(shape_q, shape_kv, jnp.bfloat16, dropout=False) == "splash"
        assert attention.auto_choice(shape_q, shape_kv, jnp.bfloat16, dropout=True) == "xla"
        assert attention.auto_choice((2, 100, 32, 64), (2, 100, 32, 64), jnp.bfloat16, dropout=False) == "xla"


def _count_eqns(jaxpr, count) -> int:
    """Sum of count(eqn) over the equations of jaxpr, nested jaxprs included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += count(eqn)
        for p in eqn.params.values():
            for x in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(x, "jaxpr", x)
                if hasattr(inner, "eqns"):
                    n += _count_eqns(inner, count)
    return n


def _host_copies(jaxpr) -> int:
    """device_put equations into host memory."""
    return _count_eqns(jaxpr, lambda e: e.primitive.name == "device_put" and sum(
        "host" in str(getattr(v.aval, "memory_space", "")).lower() for v in e.outvars))


def test_save_dots_attn_keeps_the_fused_attention_forward():
    # save_dots recomputes a fused kernel's forward in the backward pass (it is no dot);
    # save_dots_attn saves its outputs, so its gradient has one attention forward call fewer.
    q, k, v = _qkv(2, 128, 2, 2, 16)
    attn = functools.partial(splash.splash_attention, block_size=128)

    def pallas_calls(policy):
        def loss(q, k, v):
            f = remat.apply(lambda q, k, v: jnp.tanh(attn(q, k, v) @ jnp.ones((16, 16))), policy)
            return jnp.sum(f(q, k, v) ** 2)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
        return _count_eqns(jaxpr, lambda e: e.primitive.name == "pallas_call")

    assert pallas_calls("save_dots_attn") == pallas_calls("save_dots") - 1
    assert pallas_calls("save_dots_attn") == pallas_calls("none")


def test_offload_dots_moves_the_models_activations_to_host():
    cfg = config.preset("nano")
    tokens = jnp.zeros((2, 32), jnp.int32)
    params = model.abstract(cfg)[1]

    def host_copies(policy):
        graphdef = model.abstract(cfg.replace(remat_policy=policy))[0]
        grad = jax.grad(lambda p: jnp.mean(model.apply(graphdef, p, tokens) ** 2))
        return _host_copies(jax.make_jaxpr(grad)(params).jaxpr)

    assert host_copies("offload_dots") > 0
    assert host_copies("save_dots_no_batch") == 0


def test_offload_dots_gives_the_gradients_of_no_remat():
    # XLA:CPU has a pinned_host memory space, so the offload copies really run here.
    rng = np.random.default_rng(0)
    ws, x = jnp.asarray(rng.standard_normal((3, 16, 16)) / 4, jnp.float32), jnp.asarray(rng.standard_normal((4, 16)))

    def grads(policy):
        def loss(ws):
            h, _ = jax.lax.scan(remat.apply(lambda h, w: (jnp.tanh(h @ w), None), policy), x, ws)
            return jnp.sum(h ** 2)
        return jax.jit(jax.grad(loss))(ws)

    np.testing.assert_allclose(grads("offload_dots"), grads("none"), atol=1e-6, rtol=1e-6)


def test_unknown_remat_policy_lists_the_known_ones():
    with pytest.raises(ValueError, match="offload_dots"):
        remat.apply(lambda x: x, "offload_everything")
