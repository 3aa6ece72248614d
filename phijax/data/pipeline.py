"""What the trainer consumes: fixed token windows -> deterministic batches.

The seqio task runs ONCE per (task, seq_len, vocab, corpus) into a .npy window
cache; training then only does numpy gathers from a memory map. That keeps
tensorflow off accelerator hosts' hot path (and out of ``import`` entirely:
seqio/tf are imported inside ``build_window_cache`` only), and makes batches a
pure function of (seed, step) -- restart- and process-count-invariant.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from phijax.data import cache, packing
from phijax.data import vocab as vocab_lib
from phijax.util import files

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
WINDOWS_FILE = "windows.npy"
META_FILE = cache.META_FILE


# --- window cache --------------------------------------------------------------
def _task_fingerprints(task_name: str) -> tuple[Any, str, str, int]:
    """(task, vocab fingerprint, corpus fingerprint, vocab size)."""
    import seqio

    from phijax.data import seqio_tasks as tasks  # registers the default tasks

    task = seqio.get_mixture_or_task(task_name)
    vocabulary = task.output_features["targets"].vocabulary
    vocab_fp = getattr(vocabulary, "fingerprint", None) or repr(vocabulary)
    info = tasks.TASK_INFO.get(task_name)
    # A foreign seqio task has no corpus fingerprint we can compute; its cache
    # is then keyed by task name + vocabulary only.
    corpus_fp = info.corpus_fingerprint() if info is not None else "unknown"
    return task, vocab_fp, corpus_fp, vocabulary.vocab_size


def window_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def window_cache_dir(task_name: str, seq_len: int, cache_dir: str | os.PathLike | None = None
                     ) -> tuple[Path, dict, Any, int]:
    """(``<cache>/windows/<task>-L<seq_len>-<key>``, key fields, task, vocab size):
    the one place that names a task's window cache, for the in-process build and
    the Beam pipeline alike."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    task, vocab_fp, corpus_fp, vocab_size = _task_fingerprints(task_name)
    key_fields = {"format": CACHE_FORMAT_VERSION, "task": task_name, "seq_len": seq_len,
                  "vocab_fingerprint": vocab_fp, "corpus_fingerprint": corpus_fp}
    root = Path(cache_dir) if cache_dir is not None else files.default_cache_dir()
    return cache.keyed_dir(root, "windows", f"{task_name}-L{seq_len}", key_fields), key_fields, task, vocab_size


def build_window_cache(task_name: str, seq_len: int,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """Materialises ``task_name`` as windows of ``seq_len + 1`` tokens (inputs =
    w[:-1], targets = w[1:]) in ``<cache>/windows/<task>-L<seq_len>-<key>/``.

    Returns that directory; a complete one -- built here or by the Beam pipeline
    (``phijax.data.beam_cache``, sharded files) -- is reused as is. Written to a
    temp dir and renamed into place, so a killed build never leaves a partial cache.
    """
    final, key_fields, task, vocab_size = window_cache_dir(task_name, seq_len, cache_dir)
    key = final.name.rsplit("-", 1)[1]
    if (final / META_FILE).exists():
        return final

    t0 = time.time()
    ds = task.get_dataset({"targets": seq_len + 1}, split="train", shuffle=False,
                          num_epochs=1, use_cached=False)
    dtype = window_dtype(vocab_size)
    chunks = [b["targets"].astype(dtype) for b in ds.batch(1024).as_numpy_iterator()]
    if not chunks:
        raise ValueError(f"task {task_name!r} yields no window of {seq_len + 1} tokens")
    windows = np.concatenate(chunks)
    meta = dict(key_fields, key=key, n_windows=int(windows.shape[0]),
                n_tokens=int(windows.size), vocab_size=int(vocab_size),
                padded_vocab_size=vocab_lib.padded_vocab_size(vocab_size),
                dtype=dtype.name, build_seconds=round(time.time() - t0, 2))

    cache.write_atomic(final, {WINDOWS_FILE.removesuffix('.npy'): windows}, meta)
    log.info("window cache %s: %d windows x %d tokens in %.1fs",
             final, meta["n_windows"], seq_len + 1, meta["build_seconds"])
    return final


def load_windows(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(memory-mapped [N, L+1] windows, meta) from a window-cache dir: one
    ``windows.npy``, or the shards the Beam pipeline writes (``meta['shards']``)
    seen as one array (``ShardedWindows``)."""
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    if "shards" not in meta:
        return np.load(path / WINDOWS_FILE, mmap_mode="r"), meta
    parts = [np.load(path / sh["file"], mmap_mode="r") for sh in meta["shards"]]
    for sh, a in zip(meta["shards"], parts):
        if a.shape[0] != sh["n_windows"]:
            raise ValueError(f"{path / sh['file']}: {a.shape[0]} windows, meta says {sh['n_windows']}")
    return ShardedWindows(parts), meta


class ShardedWindows:
    """Window shards [N_i, L+1] (each a memory map) as one read-only [N, L+1]
    array for the row gathers batches do: no file is read whole, so a 6B-token
    cache (~12 GB of uint16) costs only the rows touched."""

    def __init__(self, parts: list[np.ndarray]):
        if not parts or any(p.ndim != 2 or p.shape[1] != parts[0].shape[1] for p in parts):
            raise ValueError(f"shards must be [N_i, L+1] with one L, got {[p.shape for p in parts]}")
        self.parts = parts
        self.offsets = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self.offsets[-1]), int(parts[0].shape[1]))
        self.ndim = 2
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(self.shape[0]))
        scalar = np.ndim(idx) == 0
        idx = np.atleast_1d(np.asarray(idx, np.int64))
        if idx.size and (idx.min() < -self.shape[0] or idx.max() >= self.shape[0]):
            raise IndexError(f"window index out of range [0, {self.shape[0]})")
        idx = np.where(idx < 0, idx + self.shape[0], idx)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty((idx.size, self.shape[1]), self.dtype)
        for s in np.unique(shard):
            m = shard == s
            out[m] = self.parts[s][idx[m] - self.offsets[s]]
        return out[0] if scalar else out

    def __array__(self, dtype=None, copy=None):
        a = np.concatenate([np.asarray(p) for p in self.parts])
        return a if dtype is None else a.astype(dtype)


# --- batches ----------------------------------------------------------------------
def _check_sharding(global_batch_size: int, process_index: int, process_count: int) -> None:
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got "
                         f"process_index={process_index}, process_count={process_count}")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}")


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return int(step)


# Every source yields these features, [batch, seq_len] each (int32; loss_weights float32), so the
# train step and the compile check see one batch structure whatever the data. A window row is one
# segment (segment_ids 1) at positions 0..L-1; packed rows hold several (phijax.data.packing).
FEATURES = ("inputs", "targets", "loss_weights", "positions", "segment_ids")
FEATURE_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_weights": np.float32, "positions": np.int32,
                  "segment_ids": np.int32}


def _shift(w: np.ndarray) -> dict[str, np.ndarray]:
    w = np.asarray(w, dtype=np.int32)
    b, t = w.shape[0], w.shape[1] - 1
    return {"inputs": w[:, :-1], "targets": w[:, 1:], "loss_weights": np.ones((b, t), np.float32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
            "segment_ids": np.ones((b, t), np.int32)}


class _Batches:
    """Shared (seed, step) -> rows bookkeeping and data-state checks."""

    seq_len: int
    n_windows: int | None
    tokenizer_path: str | None = None  # the tokenizer.json the tokens came from, where known

    def __init__(self, global_batch_size: int, seed: int, process_index: int, process_count: int):
        _check_sharding(global_batch_size, process_index, process_count)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.local_batch_size = self.global_batch_size // self.process_count

    def _local_range(self) -> tuple[int, int]:
        lo = self.process_index * self.local_batch_size
        return lo, lo + self.local_batch_size

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's contiguous rows [p*B/P, (p+1)*B/P) of the global batch."""
        return self._batch(_check_step(step), *self._local_range())

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        return self._batch(_check_step(step), 0, self.global_batch_size)

    def epoch_of(self, step: int) -> int:
        return 0

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "n_windows": self.n_windows, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size}

    def state(self, step: int) -> dict[str, Any]:
        """JSON-serialisable data state to store in a checkpoint."""
        step = _check_step(step)
        return dict(self._identity(), step=step, epoch=self.epoch_of(step))

    def check_state(self, state: dict[str, Any]) -> int:
        """Raises ValueError if a checkpointed state came from a different data
        stream (dataset size, seq_len, seed, batch size, data fingerprint);
        returns the checkpointed step to resume from."""
        mine = self._identity()
        bad = {k: (state.get(k), v) for k, v in mine.items() if k in state and state[k] != v}
        missing = [k for k in ("seed", "n_windows", "seq_len", "step") if k not in state]
        if missing:
            raise ValueError(f"data state is missing {missing}: {state}")
        if bad:
            detail = ", ".join(f"{k}: checkpoint={a!r} vs current={b!r}" for k, (a, b) in bad.items())
            raise ValueError(f"checkpointed data state does not match this data pipeline ({detail})")
        return _check_step(state["step"])

    def __iter__(self):
        step = 0
        while True:
            yield self.local_batch(step)
            step += 1


class WindowBatches(_Batches):
    """Batches of windows [N, L+1]; a pure function of (seed, step).

    Global sample g = step*B + i lives in epoch g // N at position g % N of the
    seeded permutation for that epoch: every epoch visits every window exactly
    once, epochs differ, and no process count or restart changes any batch.
    """

    def __init__(self, windows: np.ndarray, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, meta: dict | None = None):
        super().__init__(global_batch_size, seed, process_index, process_count)
        if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
            raise ValueError(f"windows must be [N >= 1, L+1 >= 2], got shape {windows.shape}")
        self.windows = windows
        self.n_windows = int(windows.shape[0])
        self.seq_len = int(windows.shape[1]) - 1
        self.meta = dict(meta or {})
        self.vocab_size = self.meta.get("vocab_size")
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def from_cache(cls, path: str | os.PathLike, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> "WindowBatches":
        windows, meta = load_windows(path)
        return cls(windows, global_batch_size, seed, process_index, process_count, meta=meta)

    def _identity(self) -> dict[str, Any]:
        ident = super()._identity()
        if "key" in self.meta:  # which cache (task/vocab/corpus) the windows came from
            ident["data_key"] = self.meta["key"]
        return ident

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
            self._perms[epoch] = perm
            while len(self._perms) > 2:  # a batch spans at most a few epochs
                self._perms.popitem(last=False)
        return perm

    def epoch_of(self, step: int) -> int:
        """Epoch of the step's first global sample."""
        return _check_step(step) * self.global_batch_size // self.n_windows

    def rows(self, step: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Window indices of global-batch rows [lo, hi) at ``step``."""
        hi = self.global_batch_size if hi is None else hi
        g = _check_step(step) * self.global_batch_size + np.arange(lo, hi, dtype=np.int64)
        epochs, pos = np.divmod(g, self.n_windows)
        out = np.empty_like(g)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self.permutation(int(e))[pos[m]]
        return out

    def _batch(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        return _shift(self.windows[self.rows(step, lo, hi)])


class SyntheticBatches(_Batches):
    """Uniform random tokens, same interface (no data files, no tf): for
    benchmarks. Each global row has its own RNG keyed by (seed, step, row), so
    process slices agree with the global batch and nothing depends on history."""

    def __init__(self, vocab_size: int, seq_len: int, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        super().__init__(global_batch_size, seed, process_index, process_count)
        if vocab_size < 1 or seq_len < 1:
            raise ValueError(f"need vocab_size >= 1 and seq_len >= 1, got {vocab_size}, {seq_len}")
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.n_windows = None
        self.meta = {"source": "synthetic", "vocab_size": self.vocab_size}

    def _batch(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        w = np.stack([np.random.default_rng((self.seed, step, r)).integers(
            0, self.vocab_size, self.seq_len + 1, dtype=np.int32) for r in range(lo, hi)])
        return _shift(w)


class PackedBatches(WindowBatches):
    """Packed fine-tuning rows (see ``phijax.data.packing``): the same
    (seed, step) -> rows schedule as WindowBatches over the R packed rows
    (multi-epoch, process slices, state/check_state), but each batch carries
    all five features: inputs, targets, loss_weights, positions, segment_ids
    (all [batch, L]; int32, weights float32)."""

    def __init__(self, arrays: dict[str, np.ndarray], global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, meta: dict | None = None):
        _Batches.__init__(self, global_batch_size, seed, process_index, process_count)
        missing = [k for k in packing.FEATURES if k not in arrays]
        if missing:
            raise ValueError(f"packed arrays are missing {missing}")
        shapes = {k: tuple(arrays[k].shape) for k in packing.FEATURES}
        shape = shapes["tokens"]
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1 or len(set(shapes.values())) != 1:
            raise ValueError(f"packed arrays must all be [R >= 1, L >= 1], got {shapes}")
        self.arrays = {k: arrays[k] for k in packing.FEATURES}
        self.windows = self.arrays["tokens"]
        self.n_windows = int(shape[0])
        self.seq_len = int(shape[1])
        self.meta = dict(meta or {})
        self.vocab_size = self.meta.get("vocab_size")
        self._perms = OrderedDict()

    @classmethod
    def from_cache(cls, path: str | os.PathLike, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> "PackedBatches":
        arrays, meta = packing.load_packed(path)
        return cls(arrays, global_batch_size, seed, process_index, process_count, meta=meta)

    def _batch(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        idx = self.rows(step, lo, hi)
        a = self.arrays
        return {"inputs": np.asarray(a["tokens"][idx], np.int32),
                "targets": np.asarray(a["targets"][idx], np.int32),
                "loss_weights": np.asarray(a["loss_weights"][idx], np.float32),
                "positions": np.asarray(a["positions"][idx], np.int32),
                "segment_ids": np.asarray(a["segment_ids"][idx], np.int32)}


class MixtureBatches(_Batches):
    """A seqio Mixture's tasks, each a window cache, interleaved by rate; a pure
    function of (seed, step) like WindowBatches.

    Global sample g lies in block g // K (K = ``block_size``) at slot g % K. Each
    block gives task t a fixed quota q_t ~ K * rate_t (largest remainder, every
    task >= 1) in slots ordered by a permutation seeded by (seed, block); so task
    t's k-th sample is known in O(K) without replaying history:
    k = block * q_t + (rank of the slot among t's slots in the block). Within a
    task, k walks that task's own epochs exactly like WindowBatches (epoch
    k // N_t, seeded permutation): every window of a task once per task-epoch.
    """

    def __init__(self, components: list[tuple[str, Any, dict]], rates: list[float], global_batch_size: int,
                 seed: int, process_index: int = 0, process_count: int = 1, block_size: int = 4096):
        super().__init__(global_batch_size, seed, process_index, process_count)
        if not components or len(components) != len(rates):
            raise ValueError(f"need one rate per component, got {len(components)} components, {len(rates)} rates")
        lens = {w.shape[1] for _, w, _ in components}
        if len(lens) != 1:
            raise ValueError(f"mixture components have different window lengths {sorted(lens)}")
        if any(not float(r) > 0 for r in rates):
            raise ValueError(f"mixture rates must be > 0, got {rates}")
        if block_size < len(components):
            raise ValueError(f"block_size={block_size} < number of tasks {len(components)}")
        self.names = [n for n, _, _ in components]
        self.parts = [w for _, w, _ in components]
        self.metas = [dict(m) for _, _, m in components]
        self.sizes = np.asarray([w.shape[0] for w in self.parts], np.int64)
        self.seq_len = int(lens.pop()) - 1
        self.n_windows = int(self.sizes.sum())
        self.block_size = int(block_size)
        self.rates = [float(r) for r in rates]
        self.quotas = self._quotas(np.asarray(self.rates, np.float64), self.block_size)
        vs = [m.get("vocab_size") for m in self.metas]
        self.vocab_size = max(vs) if all(v is not None for v in vs) else None
        self.meta = {"mixture": dict(zip(self.names, self.rates)), "components": self.metas}
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: dict[int, OrderedDict] = {t: OrderedDict() for t in range(len(self.parts))}

    @staticmethod
    def _quotas(rates: np.ndarray, k: int) -> np.ndarray:
        ideal = rates / rates.sum() * k
        q = np.maximum(np.floor(ideal).astype(np.int64), 1)
        while q.sum() > k:  # the max(.., 1) above may overshoot
            q[np.argmax(q - ideal)] -= 1
        for t in np.argsort(-(ideal - q), kind="stable")[: k - q.sum()]:
            q[t] += 1
        return q

    def _identity(self) -> dict[str, Any]:
        ident = super()._identity()
        ident["data_key"] = "+".join(f"{n}:{m.get('key')}" for n, m in zip(self.names, self.metas))
        ident["quotas"] = [int(q) for q in self.quotas]
        return ident

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._blocks.get(b)
        if got is None:
            slots = np.random.default_rng((self.seed, 0x6D6978, b)).permutation(
                np.repeat(np.arange(len(self.quotas)), self.quotas))
            rank = np.empty_like(slots)
            for t in range(len(self.quotas)):
                pos = np.flatnonzero(slots == t)
                rank[pos] = np.arange(pos.size)
            got = self._blocks[b] = (slots, rank)
            while len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return got

    def _perm(self, t: int, epoch: int) -> np.ndarray:
        cache_t = self._perms[t]
        perm = cache_t.get(epoch)
        if perm is None:
            perm = cache_t[epoch] = np.random.default_rng((self.seed, 1 + t, epoch)).permutation(self.sizes[t])
            while len(cache_t) > 2:
                cache_t.popitem(last=False)
        return perm

    def epoch_of(self, step: int) -> int:
        """Nominal: global samples so far over the total windows of all tasks."""
        return _check_step(step) * self.global_batch_size // self.n_windows

    def task_epochs(self, step: int) -> dict[str, int]:
        """Each task's epoch at the step's first sample."""
        g = _check_step(step) * self.global_batch_size
        b, o = divmod(g, self.block_size)
        slots, _ = self._block(b)
        before = np.bincount(slots[:o], minlength=len(self.quotas))
        return {n: int((b * q + c) // size) for n, q, c, size in zip(self.names, self.quotas, before, self.sizes)}

    def state(self, step: int) -> dict[str, Any]:
        return dict(super().state(step), task_epochs=self.task_epochs(step))

    def rows(self, step: int, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(task index, window index) of global-batch rows [lo, hi) at ``step``."""
        hi = self.global_batch_size if hi is None else hi
        g = _check_step(step) * self.global_batch_size + np.arange(lo, hi, dtype=np.int64)
        task = np.empty_like(g)
        row = np.empty_like(g)
        blocks, offs = np.divmod(g, self.block_size)
        for b in np.unique(blocks):
            m = blocks == b
            slots, rank = self._block(int(b))
            t = slots[offs[m]]
            k = b * self.quotas[t] + rank[offs[m]]
            task[m] = t
            row[m] = [self._perm(int(ti), int(ki // self.sizes[ti]))[ki % self.sizes[ti]]
                      for ti, ki in zip(t, k)]
        return task, row

    def _batch(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        task, row = self.rows(step, lo, hi)
        w = np.empty((hi - lo, self.seq_len + 1), np.int32)
        for t in np.unique(task):
            m = task == t
            w[m] = self.parts[t][row[m]]
        return _shift(w)


def mixture_batches(mixture_name: str, *, seq_len: int, global_batch_size: int, seed: int = 0,
                    process_index: int = 0, process_count: int = 1,
                    cache_dir: str | os.PathLike | None = None) -> MixtureBatches:
    """A registered seqio Mixture -> one window cache per task (in-process or
    Beam-built) -> MixtureBatches with the mixture's rates."""
    import seqio

    mixture = seqio.get_mixture_or_task(mixture_name)
    comps, rates = [], []
    for task in mixture.tasks:  # sorted by name: a stable order
        windows, meta = load_windows(build_window_cache(task.name, seq_len, cache_dir))
        comps.append((task.name, windows, meta))
        rates.append(float(mixture.get_rate(task)))
    return MixtureBatches(comps, rates, global_batch_size, seed, process_index, process_count)


SOURCES = ("stdlib", "task", "mixture", "exercises", "synthetic")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where a run's batches come from, before the run's shape is known: the trainer's
    `train.data_source` (gin: `data_source.kind = ...` etc.). `make` adds what the run decides
    (sequence length, global batch, seed, the model's vocabulary size, this process's slice).

    kind 'stdlib': the SeqIO stdlib task with a BPE vocabulary of `vocab_size` (default: the
    model's; trained once, cached); 'task': the registered SeqIO task or Mixture `task_name` (a
    Mixture, e.g. `@phijax.tasks.register_codetextbook()`, interleaves its tasks' window caches by
    rate; 'mixture' insists on one); 'exercises': a CodeExercises JSONL file (`data_path`) packed
    into rows with segment ids and loss weights on the solutions (`loss_on`); 'synthetic': random
    tokens, no tensorflow.
    """

    kind: str = "stdlib"
    vocab_size: int | None = None
    task_name: str | None = None
    cache_dir: str | None = None
    data_path: str | None = None
    tokenizer_path: str | None = None
    loss_on: str = "solution"
    overlong: str = "truncate"

    def __post_init__(self):
        if self.kind not in SOURCES:
            raise ValueError(f"unknown data source kind {self.kind!r}; expected one of {', '.join(SOURCES)}")

    def make(self, *, seq_len: int, global_batch_size: int, seed: int, model_vocab_size: int,
             process_index: int = 0, process_count: int = 1) -> "_Batches":
        """Batches that depend only on (seed, step); raises ValueError when the data's vocabulary
        is larger than the model's."""
        data = make_batches(self.kind, task_name=self.task_name, seq_len=seq_len, global_batch_size=global_batch_size,
                            seed=seed, vocab_size=self.vocab_size or model_vocab_size, process_index=process_index,
                            process_count=process_count, cache_dir=self.cache_dir, data_path=self.data_path,
                            tokenizer_path=self.tokenizer_path, loss_on=self.loss_on, overlong=self.overlong)
        if (getattr(data, "vocab_size", None) or 0) > model_vocab_size:
            raise ValueError(f"the data's vocabulary ({data.vocab_size}) is larger than the model's "
                             f"vocab_size ({model_vocab_size})")
        return data


def make_batches(source: str, *, seq_len: int, global_batch_size: int, seed: int = 0,
                 vocab_size: int = vocab_lib.DEFAULT_VOCAB_SIZE, task_name: str | None = None,
                 process_index: int = 0, process_count: int = 1,
                 cache_dir: str | os.PathLike | None = None,
                 data_path: str | os.PathLike | None = None,
                 tokenizer_path: str | os.PathLike | None = None,
                 loss_on: str = "solution", overlong: str = "truncate") -> _Batches:
    """``"stdlib"`` (or ``"task"`` with ``task_name``): seqio task -> window
    cache -> WindowBatches; a seqio Mixture name (``"task"`` or ``"mixture"``):
    one window cache per task -> MixtureBatches. ``"synthetic"``: SyntheticBatches.
    ``"exercises"``: the exercises JSONL at ``data_path`` -> packed cache ->
    PackedBatches (no tensorflow), tokenized with ``tokenizer_path`` or, by
    default, the stdlib BPE of ``vocab_size`` (the pretraining vocabulary)."""
    if source == "exercises":
        if data_path is None:
            raise ValueError("source='exercises' needs data_path (an exercises JSONL file)")
        tok_path = (tokenizer_path if tokenizer_path is not None
                    else vocab_lib.stdlib_tokenizer_path(vocab_size, cache_dir))
        tok = vocab_lib.BPETokenizer(tok_path)
        path = packing.build_packed_cache(data_path, tok, seq_len, loss_on=loss_on,
                                          overlong=overlong, cache_dir=cache_dir)
        batches = PackedBatches.from_cache(path, global_batch_size, seed, process_index, process_count)
        batches.tokenizer_path = str(tok_path)  # what evaluation during training decodes with
        return batches
    if source == "synthetic":
        return SyntheticBatches(vocab_size, seq_len, global_batch_size, seed,
                                process_index, process_count)
    if source in ("stdlib", "task", "mixture"):
        if task_name is None:
            if source != "stdlib":
                raise ValueError(f"source={source!r} needs task_name")
            from phijax.data import seqio_tasks as tasks  # lazy: tf/seqio only when data is built

            task_name = tasks.ensure_stdlib_task(vocab_size)
        import seqio

        from phijax.data import seqio_tasks as tasks  # noqa: F401  (registers the default tasks)

        if task_name in seqio.MixtureRegistry.names():
            batches = mixture_batches(task_name, seq_len=seq_len, global_batch_size=global_batch_size,
                                      seed=seed, process_index=process_index, process_count=process_count,
                                      cache_dir=cache_dir)
            vocabularies = [t.output_features["targets"].vocabulary for t in seqio.get_mixture_or_task(task_name).tasks]
            paths = {str(getattr(v, "tokenizer_path", None)) for v in vocabularies}
            if len(paths) == 1 and all(hasattr(v, "tokenizer_path") for v in vocabularies):
                batches.tokenizer_path = paths.pop()  # one tokenizer: the export and evaluation decode with it
            return batches
        if source == "mixture":
            raise ValueError(f"{task_name!r} is not a registered seqio Mixture")
        path = build_window_cache(task_name, seq_len, cache_dir)
        batches = WindowBatches.from_cache(path, global_batch_size, seed, process_index, process_count)
        vocabulary = seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
        if hasattr(vocabulary, "tokenizer_path"):  # our HF-BPE vocabularies: evaluation decodes with it
            batches.tokenizer_path = str(vocabulary.tokenizer_path)
        return batches
    raise ValueError(f"unknown data source {source!r}; expected 'stdlib', 'task', 'mixture', "
                     f"'exercises' or 'synthetic'")
