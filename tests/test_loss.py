"""The fused, chunked LM head + cross-entropy against the unfused loss: on one device and under
(data, fsdp, tensor) meshes of the 8 simulated devices, alone and in the train step."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phijax import config, loss, model, optim, sharding, train_step
from phijax.bench import step_timing

CFG = config.preset("nano")
RULES = sharding.DEFAULT_RULES
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8), (1, 2, 4)]
# The logical axes the train step shards the loss's operands by.
H_AXES = ("activation_batch", "activation_length", "activation_embed")
K_AXES, B_AXES, ROW_AXES = ("embed", "vocab"), ("vocab",), ("batch", "activation_length")


def _data(b=2, t=24, d=CFG.d_model, v=CFG.vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((d, v)) * 0.1, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(v) * 0.1, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    w = jnp.asarray(rng.integers(0, 2, (b, t)) * rng.uniform(0.5, 2.0, (b, t)), jnp.float32)  # zeros included
    return h, k, bias, tgt, w


def _unfused(h, k, bias, tgt, w):
    return loss.token_loss_sums(jnp.einsum("btd,dv->btv", h, k) + bias, tgt, w)


def _value_and_grads(fn, h, k, bias, tgt, w):
    """jit(value_and_grad) of fn's loss sum wrt h, kernel and bias."""
    f = lambda h, k, b: fn(h, k, b, tgt, w)[0]
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, k, bias)


@pytest.mark.parametrize("impl", ["xla", "cpu"])  # cpu: the softmax cross-entropy in the XLA:CPU kernel
@pytest.mark.parametrize("chunk", [1, 10, 100])  # 10: falls back to 8, the largest divisor of 24
def test_fused_loss_and_gradients_equal_the_unfused_ones(chunk, impl):
    data = _data(v=CFG.vocab_size + 5)  # not a multiple of the kernel's 16 lanes
    (l1, g1), (l2, g2) = _value_and_grads(lambda *a: loss.fused_lm_head_loss_sums(*a, chunk=chunk, impl=impl),
                                          *data), _value_and_grads(_unfused, *data)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(loss.fused_lm_head_loss_sums(*data, chunk)[1]) == pytest.approx(float(jnp.sum(data[4])))


def test_chunk_size_tiles_the_sequence():
    assert [loss.chunk_size(512, c) for c in (32, 33, 1000, 0)] == [32, 32, 512, 1]
    assert loss.chunk_size(24, 10) == 8 and loss.chunk_size(7, 4) == 1


# ------------------------------------------------------------------ under a mesh
def _on_mesh(mesh, rules, h, k, bias, tgt, w):
    """The operands laid out as the train step lays them out."""
    put = lambda x, axes: jax.device_put(x, sharding.named_sharding(axes, rules, mesh, x.shape))
    return (put(h, H_AXES), put(k, K_AXES), put(bias, B_AXES), put(tgt, ROW_AXES), put(w, ROW_AXES))


def _sharded_fused(mesh, rules, chunk, impl="xla"):
    def fn(*a):
        with sharding.use_mesh_rules(mesh, rules):
            return loss.fused_lm_head_loss_sums(*a, chunk, impl=impl)
    return fn


# Rules other than the defaults (the first rule for an axis wins). SEQ: positions split over
# fsdp, the kernel's input dim over data (a row axis, but not fsdp). GATHERED: splits the loop
# cannot use, gathered on the way in: the kernel's input dim over tensor (not a row axis), the
# vocab over data (a row axis).
SEQ_RULES = (("batch", "data"), ("activation_batch", "data"), ("activation_length", "fsdp"), ("embed", "data")) + RULES
GATHERED_RULES = (("embed", "tensor"), ("vocab", "data")) + RULES

CASES = [pytest.param(m, {}, RULES, id=str(m)) for m in MESHES] + [
    pytest.param((8, 1, 1), dict(b=4), RULES, id="rows-replicated"),  # 4 rows over 8 devices
    pytest.param((1, 4, 2), dict(d=50, v=321), RULES, id="kernel-replicated"),  # neither dim divides
    pytest.param((2, 2, 2), {}, SEQ_RULES, id="seq-rules"),
    pytest.param((2, 2, 2), {}, GATHERED_RULES, id="gathered-rules"),
]


def test_the_sharded_layout_follows_the_rules():
    mesh = sharding.make_mesh((2, 2, 2))
    h, k = jax.ShapeDtypeStruct((8, 16, 48), jnp.float32), jax.ShapeDtypeStruct((48, 320), jnp.float32)
    for rules, axes in [(RULES, (("data", "fsdp"), ("fsdp",), ("tensor",))),
                        (SEQ_RULES, (("data", "fsdp"), ("data",), ("tensor",))),
                        (GATHERED_RULES, (("data", "fsdp"), (), ()))]:
        with sharding.use_mesh_rules(mesh, rules):
            assert tuple(loss._layout(h, k).ax) == axes, rules
    assert loss._layout(h, k) is None  # no mesh: the one-device loop
    with sharding.use_mesh_rules(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), RULES):
        assert loss._layout(h, k) is None


@pytest.mark.parametrize("mesh_shape, dims, rules, impl", [pytest.param(*c.values, "xla", id=c.id) for c in CASES] + [
    pytest.param((8, 1, 1), {}, RULES, "cpu", id="cpu-kernel"),  # the vocab whole per device: the kernel runs
    pytest.param((2, 2, 2), {}, RULES, "cpu", id="cpu-kernel-vocab-split")])  # split: XLA combines the lse
def test_sharded_fused_loss_and_gradients_equal_the_unfused_ones(mesh_shape, dims, rules, impl):
    data = _data(**{"b": 8, "t": 16, **dims})
    mesh = sharding.make_mesh(mesh_shape)
    (l1, g1) = _value_and_grads(_sharded_fused(mesh, rules, 4, impl), *_on_mesh(mesh, rules, *data))
    (l2, g2) = _value_and_grads(_unfused, *data)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with sharding.use_mesh_rules(mesh, rules):
        assert float(loss.fused_lm_head_loss_sums(*_on_mesh(mesh, rules, *data), 4)[1]) == \
            pytest.approx(float(jnp.sum(data[4])))


def _vocab_reductions(hlo: str, vocab_sizes) -> tuple[int, int]:
    """(all, inside while-loop bodies) counts of the all-reduces / reduce-scatters in compiled HLO
    text whose result has a dim in vocab_sizes (the LM-head weight/bias gradient or a shard of it)."""
    comps, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            comps[name] = []
        elif line.strip() == "}":
            name = None
        elif name:
            comps[name].append(line)
    in_loops, todo = set(), re.findall(r"body=%?([\w.\-]+)", hlo)
    while todo:  # the loop bodies and every computation they call
        c = todo.pop()
        if c in comps and c not in in_loops:
            in_loops.add(c)
            todo += re.findall(r"%([\w.\-]+)", "\n".join(comps[c]))

    def count(lines):
        ops = [re.search(r"=\s*(.+?)\s(?:all-reduce|reduce-scatter|all-reduce-start)\(", ln) for ln in lines]
        return sum(1 for m in ops if m and {int(x) for x in re.findall(r"\d+", " ".join(
            re.findall(r"\[([\d,]+)\]", m.group(1))))} & set(vocab_sizes))

    return sum(count(v) for v in comps.values()), sum(count(comps[c]) for c in in_loops)


def test_the_weight_gradient_is_reduced_once_not_per_chunk():
    # d=48, vocab 320 (shards 160, 80, 40): no activation dim of these shapes is vocab-like.
    data = _data(b=8, t=16, d=48, v=320)
    vocab_sizes = (320, 160, 80, 40)
    mesh = sharding.make_mesh((2, 2, 2))
    args = _on_mesh(mesh, RULES, *data)

    def hlo(fn):
        f = lambda h, k, b, t, w: fn(h, k, b, t, w)[0]
        return jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*args).compile().as_text()

    two, eight = (_vocab_reductions(hlo(_sharded_fused(mesh, RULES, c)), vocab_sizes) for c in (8, 2))
    assert two == eight and two[0] >= 1 and two[1] == 0, (two, eight)
    # The check sees the per-chunk reduction it guards against: the one-device loop as XLA
    # partitions it by itself reduces the weight gradient inside the loop.
    one_device_loop = lambda h, k, b, t, w: (loss._fused_nll_sum(h, k, b, t, w, 2, "xla", None),)
    assert _vocab_reductions(hlo(one_device_loop), vocab_sizes)[1] >= 1


# ------------------------------------------------------------------ in the train step
def _losses(step, state, batch, steps=2):
    out = []
    for _ in range(steps):
        state, m = step(state, batch)
        out.append(float(m["loss"]))
    return out, float(m["grad_norm"])


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_train_step_with_the_fused_loss_matches_the_unfused_one(impl):
    one = jax.devices()[:1]
    plain, fused = (_losses(*step_timing.synthetic_train_step(cfg, 4, 16, mesh_shape=(1, -1, 1), devices=one))
                    for cfg in (CFG, CFG.replace(loss_chunk=8, loss_kernel=impl)))
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6)
    assert fused[1] == pytest.approx(plain[1], rel=1e-5)


def test_sharded_train_step_with_the_fused_loss_matches_the_unfused_one():
    plain, fused = (_losses(*step_timing.synthetic_train_step(cfg, 4, 16, mesh_shape=(2, 2, 2)))
                    for cfg in (CFG, CFG.replace(loss_chunk=8)))
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6)
    assert fused[1] == pytest.approx(plain[1], rel=1e-5)


def test_sharded_train_step_with_the_fused_loss_and_microbatches():
    # The fused loss's shard_maps inside the train step's microbatch scan (4 microbatches of 2 rows).
    mesh = sharding.make_mesh((1, 2, 4))
    schedule = optim.warmup_linear_decay(1e-4, 10, 10_000)
    tx = optim.adamw(schedule)
    bs = train_step.batch_shardings(("inputs", "targets", "loss_weights"), mesh, RULES)
    w = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 17)).astype(np.int32)
    batch = train_step.to_global(
        {"inputs": w[:, :-1], "targets": w[:, 1:], "loss_weights": np.ones((8, 16), np.float32)}, bs)

    def run(cfg, microbatches):
        graphdef, _, shardings = train_step.state_shardings(cfg, tx, mesh, RULES)
        step = train_step.make_train_step(graphdef, cfg, tx, schedule, mesh=mesh, rules=RULES,
                                          microbatches=microbatches, shardings=shardings, batch_sharding=bs)
        return _losses(step, train_step.init_state(cfg, tx, 0, shardings), batch)

    plain, fused = run(CFG, 1), run(CFG.replace(loss_chunk=8), 4)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6)
    assert fused[1] == pytest.approx(plain[1], rel=1e-5)


def test_bad_loss_chunk_is_refused():
    with pytest.raises(ValueError, match="loss_chunk"):
        CFG.replace(loss_chunk=-1)
    assert model.abstract(CFG.replace(loss_chunk=16))  # a training option: the model is the same
