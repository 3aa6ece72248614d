"""Ahead-of-time compile of the real train step for a TPU slice, on this (CPU) machine.

    python -m phijax.compile_check --gin_file=gin/experiments/phi1_pretrain.gin --topology=v5e-16 \\
        [--per_device_batch=8] [--microbatches=2] [--remat=full] [--attention=auto]

libtpu (the `tpu` extra) describes the slice (jax.experimental.topologies); the run is read from
gin by `phijax.train.configure` and built by the trainer's own `phijax.train_setup.setup` over the
slice's devices; its step is traced on the set-up's abstract state and shaped batch
(ShapeDtypeStructs sharded over the slice), lowered and compiled by the TPU compiler. Printed per
device:

  memory   compiled.memory_analysis(): arguments (state + batch), outputs (aliased with the
           donated state), temporaries (activations, gradients, workspaces), generated code,
           against the chip's HBM. A config that does not fit exits 1 and says by how much.
  compute  * model FLOPs: the PaLM count that MFU uses (PhiConfig.flops_per_token);
           * executed FLOPs: every matmul of the traced step (forward, remat recompute,
             backward), scan bodies times their trip count, Pallas kernels over their whole
             grid (so causal-masked tiles that splash skips are counted: an overestimate);
           * XLA's cost analysis as reported. It counts a while-loop body once, so with the
             layers in a scan it misses most of the model: shown for reference only.
           est. step time >= executed FLOPs / the chip's peak bf16 FLOP/s: a lower bound (no
           memory-bound op, collective or idle time), and the MFU ceiling = model / executed
           FLOPs is the MFU at that bound (what remat and masking waste costs at best).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time

# Let several compile checks (and pytest workers) load libtpu at once: it otherwise holds a
# lock file for the whole process, and a second process fails to describe any topology.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax

from phijax.util import cli, files, gin_config
from phijax import attention, metrics, sharding, train_setup
from phijax import train as train_lib
from phijax.train_setup import RunConfig

GiB = 2 ** 30

# HBM per chip (a v4/v5p "device" is one megacore chip).
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
# Generation -> (libtpu's name, chip_config_name, dimensions).
GENERATIONS = {"v4": ("v4", "megacore", 3), "v5p": ("v5", "megacore", 3), "v5e": ("v5e", "default", 2),
               "v6e": ("v6e", "default", 2)}
# Chip counts -> shape of the standard slices (Cloud TPU accelerator types).
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


# libtpu describing a slice on a machine that is not a TPU VM says, at length, that it found no TPU
# hosts: expected here, so these lines (and only these) are dropped from stderr while it does.
LIBTPU_NOISE = re.compile(
    cli.NATIVE_NOISE.pattern + r"|Failed to find host bounds for accelerator type"
    r"|WARNING: Logging before InitGoogle\(\) is written to STDERR"
    r"|E\d{4} [\d:.]+ +\d+ common_lib\.cc:\d+\] INVALID_ARGUMENT: Error: unexpected worker hostname"
    r"|=== Source Location Trace: ===|learning/[\w/]+/libtpu_init_utils\.cc:\d+")


class CompileCheckError(ValueError):
    """A configuration that cannot be compiled or does not fit; the message says why."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    generation: str  # v4, v5e, v5p, v6e
    dims: tuple[int, ...]  # chips per dimension

    @property
    def chips(self) -> int:
        return math.prod(self.dims)

    @property
    def hbm_bytes(self) -> int:
        return HBM_BYTES[self.generation]

    def devices(self):
        from jax.experimental import topologies
        libtpu_name, chip_config, ndim = GENERATIONS[self.generation]
        dims = self.dims + (1,) * (3 - len(self.dims))
        # Torus wrap-around links: full cubes of v4/v5p (>= 4x4x4), 16-chip rows of v5e/v6e.
        wrap = (min(dims) >= 4,) * 3 if ndim == 3 else (dims[0] == 16, dims[1] == 16, False)
        desc = topologies.get_topology_desc(
            f"{libtpu_name}:{'x'.join(map(str, self.dims))}", "tpu", chip_config_name=chip_config,
            chips_per_host_bounds=(min(dims[0], 2), min(dims[1], 2), 1), num_slices=1, wrap=wrap)
        return list(desc.devices)


def parse_topology(name: str) -> Topology:
    """'v5e-16' / 'v4-32' (Cloud TPU accelerator types: v4/v5p count TensorCores, 2 per chip) or
    'v5e:4x4' / 'v4:2x2x4' (chips per dimension)."""
    known = ", ".join(sorted(GENERATIONS))
    m = re.fullmatch(r"(v\d[a-z]?)[:](\d+(?:x\d+)*)", name)
    if m:
        gen, dims = m.group(1), tuple(int(x) for x in m.group(2).split("x"))
        if gen not in GENERATIONS:
            raise CompileCheckError(f"unknown TPU generation {gen!r} in {name!r}; known: {known}")
        if len(dims) != GENERATIONS[gen][2]:
            raise CompileCheckError(f"{gen} topologies have {GENERATIONS[gen][2]} dimensions, got {name!r}")
        return Topology(name, gen, dims)
    m = re.fullmatch(r"(v\d[a-z]?)-(\d+)", name)
    if not m:
        raise CompileCheckError(f"cannot read topology {name!r}: use e.g. v5e-16, v4-32 or v5e:4x4, v4:2x2x4")
    gen, count = m.group(1), int(m.group(2))
    if gen not in GENERATIONS:
        raise CompileCheckError(f"unknown TPU generation {gen!r} in {name!r}; known: {known}")
    ndim = GENERATIONS[gen][2]
    chips = count // 2 if ndim == 3 else count  # v4-32 = 32 TensorCores = 16 megacore chips
    table = SHAPES_3D if ndim == 3 else SHAPES_2D
    if chips not in table or (ndim == 3 and count % 2):
        raise CompileCheckError(f"no standard {gen} slice {name!r}; known sizes: "
                                + ", ".join(f"{gen}-{c * 2 if ndim == 3 else c}" for c in table))
    return Topology(name, gen, tuple(int(x) for x in table[chips].split("x")))


# --- FLOPs of the traced program --------------------------------------------------------------
def _sub_jaxprs(params):
    for v in params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(x, "eqns"):
                yield x
            elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr


def matmul_flops(jaxpr) -> float:
    """2 * M * N * K of every dot_general, nested jaxprs included: scan bodies x length,
    shard_map bodies x shards, Pallas kernels x grid size, the largest branch of a cond."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[i] for i in lhs_contract)
            continue
        subs = [matmul_flops(j) for j in _sub_jaxprs(eqn.params)]
        if not subs:
            continue
        if name == "cond":
            total += max(subs)
            continue
        inner = sum(subs)
        if name == "scan":
            inner *= eqn.params["length"]
        elif name == "shard_map":
            mesh = eqn.params["mesh"]
            inner *= math.prod(mesh.shape[a] for a in eqn.params.get("manual_axes", mesh.axis_names))
        elif name == "pallas_call":
            inner *= math.prod(eqn.params["grid_mapping"].grid)
        total += inner
    return total


# --- the check ----------------------------------------------------------------------------------
def check(topology: str, run: RunConfig) -> dict:
    """Compile the train step of `run` for `topology` and return the figures (raises
    CompileCheckError when the configuration is invalid or does not fit the chip's HBM)."""
    topo = parse_topology(topology)
    try:
        with cli.filtered_stderr(LIBTPU_NOISE):
            devices = topo.devices()
    except RuntimeError as e:  # libtpu missing
        raise CompileCheckError(f"cannot describe TPU topology {topology!r} ({e}); install the tpu extra: "
                                f"pip install -e '.[tpu]'") from None
    s = train_setup.setup(run, devices=devices, process_count=1)  # the trainer's own set-up
    cfg, mesh, n = s.cfg, s.mesh, len(devices)
    batch_size, seq_len, micro = run.batch_size, run.seq_len, run.batch_size // run.microbatches
    with sharding.use_mesh_rules(mesh, s.rules):
        attn = cfg.attention
        if attn == "auto":
            local_b = max(micro // (mesh.shape["data"] * mesh.shape["fsdp"]), 1)
            attn = "auto -> " + attention.auto_choice((local_b, seq_len, cfg.n_heads, cfg.head_dim),
                                                      (local_b, seq_len, cfg.kv_heads, cfg.head_dim),
                                                      cfg.dtype, dropout=cfg.attn_dropout > 0.0)
    t0 = time.perf_counter()
    traced = s.step.trace(s.abstract_state, s.shaped_batch)
    executed = matmul_flops(traced.jaxpr.jaxpr) / n
    lowered = traced.lower()
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
            raise CompileCheckError(
                f"does not fit: the TPU compiler ran out of {topo.generation} HBM "
                f"({topo.hbm_bytes / GiB:.0f} GiB per chip) for per-device batch {batch_size // n} "
                f"(microbatch {micro // n}) x {seq_len}: {msg.splitlines()[0][:400]}") from None
        raise
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = metrics.device_peak_flops(devices[0])
    model_flops = cfg.flops_per_token(seq_len) * batch_size * seq_len / n
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    result = {
        "topology": topology, "generation": topo.generation, "device_kind": devices[0].device_kind,
        "devices": n, "mesh": dict(mesh.shape), "params": cfg.param_count(), "dtype": cfg.dtype,
        "remat": cfg.remat_policy, "attention": attn, "global_batch": batch_size, "microbatches": run.microbatches,
        "per_device_batch": batch_size / n, "seq_len": seq_len, "data_source": run.data_source.kind,
        "memory": {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
                   "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
                   "generated_code": mem.generated_code_size_in_bytes, "total": total,
                   "host_temp": mem.host_temp_size_in_bytes, "hbm": topo.hbm_bytes},
        "flops": {"model": model_flops, "executed": executed, "xla_cost_analysis": float(cost.get("flops", 0.0)),
                  "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0))},
        "peak_flops": peak, "est_step_time_s": executed / peak, "mfu_ceiling": model_flops / executed,
        "tokens_per_s_bound": batch_size * seq_len / (executed / peak),
        "trace_lower_s": t1 - t0, "compile_s": t2 - t1,
    }
    result["fits"] = total <= topo.hbm_bytes
    return result


def format_report(r: dict) -> str:
    m, f = r["memory"], r["flops"]
    g = lambda b: f"{b / GiB:8.2f} GiB" if b >= GiB / 10 else f"{b / 2 ** 20:8.2f} MiB"
    lines = [
        f"{r['topology']}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}, {r['params'] / 1e6:,.1f}M params "
        f"({r['dtype']}), remat {r['remat']}, attention {r['attention']}",
        f"batch {r['global_batch']} x {r['seq_len']} ({r['per_device_batch']:g} per device, {r['microbatches']} "
        f"microbatch{'es' if r['microbatches'] > 1 else ''}, data source {r['data_source']}); "
        f"traced+lowered {r['trace_lower_s']:.1f} s, compiled {r['compile_s']:.1f} s",
        "per-device memory (compiled.memory_analysis):",
        f"  arguments      {g(m['argument'])}   (state + batch; the state is donated)",
        f"  outputs        {g(m['output'])}   (of which {g(m['alias']).strip()} alias the donated state)",
        f"  temporaries    {g(m['temp'])}",
        f"  generated code {g(m['generated_code'])}",
        f"  total          {g(m['total'])}   of {m['hbm'] / GiB:.0f} GiB HBM ({100 * m['total'] / m['hbm']:.0f}%)"
        + (f"; host memory (offloaded activations) {g(m['host_temp']).strip()}" if m["host_temp"] else ""),
        "per-device compute:",
        f"  model FLOPs    {f['model']:.3e}   (PaLM 6N + attention, as MFU counts)",
        f"  executed FLOPs {f['executed']:.3e}   (matmuls of the traced step incl. remat recompute)",
        f"  XLA cost analysis {f['xla_cost_analysis']:.3e} FLOPs, {f['xla_bytes_accessed'] / GiB:.2f} GiB accessed "
        "(counts each scanned-layer loop body once: reference only)",
        f"  est. step time >= {1e3 * r['est_step_time_s']:.1f} ms at {r['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak "
        f"(executed FLOPs / peak: a lower bound) -> <= {r['tokens_per_s_bound']:,.0f} tokens/s, "
        f"MFU ceiling {100 * r['mfu_ceiling']:.1f}%",
    ]
    return "\n".join(lines)


# The required macros of gin/runs/base.gin and gin/data/{codetextbook,codeexercises}.gin that only
# the data or the outputs need, and the bindings through which the run would read them.
_UNUSED_BINDINGS = ("MODEL_DIR = 'unused-by-compile-check'", "CODE_SOURCES = None", "TEXTBOOK_SOURCES = None",
                    "TOKENIZER = None", "EXERCISES = None", "PRETRAINED = None", "data_source.task_name = None",
                    "data_source.data_path = None", "data_source.tokenizer_path = None",
                    "train.init_params_from = None")


def main(argv=None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only: never take a local accelerator
    p = cli.ArgumentParser(description=__doc__.splitlines()[0], exit_codes=cli.DEFAULT_CODES)
    gin_config.add_gin_flags(p)
    p.add_argument("--topology", required=True, help="e.g. v5e-16, v4-32, v5e-64, v5p-8, or v5e:4x4, v4:2x2x4")
    p.add_argument("--per_device_batch", type=float, default=None,
                   help="sequences per device per step (global batch = this x devices); default: gin BATCH_SIZE")
    p.add_argument("--microbatches", type=int, default=None, help="gradient accumulation steps (default: gin)")
    p.add_argument("--remat", default=None, help="remat policy (default: gin), see phijax.remat.POLICIES")
    p.add_argument("--attention", default=None, help="attention backend (default: gin), e.g. auto, splash, xla")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        topo = parse_topology(args.topology)
        # MODEL_DIR and the data (the experiments' CODE_SOURCES, EXERCISES, PRETRAINED, ...) are
        # required by the training gin files but unused here: nothing is read, only compiled.
        gin_config.parse(args.gin_file, [*_UNUSED_BINDINGS, *args.gin_param], args.gin_search_path)
        run = train_lib.configure()
        changes = {k: v for k, v in (("remat_policy", args.remat), ("attention", args.attention)) if v is not None}
        if changes:
            run = run.replace(model_config=run.model_config.replace(**changes))
        if args.per_device_batch is not None:
            batch_size = args.per_device_batch * topo.chips
            if batch_size != int(batch_size) or batch_size < 1:
                raise CompileCheckError(f"--per_device_batch={args.per_device_batch} x {topo.chips} devices is not "
                                        "a whole number of sequences")
            run = run.replace(batch_size=int(batch_size))
        if args.microbatches:
            run = run.replace(microbatches=args.microbatches)
        r = check(args.topology, run)
    except (CompileCheckError, gin_config.GinError, ValueError) as e:
        return cli.fail(gin_config.explain(e), cli.EXIT_FAILED if isinstance(e, CompileCheckError) else cli.EXIT_BAD_INPUT)
    print(format_report(r))
    if args.json:
        files.save_json(args.json, r, indent=1)
    if not r["fits"]:
        m = r["memory"]
        print(f"error: does not fit: {m['total'] / GiB:.2f} GiB per device needed, {r['generation']} has "
              f"{m['hbm'] / GiB:.0f} GiB HBM (short by {(m['total'] - m['hbm']) / GiB:.2f} GiB); lower "
              f"--per_device_batch, raise --microbatches, or use --remat full / offload_dots", file=sys.stderr)
        return cli.EXIT_FAILED
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
