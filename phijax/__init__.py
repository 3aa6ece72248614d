"""phijax: phi-1 ("Textbooks Are All You Need") end to end in JAX."""
import glob as _glob
import importlib.util as _util
import os as _os


def _skip_absent_tpu() -> None:
    """libtpu (the `tpu` extra, used for AOT TPU compiles on a CPU) makes every jax process try to
    open a TPU at start-up and log errors when there is none. Where no TPU device exists and
    JAX_PLATFORMS is unset, restrict jax to the platforms that can be present; the TPU compiler
    stays reachable through jax.experimental.topologies (phijax.compile_check)."""
    if "JAX_PLATFORMS" in _os.environ or _util.find_spec("libtpu") is None:
        return
    if _glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*"):  # a TPU VM
        return
    has_cuda = any(_util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    _os.environ["JAX_PLATFORMS"] = "cuda,cpu" if has_cuda else "cpu"


_skip_absent_tpu()

# Before any CLI (or user code) can import TensorFlow or jax: their C++ start-up INFO lines stay off
# the terminal (phijax/util/cli.py; environment variables the user set win).
from phijax.util.cli import quiet_native_logs as _quiet_native_logs  # noqa: E402 (after the env set-up)

_quiet_native_logs()
