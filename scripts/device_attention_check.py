"""GPU check of the cuDNN attention backend with causal + segment (packed-example) masking.

    python scripts/device_attention_check.py [--json $OUT/attention_check.json]

Needs jax (with CUDA), flax and numpy only (no tensorflow, seqio, gin or optax). Runs in well
under a minute on one H100/H200:
  1. kernel: phi-1 attention shapes (bf16, seq 2048, 32 heads x 64; and GQA 32:8) on packed
     rows: cuDNN vs the XLA reference, output and gradients, each also against an fp32
     reference so the bf16 error of both is visible; and fwd+bwd time of each.
  2. training: a small phi (bf16 compute) trained a few SGD steps on packed rows with
     attention='cudnn' and with 'xla' from the same init: the per-step losses must agree.
Exits 1 if a check fails (tolerances printed), 2 if there is no GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, not installed

import jax
import jax.numpy as jnp
import numpy as np

from phijax import attention, config, model

KERNEL_TOL = 2e-2  # bf16: cuDNN's error vs fp32 may exceed the reference's by at most this much
LOSS_RTOL = 1e-2


def packed_segments(rng, batch, length, max_examples=6):
    """Rows of 1..max_examples packed examples with random lengths (segment ids 1, 2, ...)."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), rng.integers(0, max_examples), replace=False))
        rows.append(np.searchsorted(cuts, np.arange(length), side="right") + 1)
    return jnp.asarray(np.stack(rows), jnp.int32)


def positions_of(seg):
    start = jnp.argmax(seg[:, :, None] == seg[:, None, :], axis=-1)
    return (jnp.arange(seg.shape[1])[None] - start).astype(jnp.int32)


def timed(fn, *args, reps=10):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def kernel_check(rng, b, t, h, kv, d):
    seg = packed_segments(rng, b, t)
    q32, k32, v32 = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t, h, d), (b, t, kv, d),
                                                                                  (b, t, kv, d)))
    ct = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)  # a fixed random cotangent

    def fwd_bwd(fn):
        def run(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids=seg), q, k, v)
            return (out, *vjp(ct.astype(out.dtype)))
        return jax.jit(run)

    bf = [x.astype(jnp.bfloat16) for x in (q32, k32, v32)]
    want = fwd_bwd(attention.xla_attention)(q32, k32, v32)  # fp32 reference
    results = {}
    for name, fn in (("cudnn", attention.cudnn_attention), ("xla", attention.xla_attention)):
        f = fwd_bwd(fn)
        got = f(*bf)
        errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) for g, w in zip(got, want)]
        results[name] = {"max_err_vs_fp32": dict(zip(("out", "dq", "dk", "dv"), errs)),
                         "fwd_bwd_ms": 1e3 * timed(f, *bf)}
    got_c, got_x = fwd_bwd(attention.cudnn_attention)(*bf), fwd_bwd(attention.xla_attention)(*bf)
    results["max_diff_cudnn_vs_xla"] = dict(zip(("out", "dq", "dk", "dv"), (
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32)))) for a, c in zip(got_c, got_x))))
    no_segments = fwd_bwd(lambda q, k, v, segment_ids: attention.cudnn_attention(q, k, v))
    results["cudnn_no_segments_fwd_bwd_ms"] = 1e3 * timed(no_segments, *bf)
    ok = all(results["cudnn"]["max_err_vs_fp32"][k] <= results["xla"]["max_err_vs_fp32"][k] + KERNEL_TOL
             for k in ("out", "dq", "dk", "dv"))
    return ok, results


def train_check(rng, steps=5, batch=8, seq=512, lr=0.5):
    base = config.preset("tiny", dtype="bfloat16")
    seg = packed_segments(rng, batch, seq + 1)
    tokens = jnp.asarray(rng.integers(0, base.vocab_size, (batch, seq + 1)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    seg_in = seg[:, :-1]
    weights = (seg[:, 1:] == seg[:, :-1]).astype(jnp.float32)  # no loss across example boundaries
    pos = positions_of(seg_in)

    def run(name):
        cfg = base.replace(attention=name)
        graphdef, params, _ = model.split(model.init(cfg, seed=0))

        def loss_fn(p):
            logits = model.apply(graphdef, p, inputs, positions=pos, segment_ids=seg_in)
            nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
            return jnp.sum(nll * weights) / jnp.sum(weights)

        @jax.jit
        def step(p):
            loss, g = jax.value_and_grad(loss_fn)(p)
            return jax.tree.map(lambda x, gx: x - lr * gx, p, g), loss

        losses = []
        for _ in range(steps):
            params, loss = step(params)
            losses.append(float(loss))
        return losses

    cud, xla = run("cudnn"), run("xla")
    rel = [abs(a - b) / abs(b) for a, b in zip(cud, xla)]
    return max(rel) <= LOSS_RTOL and cud[-1] < cud[0], {"losses_cudnn": cud, "losses_xla": xla, "max_rel_diff": max(rel)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"no GPU: jax backend is {jax.default_backend()}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}")
    rng = np.random.default_rng(0)
    report = {"device": dev.device_kind, "jax": jax.__version__,
              "auto_backend": attention.auto_choice((4, 2048, 32, 64), (4, 2048, 32, 64), jnp.bfloat16, dropout=False)}
    ok = report["auto_backend"] == "cudnn"
    print(f"attention='auto' picks: {report['auto_backend']}")
    for label, shape in (("mha", (4, 2048, 32, 32, 64)), ("gqa", (4, 2048, 32, 8, 64))):
        good, r = kernel_check(rng, *shape)
        report[f"kernel_{label}"] = r
        ok &= good
        e_c, e_x = r["cudnn"]["max_err_vs_fp32"], r["xla"]["max_err_vs_fp32"]
        print(f"{label} b,t,h,kv,d={shape} bf16 causal+segments: {'ok' if good else 'FAIL'}\n"
              f"  max |err| vs fp32 (out dq dk dv): cudnn {[round(e_c[k], 4) for k in e_c]}, "
              f"xla {[round(e_x[k], 4) for k in e_x]} (allowed: xla + {KERNEL_TOL})\n"
              f"  max |cudnn - xla|: {[round(v, 4) for v in r['max_diff_cudnn_vs_xla'].values()]}\n"
              f"  fwd+bwd: cudnn {r['cudnn']['fwd_bwd_ms']:.2f} ms, xla {r['xla']['fwd_bwd_ms']:.2f} ms, "
              f"cudnn without segments {r['cudnn_no_segments_fwd_bwd_ms']:.2f} ms")
    good, r = train_check(rng)
    report["train"] = r
    ok &= good
    print(f"train (tiny phi, bf16, packed rows, SGD): {'ok' if good else 'FAIL'} max rel loss diff "
          f"{r['max_rel_diff']:.2e} (allowed {LOSS_RTOL})\n  cudnn {[round(x, 4) for x in r['losses_cudnn']]}\n"
          f"  xla   {[round(x, 4) for x in r['losses_xla']]}")
    report["ok"], report["seconds"] = bool(ok), time.perf_counter() - t0
    print(f"{'PASS' if ok else 'FAIL'} in {report['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
