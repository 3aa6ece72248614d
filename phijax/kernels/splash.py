"""Pallas splash attention (TPU) behind phijax's attention signature.

`jax.experimental.pallas.ops.tpu.splash_attention` is a block-sparse flash attention: the
static mask (causal) decides at trace time which (q block, kv block) tiles are computed at
all, and segment ids given at run time mask packed examples inside the tiles. It supports
grouped-query attention natively (k/v with fewer heads). It has no attention dropout.

The kernel works on one sequence ([heads, len, head_dim]); batch is a vmap, and under the
trainer's mesh the call is wrapped in shard_map (a Pallas call cannot be partitioned by
XLA): batch and heads keep their activation sharding, the sequence is whole per device.
Off TPU the same kernel runs in Pallas interpret mode (slow; for tests against the reference).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from phijax.kernels import per_device_attention, target_platform

LANE = 128  # TPU tiles are multiples of 128 along the sequence
DEFAULT_BLOCK = 512


def unsupported_reason(q_shape, kv_shape, *, dropout: bool) -> str | None:
    """Why splash cannot run these shapes (None if it can)."""
    t, s, h, kv = q_shape[1], kv_shape[1], q_shape[2], kv_shape[2]
    if t % LANE or s % LANE:
        return f"sequence lengths (q {t}, kv {s}) must be multiples of {LANE}"
    if h % kv:
        return f"query heads ({h}) must be a multiple of kv heads ({kv})"
    if dropout:
        return "the kernel has no attention dropout"
    return None


def _block(n: int, cap: int) -> int:
    """The largest multiple of 128 that divides n and is at most cap."""
    for b in range(max(cap // LANE, 1) * LANE, 0, -LANE):
        if n % b == 0:
            return b
    raise ValueError(f"no {LANE}-multiple block divides {n}")


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, t: int, s: int, causal: bool, block: int, interpret: bool):
    bq, bkv = _block(t, block), _block(s, block)
    mask = sa.MultiHeadMask([sa.CausalMask((t, s)) if causal else sa.FullMask((t, s))] * heads)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    with jax.ensure_compile_time_eval():  # the mask tables are constants, also when built inside a trace
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, *, segment_ids=None, causal=True, dropout_rate=0.0, dropout_key=None,
                     block_size: int = DEFAULT_BLOCK, interpret: bool | None = None):
    """q [b, t, h, d], k/v [b, s, kv, d] -> [b, t, h, d]; causal (aligned at position 0) + segments."""
    reason = unsupported_reason(q.shape, k.shape, dropout=dropout_rate > 0.0 and dropout_key is not None)
    if reason:
        raise NotImplementedError(f"splash attention: {reason}; use attention='xla' (or 'auto')")
    if interpret is None:
        interpret = target_platform() != "tpu"
    t, s, d = q.shape[1], k.shape[1], q.shape[3]
    scale = jnp.asarray(d ** -0.5, q.dtype)  # the kernel does not scale; same rounding as the reference

    def local(q, k, v, seg):
        kernel = _kernel(q.shape[2], t, s, bool(causal), block_size, bool(interpret))
        qh, kh, vh = ((q * scale).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        if seg is None:
            out = jax.vmap(kernel)(qh, kh, vh)
        else:
            out = jax.vmap(kernel)(qh, kh, vh, segment_ids=sa.SegmentIds(q=seg, kv=seg))
        return out.transpose(0, 2, 1, 3)

    return per_device_attention(local, q, k, v, segment_ids)
