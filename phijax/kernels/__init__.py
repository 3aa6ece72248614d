"""Fused kernels (Pallas on TPU, an XLA FFI custom call on CPU), and the question every kernel choice asks: what are we compiling for?"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from phijax import sharding


def target_devices() -> list:
    """The devices the current trace compiles for.

    Inside the trainer's mesh context (sharding.use_mesh_rules) these are the mesh's devices,
    which is what makes an ahead-of-time compile for a TPU topology on a CPU host
    (phijax.compile_check) pick the TPU kernels; outside one, jax's default devices.
    """
    ctx = sharding._CONTEXT.get()
    return list(ctx[0].devices.flat) if ctx is not None else jax.devices()


def device_platform(device) -> str:
    """'tpu', 'gpu' or 'cpu' for a jax device."""
    return "gpu" if device.platform in ("cuda", "rocm") else device.platform


def target_platform() -> str:
    """'tpu', 'gpu' or 'cpu' for the devices of `target_devices()`."""
    return device_platform(target_devices()[0])


def per_device_attention(local, q, k, v, *rows):
    """local(q, k, v, *rows) for a kernel XLA cannot partition (a Pallas call, an FFI custom call),
    run on each device's part of the arrays under the trainer's mesh: batch and heads keep their
    activation sharding, the sequence is whole per device (a head group whose kv heads cannot be
    split as the query heads are stays whole too). `rows`: per-position arrays [batch, len, ...]
    (segment ids, rotary tables), split over batch as q is; None passes through. Outside a mesh,
    or on one device, `local` runs as is."""
    ctx = sharding._CONTEXT.get()
    if ctx is None or ctx[0].devices.size == 1:
        return local(q, k, v, *rows)
    mesh, rules = ctx
    q_spec = sharding.logical_to_spec(("activation_batch", None, "activation_heads", None), rules, mesh, q.shape)
    kv_spec = sharding.logical_to_spec(("activation_batch", None, "activation_kv_heads", None), rules, mesh, k.shape)
    if q_spec[2] != kv_spec[2]:
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    given = [i for i, x in enumerate(rows) if x is not None]

    def fn(q, k, v, *present):
        full = list(rows)
        for i, x in zip(given, present):
            full[i] = x
        return local(q, k, v, *full)

    row_specs = tuple(P(q_spec[0], *([None] * (rows[i].ndim - 1))) for i in given)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, *row_specs), out_specs=q_spec,
                         check_vma=False)(q, k, v, *(rows[i] for i in given))
