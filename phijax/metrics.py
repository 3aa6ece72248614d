"""Training metrics: metrics.jsonl, TensorBoard events, and model FLOPs utilisation (MFU).

MFU = tokens_per_second * PhiConfig.flops_per_token(seq_len) / (devices * peak FLOP/s per device),
with flops_per_token = 6 * matmul_params + 12 * n_layers * n_heads * head_dim * seq_len
(PaLM appendix B; docs/benchmarks.md). Peaks are the published dense bf16 figures per
accelerator; on CPU the peak is a fp32 matmul measured in this process.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from phijax.util.files import atomic_write_text, is_url
from etils import epath

# Published dense bf16 peak FLOP/s per device (per chip for TPU).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e / Trillium
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}

_measured_cpu_peak: float | None = None


def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, seconds: float = 1.0) -> float:
    """FLOP/s of a large jitted matmul on the default device (a practical peak, e.g. for CPU)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f(a).block_until_ready()
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)


def device_peak_flops(device=None) -> float:
    """Peak FLOP/s of one device: the published figure, or a measured matmul peak on CPU."""
    global _measured_cpu_peak
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    if device.platform == "cpu":
        if _measured_cpu_peak is None:
            # One XLA CPU "device" uses every core; simulated multi-device meshes share them.
            _measured_cpu_peak = measure_matmul_peak() / len(jax.devices())
        return _measured_cpu_peak
    raise ValueError(f"unknown peak FLOP/s for device kind {kind!r}; set train.peak_flops_per_device in gin")


class ObjectAppender:
    """An append-only file on an object store. GCS objects cannot be appended to, so the content
    is kept in memory and the whole object is rewritten on `flush` (at most every `min_interval_s`
    seconds unless forced). Starts from the object's current content, so a resumed run continues it."""

    def __init__(self, path, min_interval_s: float = 0.0):
        self.path = epath.Path(path)
        self.min_interval_s = float(min_interval_s)
        self.data = bytearray(self.path.read_bytes() if self.path.exists() else b"")
        self._dirty = False
        self._last_flush = time.monotonic()

    def write(self, data) -> None:
        self.data += data.encode() if isinstance(data, str) else data
        self._dirty = True

    def flush(self, force: bool = True) -> None:
        if not self._dirty or (not force and time.monotonic() - self._last_flush < self.min_interval_s):
            return
        self.path.write_bytes(bytes(self.data))  # object stores need no parent directory
        self._dirty, self._last_flush = False, time.monotonic()

    def rewrite(self, data: bytes) -> None:
        self.data = bytearray(data)
        self._dirty = True
        self.flush()

    def close(self) -> None:
        self.flush()


class _ObjectAppenderFactory:
    """tensorboardX writer factory for gs:// event files, through etils.epath (tf.io.gfile or gcsfs)
    instead of tensorboardX's own google-cloud-storage writer."""

    def open(self, path):
        # Event files are named by second and host; a same-named one (a restart within the same
        # second) is continued, not replaced: readers take the records in sequence.
        return ObjectAppender(path)

    def directory_check(self, path):
        pass  # object stores have no directories to create


class MetricsWriter:
    """Appends one JSON record per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

    A gs:// model_dir is written through etils.epath: metrics.jsonl is rewritten whole at most every
    `remote_flush_secs` and on `flush()` (the trainer flushes before every checkpoint, so the
    records up to a checkpoint are stored before it is)."""

    def __init__(self, model_dir: str, enabled: bool = True, remote_flush_secs: float = 60.0):
        self.enabled = enabled
        self.remote = is_url(model_dir)
        self.path = os.path.join(model_dir, "metrics.jsonl")  # a string: gs:// URLs join like posix paths
        self._tb = None
        self._remote_file = None
        if enabled:
            from tensorboardX import SummaryWriter, record_writer  # no tensorflow needed
            if self.remote:
                record_writer.register_writer_factory("gs", _ObjectAppenderFactory())
                self._remote_file = ObjectAppender(self.path, min_interval_s=remote_flush_secs)
            self._tb = SummaryWriter(os.path.join(model_dir, "tb"))

    def truncate_after(self, step: int) -> None:
        """On resume from the checkpoint taken after `step` steps, drop the records of later
        steps (they are about to be recomputed), atomically."""
        if not self.enabled:
            return
        if self._remote_file is not None:
            lines = bytes(self._remote_file.data).decode().splitlines(keepends=True)
            keep = _records_up_to(lines, step)
            if len(keep) != len(lines):
                self._remote_file.rewrite("".join(keep).encode())
            return
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = _records_up_to(f, step)
        atomic_write_text(self.path, "".join(keep))

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _py(v) for k, v in record.items()}}
        line = json.dumps(record) + "\n"
        if self._remote_file is not None:
            self._remote_file.write(line)
            self._remote_file.flush(force=False)
        else:
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k if "/" in k else f"train/{k}", v, step)  # e.g. eval/humaneval/pass@1

    def flush(self) -> None:
        """Stores everything written so far (remote: uploads metrics.jsonl and the event file)."""
        if self._remote_file is not None:
            self._remote_file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._remote_file is not None:
            self._remote_file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def _records_up_to(lines, step: int) -> list[str]:
    return [line for line in lines if line.strip() and json.loads(line).get("step", -1) <= step]


def _py(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
