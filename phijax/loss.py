"""Token losses: weighted NLL of logits, and the fused, chunked LM head + cross-entropy.

Both return (sum of weighted token NLL, sum of weights) in fp32; the train step divides by the
total weight of the global batch.

`fused_lm_head_loss_sums` never holds the [tokens, vocab] logits or their gradient at once: it
walks the sequence in chunks of `chunk` positions (all rows at once), and for each chunk forms
the logits, the log-sum-exp and the softmax gradient, and feeds that gradient straight into the
two LM-head matmuls (input gradient, and the weight/bias gradients accumulated in fp32). The
gradients are formed in the forward pass, while the chunk's logits are at hand: the loss is the
step's last op, so its cotangent is a scalar, the gradients are linear in it, and the backward
only scales what the forward kept (dh, the weight and bias gradients; no logits). That saves the
logits residual ([tokens, vocab]: 128 MiB on the CPU benchmark, 3.3 GB in bf16 for phi-1 at
16 x 2048) and the second pass over them. Evaluation (no gradient) runs the loss alone. On a CPU
the chunk's gradient stays in cache for the transposed read the weight gradient needs (XLA:CPU's
GEMMs take both operands with the contracted dim innermost, so that gradient must exist in both
layouts); with impl='cpu' (PhiConfig.loss_kernel) the chunk's softmax cross-entropy and its
gradient are one XLA:CPU kernel call (phijax/kernels/cpu/xent.cc), one pass per vocabulary row.

Under the trainer's mesh (phijax.sharding.use_mesh_rules) both passes run in a shard_map laid
out by the same logical-axis rules as the arrays (batch over data+fsdp, the kernel [embed ->
fsdp, vocab -> tensor]): left to XLA, the gradient accumulator of the chunk loop would be
all-reduced once per chunk. Each device walks its own rows with the kernel gathered over fsdp
once per pass (as FSDP does). With the vocab split over tensor, each device computes its vocab
slice of the logits; per chunk, the log-sum-exp and the target logit combine across tensor in
two collectives of [rows, chunk] (max, then sum of exp with the target logit, which lives in
one slice), and the input gradient is summed across tensor (activation-sized, as in the unfused
path). The weight/bias gradients accumulate locally over all chunks and are reduced over the
batch axes once at the end (a reduce-scatter back to the kernel's fsdp shard); the loss sum
too. On one device the loop runs as is, with no collectives. The CPU kernel runs where the
vocabulary is whole per device.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from phijax import sharding
from phijax.kernels import cpu_ffi

F32 = jnp.float32


@jax.custom_vjp
def _weighted_nll_sum(logits, targets, weights):
    return _nll_fwd(logits, targets, weights)[0]


def _nll_fwd(logits, targets, weights):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * weights), (logits, lse, targets, weights)


def _softmax_grad(logits, lse, targets, gw):
    """d(NLL)/d(logits) * gw: softmax - onehot in one elementwise pass (autodiff of log_softmax
    and the gather would take several)."""
    onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    return (jnp.exp(logits.astype(F32) - lse[..., None]) - onehot) * gw[..., None]


def _nll_bwd(res, g):
    logits, lse, targets, weights = res
    return _softmax_grad(logits, lse, targets, g * weights).astype(logits.dtype), None, None


_weighted_nll_sum.defvjp(_nll_fwd, _nll_bwd)


def token_loss_sums(logits, targets, weights):
    """(sum of weighted token NLL, sum of weights) in fp32 of logits [..., vocab]."""
    w = weights.astype(F32)
    return _weighted_nll_sum(logits.astype(F32), targets.astype(jnp.int32), w), jnp.sum(w)


# ------------------------------------------------------------------ fused LM head + loss
def chunk_size(length: int, chunk: int) -> int:
    """The largest divisor of `length` that is <= chunk (chunks must tile the sequence)."""
    return max(c for c in range(1, max(1, min(chunk, length)) + 1) if length % c == 0)


def _chunks(x, c):  # [b, t, ...] -> [t // c, b, c, ...]
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // c, c, *x.shape[2:]), 1, 0)


def _unchunk(x):  # [n, b, c, ...] -> [b, n * c, ...]
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _head(h, kernel, bias):
    """The LM head as the model computes it: in h's dtype, bias included."""
    return jnp.einsum("bcd,dv->bcv", h, kernel.astype(h.dtype)) + bias.astype(h.dtype)


class _Axes(NamedTuple):
    """The mesh axes one device's loss combines over (all empty on one device). rows: split h's
    rows/positions, so the sums add over them. embed: split the kernel's input dim (FSDP; all
    are row axes). vocab: split the vocab (none is a row axis)."""
    rows: tuple = ()
    embed: tuple = ()
    vocab: tuple = ()


def _psum(x, axes):
    return jax.lax.psum(x, axes) if axes else x


def _lse_and_target_logit(lf, t, vocab):
    """fp32 log-sum-exp and target logit of the fp32 logits lf [b, c, v]. With `vocab` axes, lf is
    this device's vocab slice and t the target's index in it (outside it: another slice's)."""
    if not vocab:
        return jax.nn.logsumexp(lf, axis=-1), jnp.take_along_axis(lf, t[..., None], axis=-1)[..., 0]
    m = jax.lax.pmax(jnp.max(lf, axis=-1), vocab)
    v = lf.shape[-1]
    picked = jnp.take_along_axis(lf, jnp.clip(t, 0, v - 1)[..., None], axis=-1)[..., 0]
    picked = jnp.where((t >= 0) & (t < v), picked, 0.0)
    # The sum of exp and the target logit in one [2, b, c] collective.
    s, picked = jax.lax.psum(jnp.stack([jnp.sum(jnp.exp(lf - m[..., None]), axis=-1), picked]), vocab)
    return m + jnp.log(s), picked


def _local_operands(kernel, targets, dtype, ax):
    """The kernel in the compute dtype with its whole input dim (gathered once per pass, as FSDP
    does; cast first, so the gather moves compute-dtype bytes), and the targets as indices into
    this device's vocab slice."""
    kernel = kernel.astype(dtype)
    if ax.embed:
        kernel = jax.lax.all_gather(kernel, ax.embed, axis=0, tiled=True)
    if ax.vocab:
        targets = targets - jax.lax.axis_index(ax.vocab) * kernel.shape[1]
    return kernel, targets


def _cpu_xent(h_c, k, bias, t_c, w_c):
    """(weighted NLL sum, gradient d of it wrt the logits, d summed over the rows) of one chunk: the
    softmax cross-entropy in the XLA:CPU FFI kernel (phijax/kernels/cpu/xent.cc), one pass per
    vocabulary row, in cache."""
    cpu_ffi.register()
    b, c = t_c.shape
    logits = jnp.einsum("bcd,dv->bcv", h_c, k).astype(F32).reshape(b * c, -1)
    d, nll, db = jax.ffi.ffi_call("phijax_cpu_xent", (jax.ShapeDtypeStruct(logits.shape, F32),
                                                      jax.ShapeDtypeStruct((b * c,), F32),
                                                      jax.ShapeDtypeStruct(bias.shape, F32)))(
        logits, bias.astype(F32), t_c.reshape(-1), w_c.reshape(-1))
    return jnp.sum(nll * w_c.reshape(-1)), d.reshape(b, c, -1), db


def _local_loss(h, kernel, bias, targets, weights, chunk, ax, with_grads, impl="xla"):
    """This device's loss sum; with_grads: and the loss's gradients wrt h, kernel and bias for a
    cotangent of 1, formed chunk by chunk while the chunk's logits are at hand (the loss is the
    last op of the step, so its cotangent is a scalar and the gradients are linear in it).
    impl='cpu': the chunk's softmax cross-entropy and its gradient in the XLA:CPU kernel, where
    the vocab is whole on the device (a split vocab combines its log-sum-exp across devices here)."""
    c = chunk_size(h.shape[1], chunk)
    k, targets = _local_operands(kernel, targets, h.dtype, ax)
    in_kernel = impl == "cpu" and with_grads and not ax.vocab

    def body(carry, xs):
        total, dk, db = carry
        h_c, t_c, w_c = xs
        if in_kernel:
            nll, d, db_c = _cpu_xent(h_c, k, bias, t_c, w_c)
            total, d = total + nll, d.astype(h.dtype)
        else:
            logits = _head(h_c, k, bias)
            lse, picked = _lse_and_target_logit(logits.astype(F32), t_c, ax.vocab)
            total = total + jnp.sum((lse - picked) * w_c)
            if not with_grads:
                return (total, dk, db), None
            d = _softmax_grad(logits, lse, t_c, w_c).astype(h.dtype)  # a target in another slice: no onehot here
            db_c = jnp.sum(d.astype(F32), axis=(0, 1))
        dk = dk + jnp.einsum("bcd,bcv->dv", h_c, d, preferred_element_type=F32)
        db = db + db_c
        dh = jnp.einsum("bcv,dv->bcd", d, k, preferred_element_type=F32)  # fp32 until the cotangent is applied
        return (total, dk, db), _psum(dh, ax.vocab)  # every vocab slice adds to dh

    zeros = (jnp.zeros(k.shape, F32), jnp.zeros(k.shape[1:], F32)) if with_grads else (F32(0), F32(0))
    (total, dk, db), dh = jax.lax.scan(body, (F32(0), *zeros),
                                       (_chunks(h, c), _chunks(targets, c), _chunks(weights, c)))
    total = _psum(total, ax.rows)
    if not with_grads:
        return total
    # The weight/bias gradients are reduced over the rows once, here, not once per chunk; the
    # kernel's goes back to its FSDP shard on the way (a reduce-scatter).
    if ax.embed:
        dk = jax.lax.psum_scatter(dk, ax.embed, scatter_dimension=0, tiled=True)
    dk = _psum(dk, tuple(a for a in ax.rows if a not in ax.embed))
    return total, _unchunk(dh), dk, _psum(db, ax.rows)


class _Layout(NamedTuple):
    """The fused loss under a mesh: the axes it combines over and its shard_maps' specs."""
    mesh: Mesh
    ax: _Axes
    h: P  # [batch, len, d_model]
    rows: P  # targets, weights [batch, len]
    kernel: P  # [d_model, vocab]
    bias: P  # [vocab]

    def map(self, fn, in_specs, out_specs):
        # The collectives are written out and nothing is differentiated through the shard_maps
        # (the custom VJP wraps them), so there is nothing for replication checking to add.
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _mesh_axes(entry) -> tuple:  # a PartitionSpec entry as a tuple of mesh axes
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _layout(h, kernel) -> _Layout | None:
    """The layout under the trainer's mesh (phijax.sharding.use_mesh_rules), or None on one device.
    The specs come from the logical axes and rules that shard the arrays, so the shard_maps move
    nothing on the way in, except a split the loop cannot use (the kernel's input dim over a
    non-row axis, the vocab over a row axis): that operand is gathered first."""
    ctx = sharding._CONTEXT.get()
    if ctx is None or ctx[0].size == 1:
        return None
    mesh, rules = ctx
    h_spec = sharding.logical_to_spec(("activation_batch", "activation_length", None), rules, mesh, h.shape)
    k_spec = sharding.logical_to_spec(("embed", "vocab"), rules, mesh, kernel.shape)
    rows = _mesh_axes(h_spec[0]) + _mesh_axes(h_spec[1])
    embed = tuple(a for a in _mesh_axes(k_spec[0]) if a in rows) or None
    # (A vocab 'split' over size-1 axes is whole: no collectives, and the CPU kernel can run.)
    vocab = tuple(a for a in _mesh_axes(k_spec[1]) if a not in rows and mesh.shape[a] > 1) or None
    b, t = h_spec[:2]
    return _Layout(mesh, _Axes(rows, _mesh_axes(embed), _mesh_axes(vocab)), h=h_spec, rows=P(b, t),
                   kernel=P(embed, vocab), bias=P(vocab))


def _sharded_loss(h, kernel, bias, targets, weights, chunk, impl, lo, with_grads):
    fn = functools.partial(_local_loss, chunk=chunk, ax=lo.ax if lo is not None else _Axes(), with_grads=with_grads,
                           impl=impl)
    if lo is not None:
        fn = lo.map(fn, (lo.h, lo.kernel, lo.bias, lo.rows, lo.rows),
                    (P(), lo.h, lo.kernel, lo.bias) if with_grads else P())
    return fn(h, kernel, bias, targets, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused_nll_sum(h, kernel, bias, targets, weights, chunk, impl, layout):
    return _sharded_loss(h, kernel, bias, targets, weights, chunk, impl, layout, with_grads=False)


def _fused_fwd(h, kernel, bias, targets, weights, chunk, impl, lo):
    total, dh, dk, db = _sharded_loss(h, kernel, bias, targets, weights, chunk, impl, lo, with_grads=True)
    zeros = tuple(jnp.zeros((0,), x.dtype) for x in (h, kernel, bias))  # the dtypes the gradients go back in
    return total, (dh, dk, db, zeros)


def _fused_bwd(chunk, impl, lo, res, g):
    *grads, zeros = res  # fp32, for a cotangent of 1
    dh, dk, db = ((x * g).astype(z.dtype) for x, z in zip(grads, zeros))
    return dh, dk, db, None, None


_fused_nll_sum.defvjp(_fused_fwd, _fused_bwd)


def fused_lm_head_loss_sums(h, kernel, bias, targets, weights, chunk: int, impl: str = "xla"):
    """token_loss_sums(h @ kernel + bias, targets, weights) for final hidden states h
    [batch, len, d_model], computed `chunk` positions at a time; sharded under the trainer's
    mesh (phijax.sharding.use_mesh_rules). impl: 'xla', or 'cpu' (PhiConfig.loss_kernel: the
    softmax cross-entropy in an XLA:CPU kernel). See the module docstring."""
    w = weights.astype(F32)
    layout = _layout(h, kernel)
    return _fused_nll_sum(h, kernel, bias, targets.astype(jnp.int32), w, chunk, impl, layout), jnp.sum(w)
