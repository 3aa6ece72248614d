"""Sharded training equals single-device training, and parameters are laid out as the rules say."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from phijax import config, optim, sharding, train_step

RULES = list(sharding.DEFAULT_RULES)
CFG = config.preset("nano", vocab_size=128, d_model=64, n_heads=4, head_dim=16, d_mlp=128)
BATCH, SEQ, STEPS = 8, 32, 4


def _batches(seed=0):
    # Two fixed batches, alternating: the model can memorise them, so the loss must fall.
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        w = rng.integers(0, CFG.vocab_size // 8, (BATCH, SEQ + 1)).astype(np.int32)
        weights = (rng.random((BATCH, SEQ)) > 0.2).astype(np.float32)
        out.append({"inputs": w[:, :-1], "targets": w[:, 1:], "loss_weights": weights})
    return [out[i % 2] for i in range(STEPS)]


def _run(mesh_shape, microbatches=1, cfg=CFG):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    schedule = optim.warmup_linear_decay(1e-2, 2, STEPS)
    tx = optim.adamw(schedule, weight_decay=0.1)
    graphdef, _, shardings = train_step.state_shardings(cfg, tx, mesh, RULES)
    state = train_step.init_state(cfg, tx, 0, shardings)
    bs = train_step.batch_shardings(("inputs", "targets", "loss_weights"), mesh, RULES)
    step = train_step.make_train_step(graphdef, cfg, tx, schedule, mesh=mesh, rules=RULES,
                                      microbatches=microbatches, shardings=shardings, batch_sharding=bs)
    losses = []
    for b in _batches():
        state, m = step(state, train_step.to_global(b, bs))
        losses.append(float(m["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def single():
    return _run((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8)])
def test_sharded_losses_match_single_device(single, mesh_shape):
    ref, _ = single
    losses, state = _run(mesh_shape)
    assert ref[-1] < ref[0]  # it trains
    np.testing.assert_allclose(losses, ref, rtol=1e-5)


def test_microbatches_match_full_batch(single):
    ref, _ = single
    losses, _ = _run((2, 2, 2), microbatches=2)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)


def test_parameters_sharded_as_rules_say():
    _, state = _run((1, 4, 2))
    p = state["params"]
    # embed -> fsdp (4), heads/mlp/vocab -> tensor (2), layers/head_dim -> replicated.
    assert p["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert p["layers"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert p["layers"]["mlp"]["fc2"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert p["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    assert p["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    k = p["layers"]["mlp"]["fc1"]["kernel"]
    assert {s.data.shape for s in k.addressable_shards} == {(CFG.n_layers, CFG.d_model // 4, CFG.d_mlp // 2)}
    # Adam moments follow their parameter.
    mu = state["opt_state"][1][0].mu["layers"]["mlp"]["fc1"]["kernel"]
    assert mu.sharding.spec == k.sharding.spec


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs 16 devices but 8"):
        sharding.make_mesh((4, 4, 1))
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh((-1, 3, 1))
    mesh = sharding.make_mesh((2, 2, 2))
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'bogus'"):
        sharding.logical_to_spec(("bogus",), RULES, mesh)
    with pytest.raises(ValueError, match="mesh has axes"):
        sharding.logical_to_spec(("embed",), [("embed", "model")], mesh)


def test_standard_rules_override_entries_by_logical_axis():
    assert sharding.standard_rules() == sharding.DEFAULT_RULES
    rules = sharding.standard_rules([("embed", None), ["mlp", ["fsdp", "tensor"]]])
    assert [name for name, _ in rules] == [name for name, _ in sharding.DEFAULT_RULES]  # order kept
    assert dict(rules)["embed"] is None and dict(rules)["mlp"] == ("fsdp", "tensor")
    assert {k: v for k, v in rules if k not in ("embed", "mlp")} == \
        {k: v for k, v in sharding.DEFAULT_RULES if k not in ("embed", "mlp")}
    with pytest.raises(ValueError, match="'embedding': unknown logical axis"):
        sharding.standard_rules([("embedding", "fsdp")])
    with pytest.raises(ValueError, match="'mlp' -> 'model': not a mesh axis"):
        sharding.standard_rules([("mlp", ("fsdp", "model"))])
    with pytest.raises(ValueError, match="'mlp' is given twice"):
        sharding.standard_rules([("mlp", None), ("mlp", "tensor")])
    with pytest.raises(ValueError, match="must be \\(logical_axis, mesh_axes\\)"):
        sharding.standard_rules([("mlp",)])
