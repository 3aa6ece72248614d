"""Causal attention for XLA:CPU as an FFI custom call (cpu/attention.cc), behind phijax's attention
signature: attention='cpu'.

Why: on a CPU the blocked XLA attention is bound by the score-sized arrays it writes and reads
back (scores, probabilities, their gradients, [b, h, t, s] each, in several fusions). The kernel
keeps each 64-row query block's scores in a per-thread scratch that stays in L2, keeps only the
log-sum-exp per row for the backward (which recomputes the probabilities), skips the key blocks
the causal mask hides, and runs its GEMMs in one register-tiled micro-kernel. Given the rotary
tables it also applies RoPE to q and k (and its transpose to their gradients), which saves XLA's
passes over q and k. Figures: `python -m phijax.bench.attention` (docs/benchmarks.md).

The kernel computes in fp32 (other dtypes are cast at the boundary); it has no attention dropout.
Segment ids (packed examples) mask as in the reference. Under the trainer's mesh the call runs
per device (kernels.per_device_attention): XLA cannot partition a custom call. The library is
built on first use (phijax/kernels/cpu_ffi.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from phijax.kernels import cpu_ffi, per_device_attention

FORWARD, BACKWARD = "phijax_cpu_attention_fwd", "phijax_cpu_attention_bwd"
F32 = jnp.float32


def _struct(x):
    return jax.ShapeDtypeStruct(x.shape, F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, seg, cos, sin, causal):
    return _fwd(q, k, v, seg, cos, sin, causal)[0]


def _fwd(q, k, v, seg, cos, sin, causal):
    b, t, h, _ = q.shape
    o, lse = jax.ffi.ffi_call(FORWARD, (_struct(q), jax.ShapeDtypeStruct((b, h, t), F32)))(
        q, k, v, seg, cos, sin, causal=causal)
    return o, (q, k, v, seg, cos, sin, o, lse)


def _bwd(causal, res, g):
    q, k, v, seg, cos, sin, o, lse = res
    dq, dk, dv = jax.ffi.ffi_call(BACKWARD, (_struct(q), _struct(k), _struct(v)))(
        q, k, v, seg, cos, sin, o, lse, g, causal=causal)
    return dq, dk, dv, None, None, None  # the tables are constants of the positions


_attention.defvjp(_fwd, _bwd)


def unsupported_reason(q_shape, kv_shape, *, dropout: bool) -> str | None:
    """Why the kernel cannot run these shapes (None if it can)."""
    if q_shape[1] != kv_shape[1]:
        return f"query and key lengths must be equal (self-attention), got {q_shape[1]} and {kv_shape[1]}"
    if q_shape[2] % kv_shape[2]:
        return f"query heads ({q_shape[2]}) must be a multiple of kv heads ({kv_shape[2]})"
    if dropout:
        return "the kernel has no attention dropout"
    return None


def cpu_attention(q, k, v, *, segment_ids=None, causal=True, dropout_rate=0.0, dropout_key=None, rotary=None):
    """q [b, t, h, d], k/v [b, t, kv, d] -> [b, t, h, d] in q's dtype; causal + segments.

    rotary: None (q and k come rotated), or the tables (cos, sin) [b, t, rotary_dim] of
    model.rotary_tables: the kernel applies rotate-half RoPE to q and k itself (and its transpose
    to their gradients), which saves XLA's passes over q and k in both directions."""
    reason = unsupported_reason(q.shape, k.shape, dropout=dropout_rate > 0.0 and dropout_key is not None)
    if rotary is not None and (rotary[0].shape != rotary[1].shape or rotary[0].shape[:2] != q.shape[:2]
                               or rotary[0].shape[2] % 2 or not 0 < rotary[0].shape[2] <= q.shape[3]):
        reason = f"rotary tables must be [batch, len, even rotary_dim <= head_dim], got {rotary[0].shape}"
    if reason:
        raise NotImplementedError(f"cpu attention: {reason}; use attention='xla'")
    cpu_ffi.register()
    cos, sin = (None, None) if rotary is None else rotary

    def local(q, k, v, seg, cos, sin):
        none = jnp.zeros((1,), F32)  # a [1] table: no rotary; [1] segment ids: none
        seg = jnp.zeros((1,), jnp.int32) if seg is None else seg.astype(jnp.int32)
        cos, sin = (none, none) if cos is None else (cos.astype(F32), sin.astype(F32))
        return _attention(q.astype(F32), k.astype(F32), v.astype(F32), seg, cos, sin, bool(causal))

    return per_device_attention(local, q, k, v, segment_ids, cos, sin).astype(q.dtype)

