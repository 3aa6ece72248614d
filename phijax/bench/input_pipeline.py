"""Input-pipeline throughput (tokens/s) on this machine, cached vs uncached, beside
what one 8xH100 host consumes training phi-1 1.3B at 60% MFU.

    python -m phijax.bench.input_pipeline [--seq_len 2048] [--batch 8] [--seconds 20] [--json out.json]

* cached: ``WindowBatches`` over the stdlib task's window cache (a memory-mapped
  .npy of uint16 windows; built once, reused) -- what the trainer's loop calls,
  ``local_batch(step)``, at random steps; also over the same windows split
  into 4 files (``ShardedWindows``, the Beam cache's layout).
* uncached: the live seqio/tf.data path, read -> tokenize -> + EOS -> window,
  batched like the trainer; and its parts on their own, to see what limits it:
  reading the files, and the tokenizer alone (``encode_batch``, Rust, all cores).

Peer: 0.6 x 989e12 FLOP/s / (6 x 1.3e9 FLOP/token) x 8 GPUs ~= 609k tokens/s.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from phijax.data import corpus as corpus_lib
from phijax.data import pipeline
from phijax.data import vocab as vocab_lib
from phijax.util import cli

H100_BF16_PEAK = 989e12
PHI1_PARAMS = 1.3e9
HOST_GPUS = 8
MFU = 0.6


def host_tokens_per_second() -> float:
    return MFU * H100_BF16_PEAK / (6 * PHI1_PARAMS) * HOST_GPUS


def _rate(fn, seconds: float, min_iters: int = 3) -> tuple[float, int]:
    """(iterations/s, iterations) of fn() for about ``seconds``."""
    fn()  # warm (page cache, permutation, tf graph)
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0), n


def bench_cached(cache_path, batch: int, seconds: float, seed: int = 0) -> dict:
    windows, meta = pipeline.load_windows(cache_path)
    out = {}
    layouts = {"one file": windows}
    k = windows.shape[0]
    cuts = [0, k // 4, k // 2, 3 * k // 4, k]
    layouts["4 files"] = pipeline.ShardedWindows([windows[a:b] for a, b in zip(cuts, cuts[1:])])
    rng = np.random.default_rng(seed)
    for name, w in layouts.items():
        wb = pipeline.WindowBatches(w, batch, seed=seed)
        steps = iter(rng.integers(0, 10**6, 10**6))
        per_s, n = _rate(lambda: wb.local_batch(int(next(steps))), seconds / 2)
        out[name] = {"tokens_per_s": per_s * batch * wb.seq_len, "batches": n}
    out["n_windows"] = int(meta["n_windows"])
    return out


def bench_uncached(task_name: str, seq_len: int, batch: int, seconds: float) -> dict:
    import seqio

    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset({"targets": seq_len + 1}, split="train", shuffle=False, num_epochs=None)
    it = ds.batch(batch).as_numpy_iterator()
    per_s, n = _rate(lambda: next(it), seconds)
    return {"tokens_per_s": per_s * batch * seq_len, "batches": n}


def bench_parts(tok: vocab_lib.BPETokenizer, seconds: float) -> dict:
    docs = [t for _, t in corpus_lib.iter_stdlib_documents()]
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    t0 = time.perf_counter()
    for _ in corpus_lib.iter_stdlib_documents():
        pass
    read_s = time.perf_counter() - t0
    # Tokenizer alone on a ~2 MB slice (Rust encode_batch uses every core).
    sample, size = [], 0
    for t in docs:
        sample.append(t)
        size += len(t.encode("utf-8"))
        if size > 2_000_000:
            break
    n_tok = sum(len(x) for x in tok.encode_batch(sample))
    per_s, _ = _rate(lambda: tok.encode_batch(sample), seconds, min_iters=2)
    one_per_s, _ = _rate(lambda: [tok.encode(t) for t in sample[:200]], seconds / 2, min_iters=1)
    n_tok_200 = sum(len(tok.encode(t)) for t in sample[:200])
    return {"corpus_bytes": n_bytes, "read_bytes_per_s": n_bytes / read_s,
            "bytes_per_token": size / n_tok,
            "tokenizer_batch_tokens_per_s": per_s * n_tok,
            "tokenizer_one_by_one_tokens_per_s": one_per_s * n_tok_200}


def main(argv=None) -> dict:
    ap = cli.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="per-host batch (sequences) per call")
    ap.add_argument("--seconds", type=float, default=20.0, help="time per measurement")
    ap.add_argument("--vocab_size", type=int, default=vocab_lib.DEFAULT_VOCAB_SIZE)
    ap.add_argument("--cache_dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cli.setup_logging()

    from phijax.data import seqio_tasks as tasks

    task_name = tasks.ensure_stdlib_task(args.vocab_size)
    t0 = time.perf_counter()
    path = pipeline.build_window_cache(task_name, args.seq_len, args.cache_dir)
    prep_s = time.perf_counter() - t0
    tok = vocab_lib.BPETokenizer(vocab_lib.stdlib_tokenizer_path(args.vocab_size, args.cache_dir))
    peer = host_tokens_per_second()
    res = {"machine": f"{os.cpu_count()} CPU cores", "seq_len": args.seq_len, "batch": args.batch,
           "cache": str(path), "cache_ready_s": round(prep_s, 2), "peer_tokens_per_s": peer,
           "cached": bench_cached(path, args.batch, args.seconds),
           "uncached": bench_uncached(task_name, args.seq_len, args.batch, args.seconds),
           "parts": bench_parts(tok, args.seconds / 2)}

    print(f"input pipeline, {res['machine']}, batches of {args.batch} x {args.seq_len} tokens "
          f"(stdlib task, BPE {tok.vocab_size}; cache of {res['cached']['n_windows']} windows ready in {prep_s:.1f} s)")
    print(f"  peer: one 8xH100 host training phi-1 1.3B at 60% MFU consumes {peer / 1e3:,.0f}k tokens/s")
    for name in ("one file", "4 files"):
        r = res["cached"][name]
        print(f"  cached ({name:8s}) {r['tokens_per_s'] / 1e6:9.2f}M tokens/s  = {r['tokens_per_s'] / peer:7.1f}x the host")
    u = res["uncached"]
    print(f"  uncached (seqio)   {u['tokens_per_s'] / 1e6:9.3f}M tokens/s  = {u['tokens_per_s'] / peer:7.2f}x the host")
    p = res["parts"]
    print(f"    reading files:        {p['read_bytes_per_s'] / 1e6:8.1f} MB/s  (~{p['read_bytes_per_s'] / p['bytes_per_token'] / 1e6:.1f}M tokens/s at {p['bytes_per_token']:.2f} bytes/token)")
    print(f"    tokenizer (batch):    {p['tokenizer_batch_tokens_per_s'] / 1e6:8.3f}M tokens/s")
    print(f"    tokenizer (1 by 1):   {p['tokenizer_one_by_one_tokens_per_s'] / 1e6:8.3f}M tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
