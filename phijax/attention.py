"""Attention backends behind one switch.

Every backend takes q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads,
head_dim] and returns [batch, q_len, heads, head_dim]. Masking is causal plus, when
`segment_ids` is given, block-diagonal so packed examples never attend to each other.
Fused kernels (cuDNN, Pallas splash) register here later under their own names.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def make_mask(q_len: int, kv_len: int, q_segment_ids=None, kv_segment_ids=None, causal: bool = True,
              q_offset=0):
    """Boolean [batch or 1, 1, q_len, kv_len] mask, True where attention is allowed."""
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    kv_pos = jnp.arange(kv_len)[None, :]
    mask = (kv_pos <= q_pos) if causal else jnp.ones((q_len, kv_len), bool)
    mask = mask[None, None]
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & same[:, None]
    return mask


def xla_attention(q, k, v, *, segment_ids=None, causal=True, dropout_rate=0.0, dropout_key=None):
    """Reference implementation: explicit scores, fp32 softmax (as transformers' eager path)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    groups = h // kv
    # Grouped-query attention without materialising repeated k/v: fold groups into q.
    qg = q.reshape(b, t, kv, groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * (d ** -0.5)
    mask = make_mask(t, k.shape[1], segment_ids, segment_ids, causal)  # [b|1, 1, t, s]
    scores = jnp.where(mask[:, :, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if dropout_rate > 0.0 and dropout_key is not None:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


BACKENDS: dict[str, Callable] = {"xla": xla_attention}


def get_backend(name: str) -> Callable:
    if name == "auto":
        name = "xla"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(BACKENDS)} or 'auto'")
    return BACKENDS[name]
