"""attention='cpu': the XLA:CPU FFI kernel (phijax/kernels/cpu/attention.cc) against the reference
attention, alone, with RoPE applied inside, under the trainer's mesh and in the train step; and the
kernels' build (the host's C++ compiler, a cache keyed by what the library depends on). The loss
kernel is tested with the fused loss (tests/test_loss.py)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phijax import attention, config, model, sharding, train_setup
from phijax.bench import step_timing
from phijax.kernels import cpu_attention as ca, cpu_ffi


def _inputs(b, t, h, kv, d, rd, packed, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv, d)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32) if packed else None
    # Packed rows restart their positions, so each row has its own angles.
    tables = model.rotary_tables(jnp.asarray(rng.integers(0, 2000, (b, t))), rd, 10000.0) if rd else None
    return q, k, v, seg, tables


def _value_and_grads(fn, q, k, v):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * jnp.cos(out)), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


def _reference(seg, tables, causal, rd):
    def fn(q, k, v):
        if tables is not None:
            q, k = (model.apply_rotary(x, *tables, rd) for x in (q, k))
        return attention.xla_attention(q, k, v, segment_ids=seg, causal=causal)
    return fn


def _assert_close(got, ref):
    (_, out), grads = got
    (_, ref_out), ref_grads = ref
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5)
        assert np.abs(np.asarray(r)).max() > 1e-2  # a real gradient, not zeros on both sides


@pytest.mark.parametrize("b,t,h,kv,d,rd,packed,causal", [
    (2, 256, 4, 4, 64, 32, True, True),  # the tiny model's shape, packed, RoPE in the kernel
    (2, 37, 4, 2, 16, 0, False, True),  # a partial query block, grouped-query attention, rotated outside
    (1, 130, 6, 2, 24, 8, True, True),  # head_dim not a multiple of 16: the micro-kernel's edges
    (2, 70, 2, 1, 32, 32, True, False),  # not causal: packed rows still see only their segment
])
def test_kernel_matches_the_reference_values_and_gradients(b, t, h, kv, d, rd, packed, causal):
    q, k, v, seg, tables = _inputs(b, t, h, kv, d, rd, packed)
    got = _value_and_grads(lambda q, k, v: ca.cpu_attention(q, k, v, segment_ids=seg, causal=causal, rotary=tables),
                           q, k, v)
    _assert_close(got, _value_and_grads(_reference(seg, tables, causal, rd), q, k, v))


def test_half_precision_inputs_come_back_in_their_dtype():
    q, k, v, seg, tables = _inputs(2, 64, 4, 4, 32, 16, True)
    out = ca.cpu_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), segment_ids=seg, rotary=tables)
    ref = _reference(seg, tables, True, 16)(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


def test_kernel_under_the_trainer_mesh_matches_one_device():
    q, k, v, seg, tables = _inputs(4, 64, 4, 2, 32, 16, True)
    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.DEFAULT_RULES
    put = lambda x, axes: jax.device_put(x, sharding.named_sharding(axes, rules, mesh, x.shape))
    qs = put(q, ("activation_batch", "activation_length", "activation_heads", None))
    ks, vs = (put(x, ("activation_batch", "activation_length", "activation_kv_heads", None)) for x in (k, v))

    def sharded(q, k, v):
        with sharding.use_mesh_rules(mesh, rules):
            return ca.cpu_attention(q, k, v, segment_ids=seg, rotary=tables)

    _assert_close(_value_and_grads(sharded, qs, ks, vs), _value_and_grads(_reference(seg, tables, True, 16), q, k, v))


def test_train_step_with_the_kernel_matches_xla_attention():
    cfg = config.preset("nano")
    one = jax.devices()[:1]
    runs = {}
    for name in ("xla", "cpu"):
        step, state, batch = step_timing.synthetic_train_step(cfg.replace(attention=name), 4, 32, mesh_shape=(1, 1, 1),
                                                              devices=one)
        hlo = step.lower(state, batch).as_text()
        assert (ca.FORWARD in hlo and ca.BACKWARD in hlo) == (name == "cpu")
        losses = []
        for _ in range(3):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        runs[name] = losses, float(m["grad_norm"])
    np.testing.assert_allclose(runs["cpu"][0], runs["xla"][0], rtol=1e-5)
    assert runs["cpu"][1] == pytest.approx(runs["xla"][1], rel=1e-4)
    assert runs["cpu"][0][2] < runs["cpu"][0][0]  # it trains


def test_what_the_kernel_cannot_do_is_refused_by_name():
    q, k, v, _, tables = _inputs(1, 16, 2, 2, 8, 4, False)
    cases = [
        (dict(dropout_rate=0.1, dropout_key=jax.random.key(0)), "attention dropout"),
        (dict(rotary=(tables[0][..., :3], tables[1][..., :3])), "rotary tables"),
    ]
    for kwargs, what in cases:
        with pytest.raises(NotImplementedError, match=what):
            ca.cpu_attention(q, k, v, **kwargs)
    with pytest.raises(NotImplementedError, match="lengths must be equal"):
        ca.cpu_attention(q, k[:, :8], v[:, :8])


def test_build_is_cached_and_failures_name_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIJAX_KERNEL_CACHE", str(tmp_path / "cache"))
    lib = cpu_ffi.build()
    assert lib.parent == tmp_path / "cache" and lib.exists()
    mtime = lib.stat().st_mtime_ns
    assert cpu_ffi.build() == lib and lib.stat().st_mtime_ns == mtime  # built once
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary left behind

    bad = tmp_path / "cpu"
    bad.mkdir()
    for src in cpu_ffi.SOURCES.iterdir():
        (bad / src.name).write_text(src.read_text())
    (bad / "xent.cc").write_text((bad / "xent.cc").read_text() + "\nthis is not C++;\n")
    monkeypatch.setattr(cpu_ffi, "SOURCES", bad)
    assert cpu_ffi.library_path() != lib  # other sources, another library
    with pytest.raises(cpu_ffi.KernelBuildError, match="building phijax's CPU kernels failed"):
        cpu_ffi.build()
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(cpu_ffi.KernelBuildError, match="no C\\+\\+ compiler.*no-such-compiler-here.*'xla' needs none"):
        cpu_ffi.build()
    # A run that asks for a kernel fails in its set-up, before any state or data exists.
    for field in ("attention", "loss_kernel"):
        run = train_setup.RunConfig(model_config=config.preset("nano", loss_chunk=8, **{field: "cpu"}), batch_size=2,
                                    seq_len=16, mesh_shape=(1, 1, 1), data_source=step_timing.SYNTHETIC)
        with pytest.raises(cpu_ffi.KernelBuildError, match="no-such-compiler-here"):
            train_setup.setup(run, devices=jax.devices()[:1])


def test_the_kernels_are_refused_off_the_cpu():
    with pytest.raises(ValueError, match="attention='cpu' is an XLA:CPU kernel; this run's devices are tpu"):
        attention.prepare_backend("cpu", "tpu")
    with pytest.raises(ValueError, match="loss_kernel='cpu' is an XLA:CPU kernel; this run's devices are gpu"):
        cpu_ffi.require("gpu", "loss_kernel='cpu'")
    with pytest.raises(ValueError, match="loss_kernel='cpu' is the fused loss's kernel: set loss_chunk > 0"):
        config.preset("nano", loss_kernel="cpu")
