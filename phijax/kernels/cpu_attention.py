"""Causal attention for XLA:CPU as an FFI custom call (cpu_attention.cc), behind phijax's attention
signature: attention='cpu'.

Why: on a CPU the blocked XLA attention is bound by the score-sized arrays it writes and reads
back (scores, probabilities, their gradients, [b, h, t, s] each, in several fusions). The kernel
keeps each 64-row query block's scores in a per-thread scratch that stays in L2, keeps only the
log-sum-exp per row for the backward (which recomputes the probabilities), skips the key blocks
the causal mask hides, and runs its GEMMs in one register-tiled micro-kernel. Figures:
`python -m phijax.bench.attention` (docs/benchmarks.md).

The kernel computes in fp32 (other dtypes are cast at the boundary); it has no attention dropout.
Segment ids (packed examples) mask as in the reference. Under the trainer's mesh the call runs
per device (kernels.per_device_attention): XLA cannot partition a custom call.

The shared library is compiled on first use with the host's C++ compiler ($CXX, else g++) and
-march=native, into $PHIJAX_KERNEL_CACHE (default ~/.cache/phijax/kernels), named by a hash of
the source, the flags, the compiler, jaxlib's FFI headers and the CPU model, so a changed input
builds a new one; the build writes a temporary file and renames it, so a crash leaves no partial
library behind. `python -m phijax.kernels.cpu_attention` builds it ahead of time (scripts/setup.sh).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from phijax.kernels import per_device_attention

SOURCE = Path(__file__).with_name("cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
FORWARD, BACKWARD = "phijax_cpu_attention_fwd", "phijax_cpu_attention_bwd"
F32 = jnp.float32


class KernelBuildError(RuntimeError):
    """The kernel's shared library could not be built on this host."""


def compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise KernelBuildError(f"attention='cpu' builds a C++ kernel on first use, and no C++ compiler was found "
                               f"({cxx!r}; set $CXX, or install g++); attention='xla' needs none")
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path() -> Path:
    """Where this host's build of the kernel lives (it may not exist yet)."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    headers = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api"
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), _cpu_model().encode(),
                 *(p.read_bytes() for p in sorted(headers.glob("*.h")))):
        key.update(hashlib.sha256(part).digest())
    cache = Path(os.environ.get("PHIJAX_KERNEL_CACHE") or Path.home() / ".cache" / "phijax" / "kernels")
    return cache / f"cpu_attention-{key.hexdigest()[:20]}.so"


def build() -> Path:
    """The kernel's shared library, compiled first if this host has no build of it."""
    out = library_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem, suffix=".tmp")
    os.close(fd)
    cmd = [compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise KernelBuildError(f"building the CPU attention kernel failed ({' '.join(cmd)}):\n{r.stderr[-4000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same source renames the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _register() -> None:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    jax.ffi.register_ffi_target(FORWARD, jax.ffi.pycapsule(lib.PhijaxAttentionForward), platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD, jax.ffi.pycapsule(lib.PhijaxAttentionBackward), platform="cpu")


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
                               or rotary[0].shape[2] % 2 or not 0 < rotary[0].shape[2] <= min(q.shape[3], 256)):
        reason = f"rotary tables must be [batch, len, even rotary_dim <= head_dim, 256], got {rotary[0].shape}"
    if reason:
        raise NotImplementedError(f"cpu attention: {reason}; use attention='xla'")
    _register()
    cos, sin = (None, None) if rotary is None else rotary

    def local(q, k, v, seg, cos, sin):
        none = jnp.zeros((1,), F32)  # a [1] table: no rotary; [1] segment ids: none
        seg = jnp.zeros((1,), jnp.int32) if seg is None else seg.astype(jnp.int32)
        cos, sin = (none, none) if cos is None else (cos.astype(F32), sin.astype(F32))
        return _attention(q.astype(F32), k.astype(F32), v.astype(F32), seg, cos, sin, bool(causal))

    return per_device_attention(local, q, k, v, segment_ids, cos, sin).astype(q.dtype)


if __name__ == "__main__":  # build ahead of time: python -m phijax.kernels.cpu_attention
    try:
        print(build())
    except KernelBuildError as e:
        sys.exit(f"error: {e}")
