"""Window caches built ahead of time with Apache Beam (DirectRunner here; Dataflow,
Flink, Spark for real corpora): the same cache the trainer reads, sharded.

    python -m phijax.data.beam_cache --task phijax_stdlib --seq_len 2048 --cache_dir /data/cache \\
        [--num_shards 64] [--windows_per_file 262144] [--gin_file my_data.gin \\
        --register phijax.tasks.register_codetextbook] -- [Beam pipeline flags: --runner=DataflowRunner ...]

Stages (exact: the result equals ``pipeline.build_window_cache`` window for window):
  1. Tokenize: shard i of S is the i-th *contiguous* slice of the task's documents
     (``OrderedSource``), run through the task's own seqio preprocessing up to its
     CacheDatasetPlaceholder (tokenize + EOS) and saved as one token array.
  2. Plan: prefix sums of the shards' token counts place every window of L+1
     tokens in the global stream (the final partial window is dropped, as in-process).
  3. Windows: output file j takes windows [j*W, (j+1)*W), reading only the token
     ranges it needs (across shard boundaries), and writes ``windows-0000j-of-0000J.npy``.
  4. Finalize: ``meta.json`` (same key and fields as the in-process cache, plus
     ``shards``) is written last, in a temp dir renamed into place (local), so a
     reader sees a complete cache or none. ``load_windows`` memory-maps each file.

The cache directory is ``pipeline.window_cache_dir`` (keyed by task, length,
vocabulary and corpus fingerprints), so ``make_batches`` / ``data_source`` pick it
up with no flag: a complete directory is never rebuilt.
"""
from __future__ import annotations

import importlib
import io
import json
import logging
import os
import posixpath
import time
import uuid
from pathlib import Path
from typing import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from phijax.data import pipeline as pipeline_lib
from phijax.data import vocab as vocab_lib
from phijax.util import cli
from phijax.util import files as files_lib

log = logging.getLogger(__name__)

# ~1 GiB per file at phi-1's L = 2048 in uint16 (2^18 windows x 2049 x 2 bytes).
DEFAULT_WINDOWS_PER_FILE = 1 << 18
TOKENS_DIR = "tokens"


def _is_remote(path: str) -> bool:
    return "://" in path


def _join(*parts: str) -> str:
    return posixpath.join(*parts) if _is_remote(parts[0]) else os.path.join(*parts)


def _save(path: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


def _load(path: str) -> np.ndarray:
    if not _is_remote(path):
        return np.load(path, mmap_mode="r")  # only the rows a window file needs are read
    with FileSystems.open(path) as f:
        return np.load(io.BytesIO(f.read()))


class _Setup:
    """Makes the task exist in a worker process (Dataflow etc.: fresh interpreters)."""

    def __init__(self, task_name: str, modules: Sequence[str], gin_files: Sequence[str],
                 gin_params: Sequence[str], register: Sequence[str]):
        self.task_name, self.modules = task_name, list(modules)
        self.gin_files, self.gin_params, self.register = list(gin_files), list(gin_params), list(register)

    def __call__(self):
        import seqio

        for m in self.modules:
            importlib.import_module(m)
        if self.task_name in seqio.TaskRegistry.names():
            return
        if self.gin_files or self.gin_params:
            import gin

            gin.parse_config_files_and_bindings(self.gin_files, self.gin_params)
            for name in self.register:
                gin.get_configurable(name)()
        if self.task_name not in seqio.TaskRegistry.names():
            raise ValueError(f"task {self.task_name!r} is not registered in this worker "
                             f"(modules {self.modules}, gin files {self.gin_files}, register {self.register})")


class _TokenizeShard(beam.DoFn):
    """Contiguous document shard i -> tokens-0000i.npy; emits (i, n_tokens)."""

    def __init__(self, setup: _Setup, num_shards: int, tmp: str, dtype: str):
        self._setup, self._num_shards, self._tmp, self._dtype = setup, num_shards, tmp, dtype

    def setup(self):
        self._setup()

    def process(self, index: int):
        import seqio

        task = seqio.get_mixture_or_task(self._setup.task_name)
        ds = task.source.get_dataset("train", shuffle=False,
                                     shard_info=seqio.ShardInfo(index, self._num_shards))
        ds = task.preprocess_precache(ds).map(lambda ex: ex["targets"])
        chunks = [np.asarray(t, self._dtype) for t in ds.as_numpy_iterator()]
        tokens = np.concatenate(chunks) if chunks else np.zeros(0, self._dtype)
        _save(_join(self._tmp, TOKENS_DIR, f"tokens-{index:05d}.npy"), tokens)
        yield index, int(tokens.size)


def plan_window_files(counts: Sequence[tuple[int, int]], window_len: int, per_file: int) -> list[dict]:
    """Window files from per-shard token counts: for file j, its windows and the
    (shard, start, stop) token slices that make them, in stream order."""
    counts = sorted(counts)
    if [i for i, _ in counts] != list(range(len(counts))):
        raise ValueError(f"missing token shards: got {[i for i, _ in counts]}")
    sizes = np.asarray([n for _, n in counts], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n_windows = int(starts[-1] // window_len)
    n_files = -(-n_windows // per_file)
    plans = []
    for j in range(n_files):
        w0, w1 = j * per_file, min((j + 1) * per_file, n_windows)
        a, b = w0 * window_len, w1 * window_len
        pieces = []
        for s in range(len(sizes)):
            lo, hi = max(a, starts[s]), min(b, starts[s + 1])
            if lo < hi:
                pieces.append((s, int(lo - starts[s]), int(hi - starts[s])))
        plans.append({"file_index": j, "n_files": n_files, "n_windows": w1 - w0, "pieces": pieces})
    return plans


class _WriteWindows(beam.DoFn):
    def __init__(self, tmp: str, window_len: int, dtype: str):
        self._tmp, self._window_len, self._dtype = tmp, window_len, dtype

    def process(self, plan: dict):
        parts = [np.asarray(_load(_join(self._tmp, TOKENS_DIR, f"tokens-{s:05d}.npy"))[lo:hi])
                 for s, lo, hi in plan["pieces"]]
        windows = np.concatenate(parts).astype(self._dtype).reshape(plan["n_windows"], self._window_len)
        name = f"windows-{plan['file_index']:05d}-of-{plan['n_files']:05d}.npy"
        _save(_join(self._tmp, name), windows)
        yield {"file": name, "n_windows": int(plan["n_windows"])}


def _finalize(_, shards: list[dict], counts: list, tmp: str, final: str, meta: dict):
    shards = sorted(shards, key=lambda s: s["file"])
    n_windows = sum(s["n_windows"] for s in shards)
    if n_windows == 0:
        raise ValueError(f"task {meta['task']!r} yields no window of {meta['seq_len'] + 1} tokens")
    t0 = meta["_t0"]
    meta = {k: v for k, v in meta.items() if k != "_t0"}
    meta.update(shards=shards, n_windows=n_windows, n_tokens=n_windows * (meta["seq_len"] + 1),
                n_stream_tokens=int(sum(n for _, n in counts)), n_token_shards=len(counts),
                build_seconds=round(time.time() - t0, 2))
    FileSystems.delete([_join(tmp, TOKENS_DIR)])
    if _is_remote(final):  # object stores: no directory rename; meta.json last marks completion
        FileSystems.rename([_join(tmp, s["file"]) for s in shards], [_join(final, s["file"]) for s in shards])
        with FileSystems.create(_join(final, pipeline_lib.META_FILE)) as f:
            f.write(json.dumps(meta, indent=1, sort_keys=True).encode())
        FileSystems.delete([tmp])
        return final
    Path(tmp, pipeline_lib.META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.chmod(tmp, 0o755)
    files_lib.publish_dir(tmp, final, complete_marker=pipeline_lib.META_FILE)  # an identical build may win
    return final


def build_window_cache_beam(task_name: str, seq_len: int, cache_dir: str | os.PathLike | None = None, *,
                            num_shards: int = 16, windows_per_file: int = DEFAULT_WINDOWS_PER_FILE,
                            pipeline_args: Sequence[str] = (), modules: Sequence[str] = ("phijax.tasks",),
                            gin_files: Sequence[str] = (), gin_params: Sequence[str] = (),
                            register: Sequence[str] = ()) -> str:
    """Runs the Beam pipeline for ``task_name`` (registered here and, via
    ``modules`` / gin, in every worker) and returns the cache directory; an
    existing complete cache is returned without running anything."""
    if num_shards < 1 or windows_per_file < 1:
        raise ValueError(f"need num_shards >= 1 and windows_per_file >= 1, got {num_shards}, {windows_per_file}")
    setup = _Setup(task_name, modules, gin_files, gin_params, register)
    setup()
    root = str(cache_dir) if cache_dir is not None else str(files_lib.default_cache_dir())
    # The key (task, length, vocabulary, corpus) is computed once, here, by the trainer's own code.
    local_final, key_fields, _, vocab_size = pipeline_lib.window_cache_dir(task_name, seq_len, "/k")
    rel = local_final.relative_to("/k").as_posix()
    final = posixpath.join(root, rel) if _is_remote(root) else os.path.join(root, rel)
    if FileSystems.exists(_join(final, pipeline_lib.META_FILE)):
        return final
    parent = posixpath.dirname(final) if _is_remote(final) else os.path.dirname(final)
    if not _is_remote(parent):
        os.makedirs(parent, exist_ok=True)
    tmp = f"{final}.beam-tmp-{uuid.uuid4().hex[:8]}"
    dtype = pipeline_lib.window_dtype(vocab_size).name
    meta = dict(key_fields, key=local_final.name.rsplit("-", 1)[1], vocab_size=int(vocab_size),
                padded_vocab_size=vocab_lib.padded_vocab_size(vocab_size), dtype=dtype, builder="beam",
                _t0=time.time())
    window_len = seq_len + 1
    with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as p:
        counts = (p | "Shards" >> beam.Create(list(range(num_shards)))
                  | "SpreadShards" >> beam.Reshuffle()
                  | "Tokenize" >> beam.ParDo(_TokenizeShard(setup, num_shards, tmp, dtype))
                  | "AllCounts" >> beam.combiners.ToList())
        files = (p | "PlanSeed" >> beam.Create([None])
                 | "Plan" >> beam.FlatMap(lambda _, c: plan_window_files(c, window_len, windows_per_file),
                                          beam.pvalue.AsSingleton(counts))
                 | "SpreadFiles" >> beam.Reshuffle()
                 | "Windows" >> beam.ParDo(_WriteWindows(tmp, window_len, dtype))
                 | "AllFiles" >> beam.combiners.ToList())
        _ = (p | "FinalizeSeed" >> beam.Create([None])
             | "Finalize" >> beam.Map(_finalize, beam.pvalue.AsSingleton(files), beam.pvalue.AsSingleton(counts),
                                      tmp, final, meta))
    if not FileSystems.exists(_join(final, pipeline_lib.META_FILE)):
        raise RuntimeError(f"Beam pipeline finished but {final} has no {pipeline_lib.META_FILE}")
    log.info("beam window cache %s", final)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0] + " Flags it does not know go to Beam.")
    p.add_argument("--task", required=True, help="registered seqio task (see --module / --gin_file)")
    p.add_argument("--seq_len", type=int, required=True, help="training sequence length L (windows of L+1)")
    p.add_argument("--cache_dir", default=None, help="cache root (default $PHIJAX_CACHE_DIR or ~/.cache/phijax)")
    p.add_argument("--num_shards", type=int, default=16, help="contiguous document shards (parallelism)")
    p.add_argument("--windows_per_file", type=int, default=DEFAULT_WINDOWS_PER_FILE)
    p.add_argument("--module", action="append", default=None, help="module to import (default phijax.tasks)")
    p.add_argument("--gin_file", action="append", default=[])
    p.add_argument("--gin_param", action="append", default=[])
    p.add_argument("--register", action="append", default=[],
                   help="gin configurable to call after parsing, e.g. phijax.tasks.register_codetextbook")
    args, beam_args = p.parse_known_args(argv)
    beam_args = [a for a in beam_args if a != "--"]
    cli.setup_logging()
    try:
        out = build_window_cache_beam(args.task, args.seq_len, args.cache_dir, num_shards=args.num_shards,
                                      windows_per_file=args.windows_per_file, pipeline_args=beam_args,
                                      modules=args.module or ["phijax.tasks"], gin_files=args.gin_file,
                                      gin_params=args.gin_param, register=args.register)
    except ValueError as e:
        return cli.fail(e)
    meta = json.loads(FileSystems.open(_join(out, pipeline_lib.META_FILE)).read().decode())
    print(f"window cache: {out}\n  {meta['n_windows']} windows x {args.seq_len + 1} tokens in "
          f"{len(meta['shards'])} files ({meta['build_seconds']} s)")
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
