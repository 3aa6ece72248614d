"""What the uniform batch costs: the train step on every data source's five features against the
same step on plain windows (inputs, targets, loss weights only), same run, same tokens.

    python -m phijax.bench.batch_features [--config tiny] [--batch 8] [--seq 256] [--rounds 6]
        [--steps 3] [--attention auto] [--json out.json]

Every source yields positions and segment ids (phijax.data.pipeline.FEATURES), so the model masks
attention by segment even where a row is one segment: on the CPU's xla attention a compare per
tile, on cuDNN an additive bias beside its causal mask, on splash a segment-id operand. Both
steps come from phijax.train_setup's state and shardings and start from the same parameters;
they run in alternating rounds (each warmed up first) and the script prints each one's median
step time, their ratio (> 1: the five features cost that much) and both losses (equal: a
one-segment mask changes nothing).
"""
from __future__ import annotations

import statistics
import time

import jax

from phijax import config as config_lib, train_setup, train_step
from phijax.bench import save_json, step_timing
from phijax.util import cli

PLAIN = ("inputs", "targets", "loss_weights")


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="a preset of phijax.config.PRESETS")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--attention", default=None, help="attention backend (default: the preset's)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cli.setup_logging()
    try:
        cfg = config_lib.preset(args.config)
    except ValueError as e:
        return cli.fail(e)
    if args.attention:
        cfg = cfg.replace(attention=args.attention)
    run = train_setup.RunConfig(model_config=cfg, batch_size=args.batch, seq_len=args.seq, mesh_shape=(1, 1, 1))
    s = train_setup.setup(run, devices=jax.devices()[:1])
    plain_shardings = train_step.batch_shardings(PLAIN, s.mesh, s.rules)
    plain_step = train_step.make_train_step(s.graphdef, s.cfg, s.tx, s.schedule, mesh=s.mesh, rules=s.rules,
                                            microbatches=1, shardings=s.state_shardings,
                                            batch_sharding=plain_shardings)
    b = step_timing.synthetic_batch(cfg.vocab_size, args.batch, args.seq)
    sides = {"five features": (s.step, s.to_global(b)),
             "plain windows": (plain_step, train_step.to_global({k: b[k] for k in PLAIN}, plain_shardings))}
    states = {name: s.init_state() for name in sides}
    first_loss, times = {}, {name: [] for name in sides}
    for name, (step, batch) in sides.items():
        states[name], m = step(states[name], batch)  # compile + the initial parameters' loss
        first_loss[name] = float(m["loss"])
    for _ in range(args.rounds):
        for name, (step, batch) in sides.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                states[name], m = step(states[name], batch)
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["five features"] / med["plain windows"]
    for name in sides:
        print(f"{name:14s} median {1e3 * med[name]:8.1f} ms/step (min {1e3 * min(times[name]):.1f}, "
              f"max {1e3 * max(times[name]):.1f}), first loss {first_loss[name]:.6f}")
    print(f"{args.config} batch {args.batch} x {args.seq}, attention {cfg.attention}, "
          f"{jax.devices()[0].device_kind}: five features / plain = {ratio:.3f}")
    save_json(args.json, {"config": args.config, "batch": args.batch, "seq": args.seq, "attention": cfg.attention,
                          "device": jax.devices()[0].device_kind, "median_s": med, "times_s": times,
                          "first_loss": first_loss, "ratio": ratio})
    return cli.EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
