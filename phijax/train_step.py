"""Train state, its shardings, and the one jitted train step (no tensorflow, no gin).

State = {'params', 'opt_state', 'step' (int32), 'rng' (uint32 key data)}. The dropout key
of step s is fold_in(rng, s), so a resumed run draws the same masks as an uninterrupted one.
Gradient accumulation scans over microbatches and normalises by the total loss weight of
the whole global batch, so the loss and update do not depend on the microbatch count.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from phijax import loss as loss_lib
from phijax import model as model_lib
from phijax import sharding
from phijax.loss import token_loss_sums  # noqa: F401  (the train step's loss, importable from here)
from phijax.config import PhiConfig

BATCH_AXES = {  # logical axes of every batch feature ([batch, length])
    "inputs": ("batch", "activation_length"),
    "targets": ("batch", "activation_length"),
    "loss_weights": ("batch", "activation_length"),
    "positions": ("batch", "activation_length"),
    "segment_ids": ("batch", "activation_length"),
}


def param_shardings(cfg: PhiConfig, mesh: Mesh, rules):
    graphdef, abstract_params, axes = model_lib.abstract(cfg)
    return graphdef, abstract_params, sharding.tree_shardings(axes, abstract_params, rules, mesh)


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def opt_state_shardings(abstract_opt_state, params_shardings, abstract_params, mesh: Mesh):
    """Optimizer leaves that mirror a parameter (Adam's mu/nu) take that parameter's sharding."""
    by_path = {}
    for (path, s), (_, p) in zip(jax.tree_util.tree_leaves_with_path(params_shardings),
                                 jax.tree_util.tree_leaves_with_path(abstract_params)):
        by_path[_path_keys(path)] = (s, p.shape)

    def pick(path, leaf):
        keys = _path_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def state_shardings(cfg: PhiConfig, optimizer, mesh: Mesh, rules):
    """(graphdef, abstract state with shardings, state shardings) without allocating anything."""
    graphdef, abstract_params, p_shard = param_shardings(cfg, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    o_shard = opt_state_shardings(abstract_opt, p_shard, abstract_params, mesh)
    rep = sharding.replicated(mesh)
    shardings = {"params": p_shard, "opt_state": o_shard, "step": rep, "rng": rep}
    abstract = {
        "params": abstract_params,
        "opt_state": abstract_opt,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, abstract, shardings


def init_state(cfg: PhiConfig, optimizer, seed: int, shardings):
    """Fresh state, created directly in its sharded layout (never materialised on one host)."""

    def _init():
        _, params, _ = model_lib.split(model_lib.init(cfg, seed))
        return {
            "params": params,
            "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)).astype(jnp.uint32),
        }

    return jax.jit(_init, out_shardings=shardings)()


def batch_shardings(features, mesh: Mesh, rules) -> dict[str, NamedSharding]:
    return {k: sharding.named_sharding(BATCH_AXES[k], rules, mesh) for k in features}


def make_train_step(graphdef, cfg: PhiConfig, optimizer, schedule, *, mesh: Mesh, rules, microbatches: int,
                    shardings, batch_sharding: dict[str, NamedSharding], compiler_options: dict | None = None):
    use_dropout = max(cfg.embd_dropout, cfg.attn_dropout, cfg.resid_dropout) > 0.0

    def loss_sums(params, mb, key):
        kw = dict(positions=mb.get("positions"), segment_ids=mb.get("segment_ids"),
                  dropout_key=key if use_dropout else None)
        with sharding.use_mesh_rules(mesh, rules):
            if cfg.loss_chunk > 0:  # the fused LM head + loss (sharded by the mesh and rules set here)
                m = model_lib.merge(graphdef, params)
                h = m.hidden_states(mb["inputs"], **kw)
                return loss_lib.fused_lm_head_loss_sums(h, m.lm_head.kernel[...], m.lm_head.bias[...],
                                                        mb["targets"], mb["loss_weights"], cfg.loss_chunk,
                                                        impl=cfg.loss_kernel)
            logits = model_lib.apply(graphdef, params, mb["inputs"], **kw)
        return loss_lib.token_loss_sums(logits, mb["targets"], mb["loss_weights"])

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def step_fn(state, batch):
        params, step = state["params"], state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        if microbatches == 1:
            (loss_sum, weight_sum), grads = grad_fn(params, batch, key)
        else:
            # Microbatch m takes rows m, m+M, m+2M, ...: each device keeps its own rows.
            def split(x):
                x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
                spec = jax.sharding.PartitionSpec(None, *batch_sharding["inputs"].spec)
                return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

            mbs = jax.tree.map(split, batch)
            zeros = jax.tree.map(jnp.zeros_like, params)

            def body(carry, xs):
                i, mb = xs
                (l, w), g = grad_fn(params, mb, jax.random.fold_in(key, i))
                return (carry[0] + l, carry[1] + w, jax.tree.map(jnp.add, carry[2], g)), None

            (loss_sum, weight_sum, grads), _ = jax.lax.scan(
                body, (jnp.float32(0), jnp.float32(0), zeros), (jnp.arange(microbatches), mbs))
        denom = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": step + 1,
            "rng": state["rng"],
        }
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(step),
            "tokens": weight_sum,
        }
        return new_state, metrics

    rep = sharding.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, rep),
                   donate_argnums=(0,), compiler_options=compiler_options or None)


def to_global(local_batch: dict[str, Any], batch_sharding: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Per-host numpy batch rows -> global jax.Arrays laid out by the batch shardings."""
    return {k: jax.make_array_from_process_local_data(batch_sharding[k], v) for k, v in local_batch.items()}
