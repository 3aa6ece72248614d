"""Device mesh and logical-axis sharding.

Model code names every parameter and main activation dimension with a *logical* axis
('embed', 'heads', 'activation_batch', ...). A rule table maps each logical axis to zero or
more mesh axes of the (data, fsdp, tensor) mesh: DEFAULT_RULES below, the only copy; gin
binds it as `train.sharding_rules = @phijax.sharding.standard_rules()` (gin/runs/sharding.gin),
with single entries overridable. This module turns those names into NamedShardings.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default logical -> mesh rules (MaxText style). Order matters only in that a mesh axis is
# used at most once per array: the first logical dim that claims it gets it.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)

log = logging.getLogger(__name__)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
    """A mesh of `shape` over all (or the given) devices; one -1 entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} has {len(shape)} axes but axis_names={tuple(axis_names)}")
    n = len(devices)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: axis sizes must be positive or -1")
    if -1 in shape:
        if n % known:
            raise ValueError(f"mesh shape {tuple(shape)} does not divide the {n} available devices")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {n} are available "
            f"({jax.default_backend()}); use -1 on one axis to fill the rest")
    try:  # topology-aware device order on TPU/GPU; plain order on CPU
        from jax.experimental import mesh_utils
        dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - fall back to the natural order
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, tuple(axis_names))


def _normalise(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def standard_rules(overrides: Sequence[tuple[str, object]] = ()) -> tuple[tuple[str, object], ...]:
    """DEFAULT_RULES, in their order, with each `(logical_axis, mesh_axes)` of `overrides` replacing
    the entry of that logical axis (gin: `phijax.sharding.standard_rules.overrides = [('embed', None)]`).

    mesh_axes is None (replicated), one mesh axis or a tuple of them. Raises ValueError naming an
    override whose logical axis has no default rule, whose mesh axis is not one of MESH_AXES, or
    whose logical axis is given twice.
    """
    known = [logical for logical, _ in DEFAULT_RULES]
    replaced: dict[str, object] = {}
    for entry in overrides:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise ValueError(f"sharding rule override {entry!r} must be (logical_axis, mesh_axes)")
        logical, mesh_axes = entry
        if logical not in known:
            raise ValueError(f"sharding rule override {logical!r}: unknown logical axis; known: {known}")
        if logical in replaced:
            raise ValueError(f"sharding rule override {logical!r} is given twice")
        plain = mesh_axes is None or isinstance(mesh_axes, (str, tuple, list))
        for a in _normalise(mesh_axes) if plain else (mesh_axes,):
            if a not in MESH_AXES:
                raise ValueError(f"sharding rule override {logical!r} -> {a!r}: not a mesh axis of {MESH_AXES}")
        replaced[logical] = tuple(mesh_axes) if isinstance(mesh_axes, list) else mesh_axes
    return tuple((logical, replaced.get(logical, mesh_axes)) for logical, mesh_axes in DEFAULT_RULES)


def validate_rules(rules, mesh: Mesh) -> dict[str, tuple[str, ...]]:
    table = {}
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"sharding rule {entry!r} must be (logical_axis, mesh_axes)")
        logical, mesh_axes = entry
        mesh_axes = _normalise(mesh_axes)
        for a in mesh_axes:
            if a not in mesh.axis_names:
                raise ValueError(f"sharding rule {logical!r} -> {a!r}: mesh has axes {mesh.axis_names}")
        table.setdefault(logical, mesh_axes)
    return table


def logical_to_spec(axes: Sequence[str | None], rules, mesh: Mesh, shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for logical `axes`. A dim whose size the mesh axes do not divide is replicated."""
    table = validate_rules(rules, mesh)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"no sharding rule for logical axis {name!r}; add it to phijax.sharding.DEFAULT_RULES")
        chosen = tuple(a for a in table[name] if a not in used)
        if shape is not None and chosen:
            size = math.prod(mesh.shape[a] for a in chosen)
            if shape[i] % size:
                log.warning("logical axis %r (size %d) not divisible by mesh axes %s (size %d): replicating",
                            name, shape[i], chosen, size)
                chosen = ()
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return P(*spec)


def named_sharding(axes, rules, mesh: Mesh, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def tree_shardings(axes_tree, shape_tree, rules, mesh: Mesh):
    """NamedShardings for a pytree of logical axes tuples and a matching pytree of shapes/arrays."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    return jax.tree.map(lambda ax, x: named_sharding(ax, rules, mesh, np.shape(x) if not hasattr(x, "shape") else x.shape),
                        axes_tree, shape_tree, is_leaf=is_axes)


# Activation constraints read the mesh and rules from a context set by the trainer at
# trace time, so model code stays free of mesh plumbing and runs unsharded without one.
_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("phijax_sharding", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules):
    validate_rules(rules, mesh)
    token = _CONTEXT.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def constrain(x, axes: Sequence[str | None]):
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, rules, mesh, x.shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
