"""phijax's XLA:CPU FFI kernels (phijax/kernels/cpu/*.cc): how they are built and registered.

The sources compile into one shared library on first use, with the host's C++ compiler ($CXX,
else g++) and -march=native, into $PHIJAX_KERNEL_CACHE (default ~/.cache/phijax/kernels), named by
a hash of the sources, the flags, the compiler, jaxlib's FFI headers and the CPU model: a changed
input builds a new one. The build writes a temporary file and renames it, so a crash or a
concurrent build leaves no partial library behind. `python -m phijax.kernels.cpu_ffi` builds it
ahead of time (scripts/setup.sh does), so a missing compiler is named then.

Users: attention='cpu' (phijax/kernels/cpu_attention.py) and loss_kernel='cpu' (phijax/loss.py).
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

SOURCES = Path(__file__).with_name("cpu")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
# FFI target name -> the handler symbol the library exports.
TARGETS = {"phijax_cpu_attention_fwd": "PhijaxAttentionForward",
           "phijax_cpu_attention_bwd": "PhijaxAttentionBackward",
           "phijax_cpu_xent": "PhijaxXent"}


class KernelBuildError(RuntimeError):
    """The kernels' shared library could not be built on this host."""


def compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise KernelBuildError(f"attention='cpu' and loss_kernel='cpu' build C++ kernels on first use, and no C++ "
                               f"compiler was found ({cxx!r}; set $CXX, or install g++); 'xla' needs none")
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sources() -> list[Path]:
    return sorted(SOURCES.glob("*.cc"))


def library_path() -> Path:
    """Where this host's build of the kernels lives (it may not exist yet)."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    headers = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api"
    key = hashlib.sha256()
    for part in (*(p.read_bytes() for p in sorted(SOURCES.glob("*.[ch]*"))), " ".join(FLAGS).encode(),
                 version.encode(), _cpu_model().encode(), *(p.read_bytes() for p in sorted(headers.glob("*.h")))):
        key.update(hashlib.sha256(part).digest())
    cache = Path(os.environ.get("PHIJAX_KERNEL_CACHE") or Path.home() / ".cache" / "phijax" / "kernels")
    return cache / f"phijax_cpu-{key.hexdigest()[:20]}.so"


def build() -> Path:
    """The kernels' shared library, compiled first if this host has no build of it."""
    out = library_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem, suffix=".tmp")
    os.close(fd)
    cmd = [compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, sources()), "-o", tmp]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise KernelBuildError(f"building phijax's CPU kernels failed ({' '.join(cmd)}):\n{r.stderr[-4000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same sources renames the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def require(platform: str, what: str) -> None:
    """For a run that uses a kernel (`what`, e.g. "attention='cpu'") on devices of `platform`:
    fails now, naming the problem, if it cannot run there, rather than at the first step's
    compile; builds the library if this host has none."""
    if platform != "cpu":
        raise ValueError(f"{what} is an XLA:CPU kernel; this run's devices are {platform} (use 'xla')")
    build()


@functools.cache
def register() -> None:
    """Builds (if needed) and loads the library, and registers its FFI targets with XLA:CPU."""
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


if __name__ == "__main__":  # build ahead of time: python -m phijax.kernels.cpu_ffi
    try:
        print(build())
    except KernelBuildError as e:
        sys.exit(f"error: {e}")
