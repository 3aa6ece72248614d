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


def _attend(q, k, v, mask, dropout_rate, dropout_key):
    """Explicit scores, fp32 softmax (as transformers' eager path). mask: [b|1, 1, t, s]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    # Grouped-query attention without materialising repeated k/v: fold groups into q.
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg * jnp.asarray(d ** -0.5, q.dtype), k)
    scores = jnp.where(mask[:, :, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if dropout_rate > 0.0 and dropout_key is not None:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)


def causal_blocks(length: int, min_block: int = 128, max_blocks: int = 8) -> int:
    """How many query blocks the causal reference path splits a sequence into (1 = no split)."""
    n = 1
    while n * 2 <= max_blocks and length % (n * 2) == 0 and length // (n * 2) >= min_block:
        n *= 2
    return n


def xla_attention(q, k, v, *, segment_ids=None, causal=True, dropout_rate=0.0, dropout_key=None):
    """Reference attention. Causal self-attention is split into query blocks that only score
    the keys they can see, which skips most of the masked half of the score matrix (about
    40% less work and memory traffic at 4+ blocks); the result is the same softmax."""
    t, s = q.shape[1], k.shape[1]
    n = causal_blocks(t) if causal and t == s else 1
    if n == 1:
        mask = make_mask(t, s, segment_ids, segment_ids, causal)
        return _attend(q, k, v, mask, dropout_rate, dropout_key)
    bq = t // n
    outs = []
    for i in range(n):
        q_i, kv_end = q[:, i * bq:(i + 1) * bq], (i + 1) * bq
        seg_q = None if segment_ids is None else segment_ids[:, i * bq:(i + 1) * bq]
        seg_k = None if segment_ids is None else segment_ids[:, :kv_end]
        mask = make_mask(bq, kv_end, seg_q, seg_k, causal=True, q_offset=i * bq)
        key_i = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
        outs.append(_attend(q_i, k[:, :kv_end], v[:, :kv_end], mask, dropout_rate, key_i))
    return jnp.concatenate(outs, axis=1)


def cudnn_attention(q, k, v, *, segment_ids=None, causal=True, dropout_rate=0.0, dropout_key=None):
    """cuDNN fused (flash) attention through jax.nn.dot_product_attention (GPU, bf16/fp16)."""
    if segment_ids is not None or (dropout_rate > 0.0 and dropout_key is not None):
        raise NotImplementedError("the cudnn attention backend here takes no segment ids or attention dropout; "
                                  "use attention='xla' for packed examples or attn_dropout > 0")
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def auto_attention(q, k, v, *, segment_ids=None, causal=True, dropout_rate=0.0, dropout_key=None):
    """The fused kernel where it applies (GPU, half precision, no segments/dropout), else the reference."""
    fused_ok = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and segment_ids is None
                and not (dropout_rate > 0.0 and dropout_key is not None))
    fn = cudnn_attention if fused_ok else xla_attention
    return fn(q, k, v, segment_ids=segment_ids, causal=causal, dropout_rate=dropout_rate, dropout_key=dropout_key)


BACKENDS: dict[str, Callable] = {"xla": xla_attention, "cudnn": cudnn_attention, "auto": auto_attention}


def get_backend(name: str) -> Callable:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]
