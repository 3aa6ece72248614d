"""Attention backends behind one switch.

Every backend takes q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads,
head_dim] and returns [batch, q_len, heads, head_dim]. Masking is causal plus, when
`segment_ids` is given, block-diagonal so packed examples never attend to each other.
Fused kernels: 'cudnn' (GPU, jax.nn.dot_product_attention), 'splash' (TPU, Pallas;
phijax/kernels/splash.py) and 'cpu' (XLA:CPU, an FFI custom call built with the host's C++
compiler; phijax/kernels/cpu_attention.py). 'auto' picks cudnn or splash where the compile target
can run them, else 'xla' ('cpu' only when asked for: it needs a compiler and fp32).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from phijax.kernels import target_platform
from phijax.sharding import constrain


def make_mask(q_len: int, kv_len: int, q_segment_ids=None, kv_segment_ids=None, causal: bool = True,
              q_offset=0):
    """Boolean [batch or 1, 1, q_len, kv_len] mask, True where attention is allowed. `q_offset`
    (the first query's position) is a scalar or one per row ([batch]: continuous batching)."""
    q_offset = jnp.asarray(q_offset)
    q_pos = jnp.arange(q_len)[:, None] + q_offset[..., None, None]  # [q_len, 1] or [batch, q_len, 1]
    kv_pos = jnp.arange(kv_len)[None, :]
    mask = (kv_pos <= q_pos) if causal else jnp.ones((q_len, kv_len), bool)
    mask = mask[:, None] if mask.ndim == 3 else mask[None, None]
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & same[:, None]
    return mask


def _attend(q, k, v, mask, dropout_rate, dropout_key):
    """Explicit scores, fp32 softmax, attention dropout (autodiff). mask: [b|1, 1, t, s]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    # Grouped-query attention without materialising repeated k/v: fold groups into q.
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg * jnp.asarray(d ** -0.5, q.dtype), k)
    scores = jnp.where(mask[:, :, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if _has_dropout(dropout_rate, dropout_key):
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
    40% less work and memory traffic at 4+ blocks); the result is the same softmax. Without
    attention dropout the gradient is written out (`_blocked_attention`); with it, autodiff."""
    t, s = q.shape[1], k.shape[1]
    n = causal_blocks(t) if causal and t == s else 1
    if not _has_dropout(dropout_rate, dropout_key):
        return _blocked_attention(q, k, v, segment_ids, n, causal)
    outs = []
    for i, (q0, q1, kv_end) in enumerate(_block_spans(t, s, n, causal)):
        key_i = jax.random.fold_in(dropout_key, i) if n > 1 else dropout_key
        mask = _block_mask(segment_ids, q0, q1, kv_end, causal)
        outs.append(_attend(q[:, q0:q1], k[:, :kv_end], v[:, :kv_end], mask, dropout_rate, key_i))
    return jnp.concatenate(outs, axis=1) if n > 1 else outs[0]


# ------------------------------------------------------------------ attention with a written-out VJP
# Layouts inside: q [b, kv, g, t, d] (g query heads per kv head), k/v [b, kv, s, d], scores
# [b, kv, g, t, s]. Query block i of n sees keys [0, kv_end). The backward uses the flash-attention
# identity dS = P * (dP - rowsum(dO * O)) (one elementwise pass instead of autodiff's chain through
# max/exp/sum/divide) and forms dK^T, dV^T as [d, s] so that no score-sized array is ever
# transposed: on a CPU that is a third less attention time than autodiff of the same math.
F32 = jnp.float32


def _block_spans(t: int, s: int, n: int, causal: bool):
    """(query start, query end, key end) of each query block."""
    bq = t // n
    return [(i * bq, (i + 1) * bq, (i + 1) * bq if causal and n > 1 else s) for i in range(n)]


def _block_mask(segment_ids, q0, q1, kv_end, causal):  # [b|1, 1, q, s]
    seg_q = None if segment_ids is None else segment_ids[:, q0:q1]
    seg_k = None if segment_ids is None else segment_ids[:, :kv_end]
    return make_mask(q1 - q0, kv_end, seg_q, seg_k, causal, q_offset=q0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_attention(q, k, v, segment_ids, n, causal):
    return _blocked_fwd(q, k, v, segment_ids, n, causal)[0]


def _blocked_fwd(q, k, v, segment_ids, n, causal):
    b, t, h, d = q.shape
    kv = k.shape[2]
    scale = jnp.asarray(d ** -0.5, q.dtype)
    q5 = jnp.transpose(q.reshape(b, t, kv, h // kv, d), (0, 2, 3, 1, 4)) * scale
    k4, v4 = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    outs, es, ls = [], [], []
    for q0, q1, kv_end in _block_spans(t, k.shape[1], n, causal):
        scores = jnp.einsum("bkgqd,bksd->bkgqs", q5[:, :, :, q0:q1], k4[:, :, :kv_end]).astype(F32)
        scores = jnp.where(_block_mask(segment_ids, q0, q1, kv_end, causal)[:, :, None], scores, jnp.finfo(F32).min)
        e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)).astype(v.dtype)  # unnormalised
        denom = jnp.sum(e, axis=-1, dtype=F32)
        out = jnp.einsum("bkgqs,bksd->bkgqd", e, v4[:, :, :kv_end], preferred_element_type=F32)
        outs.append((out / denom[..., None]).astype(q.dtype))  # normalised after the value matmul
        es.append(e)
        ls.append(denom)
    o5 = jnp.concatenate(outs, axis=3)
    out = jnp.transpose(o5, (0, 3, 1, 2, 4)).reshape(b, t, h, d)
    return out, (q5, k4, v4, segment_ids, o5, es, ls)


def _blocked_bwd(n, causal, res, g):
    q5, k4, v4, segment_ids, o5, es, ls = res
    b, kv, grp, t, d = q5.shape
    s = k4.shape[2]
    scale = jnp.asarray(d ** -0.5, q5.dtype)
    do5 = jnp.transpose(g.reshape(b, t, kv, grp, d), (0, 2, 3, 1, 4))
    rowdot = jnp.sum(do5.astype(F32) * o5.astype(F32), axis=-1)  # rowsum(dO * O): [b, kv, g, t]
    dqs, dkt, dvt = [], jnp.zeros((b, kv, d, s), F32), jnp.zeros((b, kv, d, s), F32)
    for (q0, q1, kv_end), e, denom in zip(_block_spans(t, s, n, causal), es, ls):
        q_i, do_i, k_i, v_i = q5[:, :, :, q0:q1], do5[:, :, :, q0:q1], k4[:, :, :kv_end], v4[:, :, :kv_end]
        inv = (1.0 / denom)[..., None]
        dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_i, preferred_element_type=F32)
        ds = (e.astype(F32) * inv * (dp - rowdot[:, :, :, q0:q1, None])).astype(q5.dtype)  # d(scaled scores)
        dqs.append(jnp.einsum("bkgqs,bksd->bkgqd", ds, k_i, preferred_element_type=F32))
        # dK^T, dV^T [d, s]: the score-sized operand keeps its layout (contracted over its rows)
        dk_i = jnp.einsum("bkgqd,bkgqs->bkds", q_i, ds, preferred_element_type=F32)
        dv_i = jnp.einsum("bkgqd,bkgqs->bkds", (do_i.astype(F32) * inv).astype(e.dtype), e, preferred_element_type=F32)
        dkt = dkt.at[..., :kv_end].add(dk_i)
        dvt = dvt.at[..., :kv_end].add(dv_i)
    dq5 = jnp.concatenate(dqs, axis=3) * scale.astype(F32)
    dq = jnp.transpose(dq5, (0, 3, 1, 2, 4)).reshape(b, t, kv * grp, d).astype(q5.dtype)
    dk = jnp.transpose(dkt, (0, 3, 1, 2)).astype(k4.dtype)  # [b, s, kv, d]
    dv = jnp.transpose(dvt, (0, 3, 1, 2)).astype(v4.dtype)
    return dq, dk, dv, None


_blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)


def cached_attention(q, k_cache, v_cache, *, q_offset, q_segment_ids, kv_segment_ids):
    """Decoding: q [batch, t, heads, head_dim] in cache slots q_offset.. attends to the cache slots
    at or before its own with the same segment id (unwritten slots lie after it). The cache is
    [batch, kv_heads, slots, head_dim] so both einsums are plain batched matmuls: the training
    layout would transpose the whole cache every step. Otherwise the math of `_attend`."""
    b, t, h, d = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    mask = make_mask(t, s, q_segment_ids, kv_segment_ids, causal=True, q_offset=q_offset)
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg * jnp.asarray(d ** -0.5, q.dtype), k_cache)
    scores = jnp.where(mask[:, :, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v_cache).reshape(b, t, h, d)


def _has_dropout(dropout_rate, dropout_key) -> bool:
    return dropout_rate > 0.0 and dropout_key is not None


def cudnn_attention(q, k, v, *, segment_ids=None, causal=True, dropout_rate=0.0, dropout_key=None,
                    implementation: str = "cudnn"):
    """cuDNN fused (flash) attention through jax.nn.dot_product_attention (GPU, bf16/fp16).

    Packed examples: the segment mask goes in as the API's boolean `mask` [batch, 1, t, s]
    (broadcast over heads), which cuDNN applies as an additive bias beside its own causal mask.
    (The API's seq-length arguments describe right padding only, one segment per row.) With
    implementation='xla' the same call runs on XLA; the tests check that against `xla_attention`.
    """
    if _has_dropout(dropout_rate, dropout_key):
        raise NotImplementedError("the cudnn attention backend has no attention dropout; use attention='xla' "
                                  "(or 'auto') with attn_dropout > 0")
    mask = None
    if segment_ids is not None:
        mask = constrain(make_mask(q.shape[1], k.shape[1], segment_ids, segment_ids, causal=False),
                         ("activation_batch", None, None, None))  # cuDNN wants the bias batch-sharded as q
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=implementation)


def splash_attention(q, k, v, *, segment_ids=None, causal=True, dropout_rate=0.0, dropout_key=None):
    """Pallas splash attention (TPU; Pallas interpret mode elsewhere). See phijax/kernels/splash.py."""
    from phijax.kernels import splash  # imports Pallas: only when asked for
    return splash.splash_attention(q, k, v, segment_ids=segment_ids, causal=causal, dropout_rate=dropout_rate,
                                   dropout_key=dropout_key)


def cpu_attention(q, k, v, *, segment_ids=None, causal=True, dropout_rate=0.0, dropout_key=None, rotary=None):
    """The XLA:CPU FFI kernel (built with the host's C++ compiler on first use). With rotary=(cos,
    sin) it applies RoPE to q and k itself. See phijax/kernels/cpu_attention.py."""
    from phijax.kernels import cpu_attention as kernel  # builds/loads a shared library: only when asked for
    return kernel.cpu_attention(q, k, v, segment_ids=segment_ids, causal=causal, dropout_rate=dropout_rate,
                                dropout_key=dropout_key, rotary=rotary)


def auto_choice(q_shape, kv_shape, dtype, *, dropout: bool) -> str:
    """The backend 'auto' runs for these shapes on the current compile target (see kernels.target_platform)."""
    platform = target_platform()
    if platform == "tpu":
        from phijax.kernels import splash
        return "splash" if splash.unsupported_reason(q_shape, kv_shape, dropout=dropout) is None else "xla"
    d = q_shape[-1]
    if (platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128
            and not dropout):
        return "cudnn"
    return "xla"


def auto_attention(q, k, v, *, segment_ids=None, causal=True, dropout_rate=0.0, dropout_key=None):
    """Splash on TPU, cuDNN on GPU (half precision, head_dim <= 128), where no attention dropout; else xla."""
    name = auto_choice(q.shape, k.shape, q.dtype, dropout=_has_dropout(dropout_rate, dropout_key))
    return BACKENDS[name](q, k, v, segment_ids=segment_ids, causal=causal, dropout_rate=dropout_rate,
                          dropout_key=dropout_key)


BACKENDS: dict[str, Callable] = {"xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_attention,
                                 "cpu": cpu_attention, "auto": auto_attention}


# Backends that take q and k unrotated with rotary=(cos, sin) and apply RoPE inside the kernel.
ROTARY_IN_KERNEL = frozenset({"cpu"})


def get_backend(name: str) -> Callable:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]


def prepare_backend(name: str, platform: str) -> None:
    """Fails now, naming the problem, if backend `name` cannot run on `platform` ('cpu', 'gpu',
    'tpu'), rather than at the first step's compile; builds the CPU kernel if it is the one."""
    get_backend(name)
    if name == "cpu":
        from phijax.kernels import cpu_ffi
        cpu_ffi.require(platform, "attention='cpu'")
