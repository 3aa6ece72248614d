"""Accelerator MFU sweep for the phi-1 train step on synthetic tokens (no tensorflow, no gin).

    python -m phijax.bench.mfu --configs phi1_small,phi1 --batches 4,8 --remat none,save_dots_no_batch
    XLA_PYTHON_CLIENT_PREALLOCATE=false python -m phijax.bench.mfu --configs phi1 --batches 8,16 \\
        --remat save_dots_attn --peer torch --peer_modes eager,compile

Prints per (config, per-device batch, remat policy): step time, tokens/s, MFU against the
device's published bf16 peak (phijax.metrics.PEAK_FLOPS) and peak device memory. On a CPU the
peak is a fp32 matmul measured in this process (metrics.device_peak_flops; with simulated host
devices, its share per device); a device of unknown peak gets MFU n/a.

`--peer torch` adds the PyTorch peer (phijax.bench.torch_peer: transformers' PhiForCausalLM, SDPA
attention, fp32 parameters, autocast to --dtype, fused AdamW on CUDA; modes `eager` and `compile`)
on the same configs, sequence and tokens, on one device at each --peer_batches batch, starting
from phijax's initial weights: its first loss is printed next to phijax's at the same batch (they
agree when one device runs phijax). The run ends with a summary per config: phijax's best tokens/s
and settings, the peer's best per mode, and the ratios phijax/peer of tokens/s per device. Both
sides count the same FLOPs per token (PhiConfig.flops_per_token) against the same peak, so that
ratio is also the ratio of their MFUs.

Device memory. Both frameworks share the accelerator, so every phijax row runs first; then every
jax array is deleted and jax's compiled executables and backends are cleared before torch
allocates. Run with XLA_PYTHON_CLIENT_PREALLOCATE=false (scripts/device_mfu.sh exports it when
--peer is given): by default jax takes 75% of the device at start-up. Without preallocation jax's
allocator grows on demand but keeps what it grew to until its client is destroyed, hence the
backend clearing; the free device memory torch finds is printed before the peer rows. The peer's
peak memory is torch.cuda.max_memory_allocated, reset per row; phijax's is jax's
peak_bytes_in_use, cumulative over the sweep.
"""
from __future__ import annotations

import gc
import math
import os

import jax

from phijax import config as config_lib, convert, metrics
from phijax.bench import save_json, step_timing
from phijax.util import cli


def peak_flops_per_device(device):
    """The device's peak FLOP/s (measured on a CPU), or None for an accelerator of unknown peak."""
    try:
        return metrics.device_peak_flops(device)
    except ValueError:
        return None


def _mfu(tokens_per_s, flops_per_token, peak):
    return tokens_per_s * flops_per_token / peak if peak else None


def _fmt_mfu(mfu):
    return f"{100 * mfu:5.1f}%" if mfu is not None and math.isfinite(mfu) else "  n/a"


def run_one(cfg, batch_per_device, seq, steps, devices, peak, warmup=2, weights_out=None):
    """One phijax row. `weights_out`, if a dict, receives the initial parameters as a transformers
    state dict (host numpy), taken before the first step donates them: the peer starts from them."""
    n = len(devices)
    step, state, batch = step_timing.synthetic_train_step(cfg, batch_per_device * n, seq, mesh_shape=(1, n, 1),
                                                     devices=devices)
    if weights_out is not None:
        weights_out.update(convert.params_to_hf_state(cfg, state["params"]))
    dt, m, compile_s, m0, losses = step_timing.time_steps(step, state, batch, steps, warmup)
    tps = batch_per_device * n * seq / dt
    fpt = cfg.flops_per_token(seq)
    stats = devices[0].memory_stats() or {}
    return {"step_s": dt, "tokens_per_s": tps, "mfu": _mfu(tps, fpt, peak * n if peak else None),
            "peak_mem_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "compile_s": compile_s,
            "loss": float(m["loss"]), "first_loss": float(m0["loss"]), "flops_per_token": fpt, "losses": losses}


def phijax_sweep(args, weights):
    """The phijax rows; fills `weights` {config: initial HF state} when the peer will run.
    Returns (rows, peak FLOP/s per device). Holds no jax device or array once it returns."""
    devices = jax.devices()[:args.devices or None]
    n, kind = len(devices), devices[0].device_kind
    peak = peak_flops_per_device(devices[0])
    peak_s = f"{peak / 1e12:.3g} TFLOP/s per device" if peak else "unknown peak (MFU n/a)"
    print(f"device: {n} x {kind} ({jax.default_backend()}), jax {jax.__version__}, {peak_s}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rows = []
    for name in args.configs.split(","):
        for policy in args.remat.split(","):
            for unroll, chunk, bpd in ((int(u), int(c), int(b)) for u in args.scan_unroll.split(",")
                                       for c in args.loss_chunk.split(",") for b in args.batches.split(",")):
                cfg = config_lib.preset(name, dtype=args.dtype, remat_policy=policy, attention=args.attention,
                                        scan_unroll=unroll, loss_chunk=chunk)
                label = (f"{name:10s} remat={policy:18s}" + (f" unroll={unroll:2d}" if unroll != 1 else "")
                         + (f" loss_chunk={chunk}" if chunk else ""))
                keep = {} if args.peer != "none" and name not in weights else None
                try:
                    r = run_one(cfg, bpd, args.seq, args.steps, devices, peak, weights_out=keep)
                except Exception as e:  # noqa: BLE001 - report OOM etc. and go on with the sweep
                    print(f"{label} batch/dev={bpd:3d}: failed: {str(e).splitlines()[0][:160]}")
                    continue
                if keep:
                    weights[name] = keep
                r.update(framework="phijax", config=name, remat=policy, batch_per_device=bpd, seq=args.seq,
                         device=kind, devices=n, dtype=args.dtype, scan_unroll=unroll, loss_chunk=chunk,
                         xla_flags=os.environ.get("XLA_FLAGS", ""))
                rows.append(r)
                write_json(args.json, rows)
                print(f"{label} batch/dev={bpd:3d}: step {r['step_s'] * 1e3:7.1f} ms | "
                      f"{r['tokens_per_s']:9,.0f} tok/s | MFU {_fmt_mfu(r['mfu'])} | "
                      f"peak mem {r['peak_mem_gib']:6.1f} GiB | compile {r['compile_s']:5.1f} s", flush=True)
    return rows, peak


def write_json(path, rows, summary=None):
    """The figures so far (rewritten after every row: a sweep stopped at a time limit keeps them)."""
    save_json(path, {"rows": rows, "summary": summary or {}})


def release_jax():
    """Hand the accelerator's memory back before torch allocates (see the module docstring)."""
    for a in jax.live_arrays():
        a.delete()
    jax.clear_caches()
    gc.collect()
    from jax.extend import backend  # clear_backends lived in jax itself before 0.4.26
    getattr(backend, "clear_backends", getattr(jax, "clear_backends", lambda: None))()
    gc.collect()


def peer_sweep(args, weights, peak, phijax_rows):
    """The torch peer's rows: every config x mode x batch, one device. An OOM or other failure
    prints 'failed: ...' for its row; the sweep goes on."""
    from phijax.bench import torch_peer  # imports torch: only when the peer runs

    device = torch_peer.default_device()
    if device == "cuda":
        release_jax()  # on a CPU there is no shared device memory, and jax may still be in use
    free = torch_peer.free_device_gib(device)
    print(f"peer: {torch_peer.versions()} on {torch_peer.device_name(device)}"
          + (f", {free[0]:.1f} of {free[1]:.1f} GiB free" if free else ""), flush=True)
    batches = peer_batches(args.peer_batches or args.batches, args.peer_modes.split(","))
    rows = []
    for name in args.configs.split(","):
        cfg = config_lib.preset(name, dtype=args.dtype)
        fpt = cfg.flops_per_token(args.seq)
        for mode in args.peer_modes.split(","):
            for b in batches[mode]:
                label = f"{name:10s} torch={mode:18s} batch/dev={b:3d}"
                r = err = None
                try:
                    r = torch_peer.run(cfg, b, args.seq, args.steps, device=device, mode=mode,
                                       hf_state=weights.get(name))
                except Exception as e:  # noqa: BLE001 - report OOM etc. and go on with the sweep
                    err = "out of memory" if torch_peer.is_oom(e) else (str(e).splitlines() or [repr(e)])[0][:160]
                torch_peer.free_memory()  # after the except clause: the traceback no longer pins the run's tensors
                if r is None:
                    print(f"{label}: failed: {err}", flush=True)
                    continue
                tps = b * args.seq / r["step_s"]
                r.update(framework="torch", mode=mode, config=name, batch_per_device=b, seq=args.seq,
                         device=torch_peer.device_name(device), devices=1, dtype=args.dtype, tokens_per_s=tps,
                         mfu=_mfu(tps, fpt, peak), flops_per_token=fpt)
                rows.append(r)
                write_json(args.json, phijax_rows + rows)
                ref = next((p for p in phijax_rows if p["config"] == name and p["batch_per_device"] == b
                            and p["devices"] == 1), None)
                mem = f"{r['peak_mem_gib']:6.1f} GiB" if r["peak_mem_gib"] is not None else "   n/a"
                print(f"{label}: step {r['step_s'] * 1e3:7.1f} ms | {tps:9,.0f} tok/s | MFU {_fmt_mfu(r['mfu'])} | "
                      f"peak mem {mem} | compile {r['compile_s']:5.1f} s | first loss {r['first_loss']:.5f}"
                      + (f" (phijax {ref['first_loss']:.5f})" if ref else ""), flush=True)
    return rows


def peer_batches(spec: str, modes) -> dict:
    """'8,16' (every mode) or 'eager=8,16;compile=16' (per mode) -> {mode: [batch, ...]}."""
    if "=" not in spec:
        return {m: [int(b) for b in spec.split(",")] for m in modes}
    per = {k.strip(): [int(b) for b in v.split(",")] for k, v in (part.split("=") for part in spec.split(";"))}
    missing = set(modes) - set(per)
    if missing:
        raise ValueError(f"--peer_batches {spec!r} names no batch for mode(s) {sorted(missing)}")
    return {m: per[m] for m in modes}


def summarize(rows) -> dict:
    """Per config: phijax's best row, the peer's best per mode, and phijax/peer per-device tokens/s."""
    def best(rs):
        return max(rs, key=lambda r: r["tokens_per_s"], default=None)

    def pick(r, *keys):
        return {k: r[k] for k in ("tokens_per_s", "mfu", "step_s", "batch_per_device") + keys}

    out = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        j = best([r for r in mine if r["framework"] == "phijax"])
        s = {"phijax": pick(j, "remat", "scan_unroll", "loss_chunk", "devices") if j else None}
        for mode in dict.fromkeys(r["mode"] for r in mine if r["framework"] == "torch"):
            p = best([r for r in mine if r["framework"] == "torch" and r["mode"] == mode])
            s[f"torch_{mode}"] = pick(p, "compile_s")
            if j:
                s[f"ratio_torch_{mode}"] = j["tokens_per_s"] / j["devices"] / p["tokens_per_s"]
        out[name] = s
    return out


def print_summary(summary):
    for name, s in summary.items():
        j = s["phijax"]
        parts = [f"phijax {j['tokens_per_s']:,.0f} tok/s (MFU {_fmt_mfu(j['mfu']).strip()}, remat {j['remat']}, "
                 f"batch/dev {j['batch_per_device']}, unroll {j['scan_unroll']}, loss chunk {j['loss_chunk']})" if j else "phijax: no row"]
        for k, p in s.items():
            if k.startswith("torch_"):
                ratio = s.get(f"ratio_{k}")
                parts.append(f"{k.replace('_', ' ')} {p['tokens_per_s']:,.0f} tok/s (MFU {_fmt_mfu(p['mfu']).strip()}, "
                             f"batch {p['batch_per_device']})" + (f" -> phijax/peer {ratio:.2f}x" if ratio else ""))
        print(f"summary {name}: " + " | ".join(parts), flush=True)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="phi1_small,phi1")
    p.add_argument("--batches", default="4,8", help="per-device batch sizes")
    p.add_argument("--remat", default="none,save_dots_no_batch")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention", default="auto")
    p.add_argument("--scan_unroll", default="1", help="layers per scan iteration, comma-separated values")
    p.add_argument("--loss_chunk", default="0", help="fused LM-head loss chunks (0: unfused), comma-separated")
    p.add_argument("--devices", type=int, default=0, help="phijax uses the first N devices (default: all)")
    p.add_argument("--peer", default="none", choices=("none", "torch"), help="also time this framework's step")
    p.add_argument("--peer_batches", default=None,
                   help="the peer's batch sizes: '8,16', or per mode 'eager=8;compile=16' (default: --batches)")
    p.add_argument("--peer_only", action="store_true",
                   help="time only the peer (phijax measured in another process; no ratio printed here)")
    p.add_argument("--peer_modes", default="eager,compile", help="torch: eager and/or compile")
    p.add_argument("--json", default=None, help='write {"rows": [...], "summary": {...}} here')
    args = p.parse_args(argv)
    cli.setup_logging()
    if args.peer == "torch":  # before the phijax sweep: a missing torch or a bad mode fails now
        from phijax.bench import torch_peer
        bad = set(args.peer_modes.split(",")) - set(torch_peer.MODES)
        if bad:
            p.error(f"--peer_modes {sorted(bad)} unknown; known: {torch_peer.MODES}")
        try:
            peer_batches(args.peer_batches or args.batches, args.peer_modes.split(","))
        except ValueError as e:
            p.error(str(e))
    elif args.peer_only:
        p.error("--peer_only needs --peer torch")
    weights = {}
    if args.peer_only:
        rows, peak = [], peak_flops_per_device(jax.devices()[0])
    else:
        rows, peak = phijax_sweep(args, weights)
    if args.peer == "torch":
        rows += peer_sweep(args, weights, peak, rows)
    summary = summarize(rows)
    if args.peer != "none":
        print_summary(summary)
    result = {"rows": rows, "summary": summary}
    write_json(args.json, rows, summary)
    return result


if __name__ == "__main__":
    main()
