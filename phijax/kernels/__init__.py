"""Fused accelerator kernels (Pallas), and the question every kernel choice asks: what are we compiling for?"""
from __future__ import annotations

import jax

from phijax import sharding


def target_devices() -> list:
    """The devices the current trace compiles for.

    Inside the trainer's mesh context (sharding.use_mesh_rules) these are the mesh's devices,
    which is what makes an ahead-of-time compile for a TPU topology on a CPU host
    (phijax.compile_check) pick the TPU kernels; outside one, jax's default devices.
    """
    ctx = sharding._CONTEXT.get()
    return list(ctx[0].devices.flat) if ctx is not None else jax.devices()


def target_platform() -> str:
    """'tpu', 'gpu' or 'cpu' for the devices of `target_devices()`."""
    platform = target_devices()[0].platform
    return "gpu" if platform in ("cuda", "rocm") else platform
