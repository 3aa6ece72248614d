"""The phi transformer in Flax NNX (phi-1 as published; `PhiForCausalLM` in transformers).

Block: h = x + dropout(attn(LN(x))) + dropout(mlp(LN(x))) with ONE LayerNorm shared by the
two parallel branches. Partial rotary (first `rotary_dim` features of each head,
rotate-half layout). Bias on every linear, untied lm_head with bias.

Layers are stored stacked (leading 'layers' axis) and run with `lax.scan` (`Phi.scan_layers`:
training, prefill and every decoded token), so compile time does not grow with depth. Every
parameter carries its logical axis names in the `axes` metadata; `phijax.sharding` maps them to
the mesh. No tensorflow here.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from phijax import attention, remat
from phijax.config import PhiConfig
from phijax.sharding import constrain


def _param(rngs, init, shape, axes, stack, dtype):
    """A parameter of `stack + shape` with logical axes ('layers',)*len(stack) + axes."""
    value = init(rngs.params(), tuple(stack) + tuple(shape), dtype)
    return nnx.Param(value, axes=("layers",) * len(stack) + tuple(axes))


class LayerNorm(nnx.Module):
    def __init__(self, dim, eps, *, rngs, stack=(), dtype=jnp.float32, axis_name="norm"):
        self.eps = eps
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), (axis_name,), stack, dtype)
        self.bias = _param(rngs, nnx.initializers.zeros, (dim,), (axis_name,), stack, dtype)

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


def _ln_stats(x, eps):
    # Statistics in fp32 whatever the compute dtype.
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return xf, mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps):
    """LayerNorm over the last dim, statistics in fp32, output in x's dtype."""
    xf, mean, rstd = _ln_stats(x, eps)
    return ((xf - mean) * rstd * scale + bias).astype(x.dtype)


def _ln_fwd(x, scale, bias, eps):
    xf, mean, rstd = _ln_stats(x, eps)
    return ((xf - mean) * rstd * scale + bias).astype(x.dtype), (x, mean, rstd, scale, bias)


def _ln_bwd(eps, res, g):
    # The textbook gradient in one pass over x and g (with the normalised x recomputed from the
    # kept statistics), where autodiff keeps x - mean and walks the mean/variance chain.
    x, mean, rstd, scale, bias = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    gf = g.astype(jnp.float32)
    lead = tuple(range(g.ndim - scale.ndim))
    dscale = jnp.sum(gf * xhat, axis=lead).astype(scale.dtype)
    dbias = jnp.sum(gf, axis=lead).astype(bias.dtype)
    gx = gf * scale.astype(jnp.float32)
    dx = rstd * (gx - gx.mean(-1, keepdims=True) - xhat * (gx * xhat).mean(-1, keepdims=True))
    return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_ln_fwd, _ln_bwd)


class Dense(nnx.Module):
    """y = einsum(x, kernel) + bias over `n_in` contracted input dims."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, rngs, std, stack=(), dtype=jnp.float32):
        self.n_in = len(in_shape)
        init = nnx.initializers.normal(std)
        self.kernel = _param(rngs, init, tuple(in_shape) + tuple(out_shape), tuple(in_axes) + tuple(out_axes),
                             stack, dtype)
        self.bias = _param(rngs, nnx.initializers.zeros, out_shape, out_axes, stack, dtype)

    def __call__(self, x):
        k = self.kernel[...].astype(x.dtype)
        y = jax.lax.dot_general(x, k, (((tuple(range(x.ndim - self.n_in, x.ndim))), tuple(range(self.n_in))), ((), ())))
        return y + self.bias[...].astype(x.dtype)


@jax.custom_vjp
def gelu_new(x):
    """The tanh approximation of GELU (transformers' `gelu_new`)."""
    return 0.5 * x * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * jnp.power(x, 3.0))))


def _gelu_fwd(x):
    return gelu_new(x), x


def _gelu_bwd(x, g):
    # Only the input is kept (it is the fc1 output, kept anyway); tanh is recomputed in the one
    # elementwise pass that forms the gradient. Autodiff keeps tanh's output and its inputs' powers
    # too: two more [tokens, d_mlp] arrays per layer.
    xf = x.astype(jnp.float32)
    c = math.sqrt(2.0 / math.pi)
    t = jnp.tanh(c * (xf + 0.044715 * xf * xf * xf))
    d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * xf * xf)
    return ((g.astype(jnp.float32) * d).astype(g.dtype),)


gelu_new.defvjp(_gelu_fwd, _gelu_bwd)


def rotary_tables(positions, rotary_dim, base):
    """cos, sin of shape [batch, len, rotary_dim] for integer positions [batch, len] (fp32)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x, cos, sin, rotary_dim):
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)


@jax.custom_vjp
def _rotary(x, cos, sin):
    return _rotate(x, cos, sin, cos.shape[-1])


def _rotary_fwd(x, cos, sin):
    return _rotary(x, cos, sin), (cos, sin)


def _rotary_bwd(res, g):
    # The transpose of a rotation is the rotation by -angle (both halves share one angle):
    # one slice/concat pass, where autodiff of the slices would pad and add.
    cos, sin = res
    return _rotate(g, cos, -sin, cos.shape[-1]), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rotary.defvjp(_rotary_fwd, _rotary_bwd)


def apply_rotary(x, cos, sin, rotary_dim):
    """Rotate-half RoPE on the first rotary_dim features of x [batch, len, heads, head_dim]."""
    if rotary_dim == 0:
        return x
    return _rotary(x, cos, sin)


def _dropout(x, rate, key):
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# Decoding cache layout: [layers, batch, kv_heads, slots, head_dim], every layer's keys (or values)
# in one buffer that the layer scan carries and updates in place. The per-layer block is the
# layout attention.cached_attention wants, sharded like the attention activations; the layers axis
# is never sharded (each scan step indexes it).
CACHE_AXES = (None, "activation_batch", "activation_kv_heads", "activation_length", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Every layer's keys/values for decoding, stacked: k, v [layers, batch, kv_heads, slots,
    head_dim]; `segment_ids` [batch, slots]; `index` (int32 scalar) the next slot to write."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's view of the stacked cache inside the layer scan: k, v are the whole stacked
    buffers (the scan carry), `layer` (int32 scalar) the layer running. `index` is the slot of the
    first new token: a scalar (every row writes the same slots: `phijax.decode`) or one per row
    ([batch]: `phijax.serve`'s continuous batching, where each row is a request at its own length;
    a row whose index is `slots` writes nothing). `segment_ids` [batch, slots] already covers the
    new tokens (unwritten slots lie after them, so the causal mask hides them; padding has its own
    segment id)."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    layer: jax.Array
    # Attention reads only the first `window` slots (None: all); static: each window is its own program.
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def write(self, k, v) -> "LayerCache":
        """Stores k, v [batch, t, kv_heads, head_dim] in this layer's slots index .. index + t - 1:
        one dynamic_update_slice of the carried buffer, which XLA does in place (a scatter of one
        token per row with per-row indices)."""
        if self.index.ndim == 1:
            rows = jnp.arange(k.shape[0])[:, None]
            cols = self.index[:, None] + jnp.arange(k.shape[1])  # [batch, t]
            # k[layer, rows, :, cols, :] is [batch, t, kv_heads, head_dim]: the layout k comes in.
            k = self.k.at[self.layer, rows, :, cols, :].set(k.astype(self.k.dtype), mode="drop")
            v = self.v.at[self.layer, rows, :, cols, :].set(v.astype(self.v.dtype), mode="drop")
            return dataclasses.replace(self, k=constrain(k, CACHE_AXES), v=constrain(v, CACHE_AXES))
        at = (self.layer, 0, 0, self.index, 0)
        k = jnp.swapaxes(k, 1, 2)[None].astype(self.k.dtype)
        v = jnp.swapaxes(v, 1, 2)[None].astype(self.v.dtype)
        k = constrain(jax.lax.dynamic_update_slice(self.k, k, at), CACHE_AXES)
        v = constrain(jax.lax.dynamic_update_slice(self.v, v, at), CACHE_AXES)
        return dataclasses.replace(self, k=k, v=v)

    def read(self):
        """This layer's (k, v), each [batch, kv_heads, slots, head_dim]. (A dynamic slice: XLA:CPU
        copies it before the attention matmuls read it, one layer's block per token.)"""
        if self.window is None:
            return (jax.lax.dynamic_index_in_dim(self.k, self.layer, keepdims=False),
                    jax.lax.dynamic_index_in_dim(self.v, self.layer, keepdims=False))
        size = (1,) + self.k.shape[1:3] + (self.window,) + self.k.shape[4:]
        at = (self.layer, 0, 0, 0, 0)
        return jax.lax.dynamic_slice(self.k, at, size)[0], jax.lax.dynamic_slice(self.v, at, size)[0]

    @property
    def read_segment_ids(self):
        return self.segment_ids if self.window is None else self.segment_ids[:, :self.window]


class Attention(nnx.Module):
    def __init__(self, cfg: PhiConfig, *, rngs, stack=()):
        d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        kw = dict(rngs=rngs, std=cfg.init_std, stack=stack, dtype=pd)
        self.q_proj = Dense((d,), (h, dh), ("embed",), ("heads", "head_dim"), **kw)
        self.k_proj = Dense((d,), (kv, dh), ("embed",), ("kv_heads", "head_dim"), **kw)
        self.v_proj = Dense((d,), (kv, dh), ("embed",), ("kv_heads", "head_dim"), **kw)
        self.dense = Dense((h, dh), (d,), ("heads", "head_dim"), ("embed",), **kw)
        if cfg.qk_layernorm:  # one LayerNorm over head_dim shared by all heads (as transformers)
            self.q_layernorm = LayerNorm(dh, cfg.layer_norm_eps, rngs=rngs, stack=stack, dtype=pd)
            self.k_layernorm = LayerNorm(dh, cfg.layer_norm_eps, rngs=rngs, stack=stack, dtype=pd)
        self.cfg = cfg

    def __call__(self, x, cos, sin, segment_ids, dropout_key, cache=None):
        """With `cache` (a LayerCache) the new keys/values are written into it at cache.index and
        the queries attend to every filled slot; returns (output, updated LayerCache) then."""
        cfg = self.cfg
        q = constrain(self.q_proj(x), ("activation_batch", "activation_length", "activation_heads", None))
        k = constrain(self.k_proj(x), ("activation_batch", "activation_length", "activation_kv_heads", None))
        v = constrain(self.v_proj(x), ("activation_batch", "activation_length", "activation_kv_heads", None))
        if cfg.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        rotary_in_kernel = cache is None and cfg.rotary_dim > 0 and cfg.attention in attention.ROTARY_IN_KERNEL
        if not rotary_in_kernel:
            q = apply_rotary(q, cos, sin, cfg.rotary_dim)
            k = apply_rotary(k, cos, sin, cfg.rotary_dim)
        if cache is not None:
            cache = cache.write(k, v)
            k_layer, v_layer = cache.read()
            out = attention.cached_attention(q, k_layer, v_layer, q_offset=cache.index, q_segment_ids=segment_ids,
                                             kv_segment_ids=cache.read_segment_ids)
            out = constrain(out, ("activation_batch", "activation_length", "activation_heads", None))
            return self.dense(out), cache
        out = attention.get_backend(cfg.attention)(
            q, k, v, segment_ids=segment_ids, causal=True, dropout_rate=cfg.attn_dropout, dropout_key=dropout_key,
            **({"rotary": (cos, sin)} if rotary_in_kernel else {}))
        out = constrain(out, ("activation_batch", "activation_length", "activation_heads", None))
        return self.dense(checkpoint_name(out, "attn_context"))  # the dense input: save_attn_mlp keeps it


class MLP(nnx.Module):
    def __init__(self, cfg: PhiConfig, *, rngs, stack=()):
        kw = dict(rngs=rngs, std=cfg.init_std, stack=stack, dtype=jnp.dtype(cfg.param_dtype))
        self.fc1 = Dense((cfg.d_model,), (cfg.d_mlp,), ("embed",), ("mlp",), **kw)
        self.fc2 = Dense((cfg.d_mlp,), (cfg.d_model,), ("mlp",), ("embed",), **kw)

    def __call__(self, x):
        h = constrain(gelu_new(self.fc1(x)), ("activation_batch", "activation_length", "activation_mlp"))
        return self.fc2(checkpoint_name(h, "mlp_hidden"))  # the fc2 input: save_attn_mlp keeps it


class Block(nnx.Module):
    """One parallel phi layer. Built with stack=(n_layers,) it holds every layer's weights."""

    def __init__(self, cfg: PhiConfig, *, rngs, stack=()):
        self.input_layernorm = LayerNorm(cfg.d_model, cfg.layer_norm_eps, rngs=rngs, stack=stack,
                                         dtype=jnp.dtype(cfg.param_dtype))
        self.self_attn = Attention(cfg, rngs=rngs, stack=stack)
        self.mlp = MLP(cfg, rngs=rngs, stack=stack)
        self.cfg = cfg

    def __call__(self, x, cos, sin, segment_ids, key, cache=None):
        """Returns the block output, or (output, updated LayerCache) when decoding with `cache`."""
        cfg = self.cfg
        k_attn = k_r1 = k_r2 = None
        if key is not None:
            k_attn, k_r1, k_r2 = jax.random.split(key, 3)
        h = self.input_layernorm(x)
        if cache is not None:
            a, cache = self.self_attn(h, cos, sin, segment_ids, k_attn, cache=cache)
        else:
            a = self.self_attn(h, cos, sin, segment_ids, k_attn)
        m = self.mlp(h)
        out = x + _dropout(a, cfg.resid_dropout, k_r1) + _dropout(m, cfg.resid_dropout, k_r2)
        out = constrain(out, ("activation_batch", "activation_length", "activation_embed"))
        return out if cache is None else (out, cache)


class Phi(nnx.Module):
    def __init__(self, cfg: PhiConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed_tokens = nnx.Param(
            nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.vocab_size, cfg.d_model), pd),
            axes=("vocab", "embed"))
        self.layers = Block(cfg, rngs=rngs, stack=(cfg.n_layers,))
        self.final_layernorm = LayerNorm(cfg.d_model, cfg.layer_norm_eps, rngs=rngs, dtype=pd)
        self.lm_head = Dense((cfg.d_model,), (cfg.vocab_size,), ("embed",), ("vocab",), rngs=rngs,
                             std=cfg.init_std, dtype=pd)

    def hidden_states(self, tokens, *, positions=None, segment_ids=None, dropout_key=None):
        """Final-LayerNorm hidden states [batch, len, d_model] (also used for embeddings)."""
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens)
        layer_keys = None
        if dropout_key is not None:
            k_embed, k_layers = jax.random.split(dropout_key)
            x = _dropout(x, cfg.embd_dropout, k_embed)
            layer_keys = jax.random.split(k_layers, cfg.n_layers)
        cos, sin = rotary_tables(positions, cfg.rotary_dim, cfg.rope_base)
        x = self.scan_layers(lambda layer, h, key: layer(h, cos, sin, segment_ids, key), x, layer_keys,
                             remat_policy=cfg.remat_policy)
        return self.final_layernorm(x)

    def scan_layers(self, fn, carry, xs=None, *, remat_policy: str = "none", unroll: int | None = None):
        """carry = fn(layer, carry, x) for every layer in order (x: the layer's slice of `xs`, whose
        leaves have a leading n_layers axis; None without), as one `lax.scan` over the stacked
        weights, `unroll` (default `cfg.scan_unroll`) layers per iteration. Training and decoding
        both run their layers through here."""
        graphdef, stacked = nnx.split(self.layers)

        def body(c, inputs):
            layer_state, x = inputs
            return fn(nnx.merge(graphdef, layer_state), c, x), None

        unroll = self.cfg.scan_unroll if unroll is None else unroll
        carry, _ = jax.lax.scan(remat.apply(body, remat_policy), carry, (stacked, xs), unroll=unroll)
        return carry

    def __call__(self, tokens, *, positions=None, segment_ids=None, dropout_key=None):
        """Logits [batch, len, vocab] in fp32 for int32 tokens [batch, len].

        dropout_key=None means deterministic (eval); positions/segment_ids describe packed
        examples (positions restart at 0 per example; segments never attend to each other).
        """
        h = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids, dropout_key=dropout_key)
        return self.logits(h)

    def embed(self, tokens):
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    def logits(self, h):
        """fp32 logits [batch, len, vocab] of final hidden states [batch, len, d_model]."""
        logits = self.lm_head(h).astype(jnp.float32)
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

    # ------------------------------------------------------------------ decoding with a KV cache

    def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        """An empty cache of `slots` positions per sequence (compute dtype unless `dtype`)."""
        cfg = self.cfg
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.n_layers, batch, cfg.kv_heads, slots, cfg.head_dim)
        k, v = (constrain(jnp.zeros(shape, dtype), CACHE_AXES) for _ in range(2))
        return KVCache(k=k, v=v, segment_ids=jnp.zeros((batch, slots), jnp.int32), index=jnp.zeros((), jnp.int32))

    def decode_step(self, tokens, cache: KVCache, *, positions, segment_ids=None, logits_at=None,
                    window: int | None = None, layer_params: list | None = None):
        """Runs `tokens` [batch, t] into cache slots cache.index .. cache.index + t - 1 (index: a
        scalar, or one per row), attending to every earlier filled slot of the same segment.
        Returns (fp32 logits, the cache advanced by t): of the last position [batch, vocab], or
        with `logits_at` of the positions it names (within t: [batch] -> [batch, vocab], [batch, k]
        -> [batch, k, vocab]). `positions` [batch, t] are the RoPE positions; `segment_ids`
        (default 1) must differ between padding and real tokens. Prefill is one call with the
        whole (left-padded) prompt, then one call per new token. `window`: attention reads
        only the first `window` slots (phijax.serve's window buckets). `layer_params` (from
        `unstack_layers`): the layers run one after the other from their own weight arrays and
        the cache's k, v are tuples of per-layer buffers [1, batch, kv_heads, slots, head_dim]:
        nothing is sliced out of stacked arrays, so nothing is copied per token (the layer scan's
        XLA:CPU/GPU copies of each layer's weights and cache block), at the price of compile time
        growing with depth and a second copy of the layer weights.

        The layers run in the layer scan (`scan_layers`) with the stacked k/v buffers in its
        carry: each layer writes its new keys/values into them in place and reads its own block.
        (Passing the cache as the scan's per-layer input and output instead would rebuild, that
        is copy, the whole cache at every token.)"""
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        if cache.index.ndim == 1:
            cols = cache.index[:, None] + jnp.arange(t)
            kv_segments = cache.segment_ids.at[jnp.arange(b)[:, None], cols].set(segment_ids, mode="drop")
        else:
            kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))
        x = self.embed(tokens)
        cos, sin = rotary_tables(positions, self.cfg.rotary_dim, self.cfg.rope_base)

        def run_layer(layer, carry, i):
            x, k, v = carry
            x, lc = layer(x, cos, sin, segment_ids, None, cache=LayerCache(k, v, kv_segments, cache.index, i, window))
            return x, lc.k, lc.v

        if layer_params is not None:
            graphdef = nnx.split(self.layers)[0]
            ks, vs = [], []
            for p, k, v in zip(layer_params, cache.k, cache.v):
                x, k, v = run_layer(nnx.merge(graphdef, p), (x, k, v), jnp.int32(0))
                ks.append(k)
                vs.append(v)
            k, v = tuple(ks), tuple(vs)
        else:
            # One layer per scan iteration whatever the training setting (cfg.scan_unroll, which a
            # GPU run may set to n_layers for step time): a phi-1 bucket compiles in seconds.
            x, k, v = self.scan_layers(run_layer, (x, cache.k, cache.v),
                                       jnp.arange(self.cfg.n_layers, dtype=jnp.int32), unroll=1)
        if logits_at is None:
            logits = self.logits(self.final_layernorm(x[:, -1:]))[:, 0]
        else:
            at = jnp.asarray(logits_at, jnp.int32)
            picked = jnp.take_along_axis(x, at.reshape(b, -1)[..., None], axis=1)  # [batch, k, d]
            logits = self.logits(self.final_layernorm(picked))
            logits = logits[:, 0] if at.ndim == 1 else logits
        return logits, KVCache(k, v, kv_segments, cache.index + t)


def unstack_layers(params) -> list:
    """Per-layer weights (a list of n_layers dicts) of a params dict's stacked layers, for
    `Phi.decode_step(layer_params=...)`."""
    n = jax.tree.leaves(params["layers"])[0].shape[0]

    def take(x, i):  # abstract weights (ShapeDtypeStructs) stay abstract: compile-time benchmarks
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x[i]

    return [jax.tree.map(lambda x: take(x, i), params["layers"]) for i in range(n)]


def init(cfg: PhiConfig, seed: int = 0) -> Phi:
    return Phi(cfg, rngs=nnx.Rngs(params=seed))


def split(model: Phi):
    """(graphdef, params as a plain nested dict of arrays, logical axes with the same structure)."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    axes = jax.tree.map(lambda v: v.get_metadata()["axes"], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, params, nnx.to_pure_dict(axes) if not isinstance(axes, dict) else axes


def abstract(cfg: PhiConfig):
    """(graphdef, ShapeDtypeStruct params, axes) without allocating anything."""
    model = nnx.eval_shape(lambda: init(cfg))
    return split(model)


def apply(graphdef, params, tokens, **kwargs):
    """Functional forward: logits for `tokens` with the given params dict."""
    return nnx.merge(graphdef, params)(tokens, **kwargs)


def merge(graphdef, params) -> Phi:
    return nnx.merge(graphdef, params)
