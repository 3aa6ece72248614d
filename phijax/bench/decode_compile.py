"""Compile time of the decoding programs of one bucket: the prefill and the decode loop.

    python -m phijax.bench.decode_compile --config phi1 --dtype bfloat16 \\
        [--batch 16] [--prompt_bucket 512] [--new_bucket 256] [--sampling] [--json out.json]
    python -m phijax.bench.decode_compile --config phi1 --dtype bfloat16 --serve [--layers unrolled]

--serve: phijax.serve's engine instead (`batch` slots, a cache of prompt_bucket + new_bucket
columns, prefill chunks up to prompt_bucket): every program it compiles at start-up, each timed.

The Sampler is built on abstract parameters (ShapeDtypeStructs from `model.abstract`), so nothing
1.3B-sized is allocated and phi-1 compiles on a small CPU too; `Sampler.lower` lowers both programs
on abstract inputs and each is compiled for the default backend (the GPU where there is one). The
figures are what a first `generate_tokens`/`complete` call of that bucket waits for before decoding.
No tensorflow, seqio or gin.
"""
from __future__ import annotations

import os
import time

import jax

from phijax import config as config_lib, decode, model as model_lib
from phijax.bench import save_json
from phijax.util import cli


def measure(cfg, batch: int, prompt_bucket: int, new_bucket: int, greedy: bool = True) -> dict:
    """Seconds to trace + lower both programs, and to compile each."""
    graphdef, params, _ = model_lib.abstract(cfg)
    sampler = decode.Sampler(decode.InferenceModel(graphdef, params, cfg), batch_size=batch, eos_id=None)
    t0 = time.perf_counter()
    prefill, loop = sampler.lower(prompt_bucket, new_bucket, greedy=greedy)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prefill.compile()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop.compile()
    decode_s = time.perf_counter() - t0
    return {"lower_s": lower_s, "prefill_compile_s": prefill_s, "decode_compile_s": decode_s,
            "total_s": lower_s + prefill_s + decode_s}


def measure_serve(cfg, slots: int, max_len: int, prefill_chunk: int, layers: str = "scan") -> dict:
    """Seconds to lower + compile each program phijax.serve's engine compiles at start-up."""
    from phijax.serve.engine import Engine
    graphdef, params, _ = model_lib.abstract(cfg)
    engine = Engine(decode.InferenceModel(graphdef, params, cfg), slots=slots, max_len=max_len,
                    prefill_chunk=prefill_chunk, layers=layers, eos_id=0)
    times = engine.compile()
    return {"programs": times, "total_s": sum(times.values()), "slowest_s": max(times.values())}


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="a preset: phi1, phi1_small, tiny, nano")
    p.add_argument("--dtype", default="bfloat16", help="compute and parameter dtype")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt_bucket", type=int, default=512)
    p.add_argument("--new_bucket", type=int, default=256)
    p.add_argument("--sampling", action="store_true", help="the sampling programs (default: greedy)")
    p.add_argument("--serve", action="store_true", help="phijax.serve's engine programs (slots = --batch)")
    p.add_argument("--layers", default="scan", help="with --serve: scan or unrolled")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    cli.setup_logging()
    overrides = dict(dtype=args.dtype, param_dtype=args.dtype)
    cfg = config_lib.preset(args.config, **overrides)
    slots = args.prompt_bucket + args.new_bucket
    if slots > cfg.max_len:  # the Sampler refuses such prompts; the programs would still compile
        print(f"note: {slots} cache slots exceed {args.config}'s max_len={cfg.max_len}")
    print(f"machine: {os.cpu_count()} cpus, jax {jax.__version__}, devices {jax.devices()}", flush=True)
    if args.serve:
        row = {"config": args.config, "dtype": args.dtype, "slots": args.batch, "max_len": slots,
               "layers": args.layers, "n_layers": cfg.n_layers, "backend": jax.default_backend(),
               **measure_serve(cfg, args.batch, slots, args.prompt_bucket, args.layers)}
        each = ", ".join(f"{k} {v:.1f}s" for k, v in row["programs"].items())
        print(f"{args.config} {args.dtype} phijax.serve engine, {args.batch} slots, max_len {slots}, layers "
              f"{args.layers}: {each} | slowest {row['slowest_s']:.1f}s, all {row['total_s']:.1f}s", flush=True)
        save_json(args.json, row)
        return row
    row = {"config": args.config, "dtype": args.dtype, "batch": args.batch, "prompt_bucket": args.prompt_bucket,
           "new_bucket": args.new_bucket, "greedy": not args.sampling,
           "n_layers": cfg.n_layers, "backend": jax.default_backend(),
           **measure(cfg, args.batch, args.prompt_bucket, args.new_bucket, greedy=not args.sampling)}
    print(f"{args.config} {args.dtype} batch {args.batch}, prompt bucket {args.prompt_bucket}, new bucket "
          f"{args.new_bucket}, {'greedy' if row['greedy'] else 'sampling'}, {cfg.n_layers} layers "
          f"(scanned): trace+lower {row['lower_s']:.1f}s | compile prefill {row['prefill_compile_s']:.1f}s, "
          f"decode loop {row['decode_compile_s']:.1f}s | total {row['total_s']:.1f}s", flush=True)
    save_json(args.json, row)
    return row


if __name__ == "__main__":
    main()
