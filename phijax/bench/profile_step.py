"""Where a train step's time goes: a jax.profiler trace of the synthetic step, summed per op.

    python -m phijax.bench.profile_step --config phi1 --batch 16 --remat save_dots_attn --steps 3
    python -m phijax.bench.profile_step --config tiny --batch 8 --seq 512 --dtype float32 \
        --remat none --attention cpu --scan_unroll 4 --loss_chunk 32 --loss_kernel cpu --compiler_options cpu
        # ^ the CPU settings (bench.train_throughput.cpu_settings)

Runs `steps` compiled steps under `jax.profiler.trace(create_perfetto_trace=True)` and reads the
perfetto trace back: per device (GPU streams, or the XLA:CPU thunk executor threads) the total
time of every op name, grouped into kinds (matmul, attention kernel, fusion, copy/transpose,
reduction, collective, other) and listed top-N with their share of the busy time per step. No
tensorflow or tensorboard needed. `--keep_trace DIR` keeps the trace for ui.perfetto.dev.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

from phijax import config as config_lib, train_setup
from phijax.bench import save_json, step_timing
from phijax.util import cli

KINDS = (  # first match wins; names as XLA:GPU (cuBLAS/cuDNN/Triton) and XLA:CPU report them
    ("attention kernel", re.compile(r"cudnn|flash|fmha|dot_product_attention|splash|pallas", re.I)),
    ("cpu kernel (FFI)", re.compile(r"ffi_call", re.I)),  # phijax/kernels/cpu: attention, the loss's xent
    # XLA:GPU names its cuBLAS calls custom-call.N (the cuDNN ones are matched above)
    ("matmul", re.compile(r"gemm|cublas|dot|matmul|sm90_xmma|cutlass|ynn|xnn|onednn|custom-call", re.I)),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|nccl|collective", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset|dynamic-update-slice|dynamic-slice", re.I)),
    ("reduction", re.compile(r"reduce", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if pat.search(name):
            return kind
    return "other"


def load_trace(trace_dir: str) -> dict:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        return json.load(f)


def summarize(trace: dict, steps: int) -> dict:
    """{device: {"busy_ms": per step, "ops": [(name, kind, ms per step, calls per step)], "kinds": {}}}."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pname = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    per = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        dev = pname.get(e["pid"], str(e["pid"]))
        # Device ops: GPU streams ("/device:GPU:0"); on CPU, the XLA ops run on host threads
        # whose events carry an hlo_op / hlo_module argument.
        args = e.get("args") or {}
        if "device:" not in dev.lower() and "hlo_op" not in args and "hlo_module" not in args:
            continue
        name = args.get("hlo_op") or e["name"]
        acc = per[dev][name]
        acc[0] += e["dur"] / 1e3
        acc[1] += 1
    out = {}
    for dev, ops in per.items():
        rows = sorted(((n, kind_of(n), ms / steps, c / steps) for n, (ms, c) in ops.items()), key=lambda r: -r[2])
        kinds = collections.Counter()
        for _, k, ms, _ in rows:
            kinds[k] += ms
        out[dev] = {"busy_ms": sum(r[2] for r in rows), "ops": rows, "kinds": dict(kinds)}
    return out


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="phi1")
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="save_dots_attn")
    p.add_argument("--attention", default="auto")
    p.add_argument("--scan_unroll", type=int, default=1)
    p.add_argument("--loss_chunk", type=int, default=0)
    p.add_argument("--loss_kernel", default="xla", help="'cpu': the fused loss's XLA:CPU kernel")
    p.add_argument("--compiler_options", default=None,
                   help="the step's XLA options as JSON, or 'cpu': train_setup.CPU_ONEDNN_DOTS (the CPU settings)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--keep_trace", default=None, help="directory to keep the trace in")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cli.setup_logging()
    cfg = config_lib.preset(args.config, dtype=args.dtype, remat_policy=args.remat, attention=args.attention,
                            scan_unroll=args.scan_unroll, loss_chunk=args.loss_chunk, loss_kernel=args.loss_kernel)
    options = (train_setup.CPU_ONEDNN_DOTS if args.compiler_options == "cpu"
               else json.loads(args.compiler_options) if args.compiler_options else None)
    step, state, batch = step_timing.synthetic_train_step(cfg, args.batch, args.seq, mesh_shape=(1, -1, 1),
                                                          compiler_options=options)
    for _ in range(2):  # compile + warm up, untraced
        state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args.steps
    trace_dir = args.keep_trace or tempfile.mkdtemp(prefix="phijax_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
    summary = summarize(load_trace(trace_dir), args.steps)
    print(f"{args.config} batch {args.batch} x {args.seq} {args.dtype} remat={args.remat} unroll={args.scan_unroll} "
          f"compiler_options={options}: "
          f"untraced step {dt * 1e3:.1f} ms; {jax.devices()[0].device_kind}")
    for dev, s in summary.items():
        print(f"\n{dev}: busy {s['busy_ms']:.1f} ms per step")
        for k, ms in sorted(s["kinds"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:18s} {ms:9.2f} ms  {100 * ms / s['busy_ms']:5.1f}%")
        print(f"  top {args.top} ops (ms per step, calls per step, kind):")
        for name, kind, ms, calls in s["ops"][:args.top]:
            print(f"    {ms:9.2f} ms {100 * ms / s['busy_ms']:5.1f}% x{calls:<5g} {kind:16s} {name[:90]}")
    save_json(args.json, {d: {**s, "ops": s["ops"][:200]} for d, s in summary.items()}, indent=1)
    return summary


if __name__ == "__main__":
    main()
