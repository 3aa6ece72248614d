"""Everything a training run needs before its first step, built one way for every caller.

`phijax.train` (the loop), `phijax.compile_check` (an AOT compile for a TPU slice), the
benchmarks and the recipe all call `setup(run)`: the mesh, the abstract state and its shardings,
the batch shardings and a shaped batch, the jitted step; the real state and the data come from
it on demand (`init_state`, `make_data`), so a caller that only compiles allocates nothing and
reads no data. No gin and no tensorflow here: gin fills `RunConfig` (phijax.train.configure).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from phijax import attention, kernels, optim, sharding, train_step
from phijax.config import PhiConfig
from phijax.data.pipeline import FEATURE_DTYPES, FEATURES, DataSource
from phijax.kernels import cpu_ffi


# XLA:CPU compiles the step's matmuls to oneDNN calls instead of its default GEMM library
# (YNNPACK), elementwise fusions unchanged: oneDNN reads transposed operands in place, where the
# default copies them first (the weight gradients contract over the token dim). The tiny config's
# step: 3-4% faster, losses identical (docs/benchmarks.md). `train.compiler_options` in
# gin/experiments/cpu_demo.gin (as gin's %phijax.CPU_ONEDNN_DOTS) and the CPU benchmarks use it.
CPU_ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
                   "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run's settings: what the gin binding `train.<field>` sets (gin/runs/base.gin)."""

    model_config: PhiConfig
    batch_size: int  # global, in sequences
    seq_len: int
    train_steps: int = 1
    microbatches: int = 1
    seed: int = 0
    schedule: Callable | None = None  # None: optim.warmup_linear_decay(1e-4, 10, 10_000)
    optimizer: Callable = optim.adamw  # schedule -> optax.GradientTransformation
    mesh_shape: tuple = (-1, 1, 1)
    sharding_rules: Any = sharding.DEFAULT_RULES
    data_source: DataSource = DataSource("synthetic")
    model_dir: str | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int | None = 3
    async_checkpoint: bool = True
    export_dtype: str | None = "bfloat16"
    peak_flops_per_device: float | None = None
    init_params_from: str | None = None
    # XLA options for the train step's compile (jax.jit compiler_options), e.g. the CPU GEMM
    # library in gin/experiments/cpu_demo.gin; checked against the backend before anything runs.
    compiler_options: dict | None = None

    def __post_init__(self):  # gin gives lists where the fields hold tuples
        object.__setattr__(self, "mesh_shape", tuple(self.mesh_shape))
        object.__setattr__(self, "sharding_rules", tuple(self.sharding_rules))

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class TrainSetup:
    """What `setup` returns; see the module docstring."""

    run: RunConfig
    cfg: PhiConfig
    mesh: Mesh
    rules: tuple
    schedule: Callable
    tx: Any  # optax.GradientTransformation
    graphdef: Any
    abstract_state: dict  # ShapeDtypeStructs carrying their shardings
    state_shardings: dict
    batch_shardings: dict[str, NamedSharding]
    shaped_batch: dict[str, jax.ShapeDtypeStruct]  # the global batch the step takes
    step: Any  # jitted (state, batch) -> (state, metrics); donates the state

    def init_state(self, seed: int | None = None) -> dict:
        """A fresh state, created directly in its sharded layout."""
        return train_step.init_state(self.cfg, self.tx, self.run.seed if seed is None else seed,
                                     self.state_shardings)

    def make_data(self):
        """The run's batches (this process's slice of each global batch)."""
        return self.run.data_source.make(seq_len=self.run.seq_len, global_batch_size=self.run.batch_size,
                                         seed=self.run.seed, model_vocab_size=self.cfg.vocab_size,
                                         process_index=jax.process_index(), process_count=jax.process_count())

    def to_global(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return train_step.to_global(local_batch, self.batch_shardings)


def validate(cfg: PhiConfig, mesh: Mesh, *, batch_size: int, microbatches: int, seq_len: int,
             train_steps: int, process_count: int | None = None) -> None:
    """Raises ValueError listing every setting that cannot run on `mesh`."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    processes = jax.process_count() if process_count is None else process_count
    problems = []
    if train_steps <= 0:
        problems.append(f"TRAIN_STEPS={train_steps} must be > 0")
    if microbatches <= 0 or batch_size % microbatches:
        problems.append(f"batch size {batch_size} is not divisible by microbatches={microbatches}")
    elif (batch_size // microbatches) % dp:
        problems.append(f"microbatch size {batch_size // microbatches} (batch {batch_size} / {microbatches} "
                        f"microbatches) is not divisible by the data-parallel size {dp} (data x fsdp)")
    if batch_size % processes:
        problems.append(f"batch size {batch_size} is not divisible by the {processes} processes")
    if seq_len > cfg.max_len:
        problems.append(f"seq_len {seq_len} exceeds the model's max_len {cfg.max_len}")
    if problems:
        raise ValueError("invalid training configuration:\n  - " + "\n  - ".join(problems))


def check_compiler_options(options: dict | None, mesh: Mesh) -> None:
    """Compiles an empty program with `options` on the mesh's platform, so that an unknown option or
    value fails here with its name, not at the first step. (An AOT compile for devices this
    process has no backend for is checked when it compiles.)"""
    if not options or mesh.devices.flat[0].platform != jax.default_backend():
        return
    try:
        jax.jit(lambda x: x, compiler_options=options).lower(np.float32(0)).compile()
    except Exception as e:  # jax's runtime error: "No such compile option: ..." / "not a valid enum value"
        raise ValueError(f"train.compiler_options {options} do not compile on {jax.default_backend()}: {e}") from None


def shaped_batch(batch_size: int, seq_len: int, batch_shardings: dict[str, NamedSharding]):
    """The global batch as ShapeDtypeStructs (every feature of phijax.data.pipeline.FEATURES)."""
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), FEATURE_DTYPES[k], sharding=batch_shardings[k])
            for k in FEATURES}


def setup(run: RunConfig, *, devices=None, process_count: int | None = None) -> TrainSetup:
    """Builds (without allocating the state or reading data) what `run` needs on a mesh over
    `devices` (default: all of this job's; e.g. a TPU topology's for an AOT compile)."""
    cfg = run.model_config
    mesh = sharding.make_mesh(run.mesh_shape, devices=devices)
    validate(cfg, mesh, batch_size=run.batch_size, microbatches=run.microbatches, seq_len=run.seq_len,
             train_steps=run.train_steps, process_count=process_count)
    check_compiler_options(run.compiler_options, mesh)
    platform = kernels.device_platform(mesh.devices.flat[0])
    attention.prepare_backend(cfg.attention, platform)
    if cfg.loss_kernel == "cpu":
        cpu_ffi.require(platform, "loss_kernel='cpu'")
    rules = tuple(run.sharding_rules)
    schedule = run.schedule if run.schedule is not None else optim.warmup_linear_decay(1e-4, 10, 10_000)
    tx = run.optimizer(schedule)
    graphdef, abstract_state, state_shardings = train_step.state_shardings(cfg, tx, mesh, rules)
    batch_shardings = train_step.batch_shardings(FEATURES, mesh, rules)
    step = train_step.make_train_step(graphdef, cfg, tx, schedule, mesh=mesh, rules=rules,
                                      microbatches=run.microbatches, shardings=state_shardings,
                                      batch_sharding=batch_shardings, compiler_options=run.compiler_options)
    return TrainSetup(run=run, cfg=cfg, mesh=mesh, rules=rules, schedule=schedule, tx=tx, graphdef=graphdef,
                      abstract_state=abstract_state, state_shardings=state_shardings,
                      batch_shardings=batch_shardings,
                      shaped_batch=shaped_batch(run.batch_size, run.seq_len, batch_shardings), step=step)
