"""Training entry point: `python -m phijax.train --gin_file=... [--gin_file=...] [--gin_param=...]`.

Reads top to bottom: parse gin -> check the settings -> the run's set-up (phijax.train_setup: mesh,
shardings, the jitted step, the data source) -> state (fresh or resumed) -> loop of one jitted step
-> checkpoints, metrics -> final save and export.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from phijax import checkpoint as ckpt_lib, convert
from phijax import distributed, metrics as metrics_lib, train_eval, train_setup
from phijax import gin_bindings  # noqa: F401  (registers what the gin files name)
from phijax.config import PhiConfig
from phijax.train_setup import RunConfig
from phijax.util import cli, files, gin_config

log = logging.getLogger("phijax.train")


class NonFiniteLossError(RuntimeError):
    pass


# train()'s integer settings and their lower bounds.
_INT_SETTINGS = {"train_steps": 1, "batch_size": 1, "seq_len": 1, "microbatches": 1, "log_every": 1,
                 "checkpoint_every": 1, "seed": None}


def _setting(name: str):
    """(label, value) of the run setting `name` as gin will pass it: the macro's name and value when
    it is bound through one (e.g. TRAIN_STEPS), else `train.<name>` and its binding or default."""
    default = {f.name: f.default for f in dataclasses.fields(RunConfig)}[name]
    return _binding("train", name, gin.REQUIRED if default is dataclasses.MISSING else default)


def _binding(configurable: str, name: str, default=None):
    """(label, value) of `<configurable>.<name>` as gin will pass it, through any macros."""
    try:
        bindings = gin.get_bindings(configurable, resolve_references=False)
    except ValueError:  # not registered (its module not imported): nothing bound
        bindings = {}
    value = bindings.get(name, default)
    label = f"{configurable}.{name}"
    while isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
        label = value.scoped_selector.rsplit("/", 1)[0]
        value = gin.query_parameter(f"%{label}")
    return label, value


# Data paths the run will read, by the binding that names them: (configurable, parameter, a file?).
# Checked when bound to a local path, so that a typo is refused before MODEL_DIR or any data work.
_DATA_PATHS = (("data_source", "data_path", True), ("data_source", "tokenizer_path", True),
               ("phijax.tasks.register_codetextbook", "code", False),
               ("phijax.tasks.register_codetextbook", "textbook", False),
               ("phijax.tasks.register_codetextbook", "tokenizer_path", True))


def _data_path_problems() -> list[str]:
    problems = []
    for configurable, name, is_file in _DATA_PATHS:
        label, value = _binding(configurable, name)
        if not _plain(value) or value is None:
            continue
        paths = [value] if isinstance(value, (str, os.PathLike)) else value
        if not isinstance(paths, (list, tuple)):
            continue
        for path in paths:
            if not isinstance(path, (str, os.PathLike)) or files.is_url(str(path)):
                continue
            path = os.path.expanduser(str(path))
            if not os.path.exists(path):
                problems.append(f"{label}: {path!r} does not exist")
            elif is_file and not os.path.isfile(path):
                problems.append(f"{label}: {path!r} is not a file")
    return problems


def _plain(value) -> bool:
    """A value gin passes as it is (not a configurable to call, not an unset REQUIRED)."""
    return not isinstance(value, gin.config.ConfigurableReference) and value is not gin.REQUIRED


def check_settings() -> None:
    """Checks train()'s gin settings before anything runs (gin evaluates train's arguments, the
    learning-rate schedule among them, when train is called), then creates MODEL_DIR.

    Raises ValueError naming each bad setting: an integer that is not one (e.g. a quoted
    `TRAIN_STEPS = '4'`) or is out of range, an unknown export dtype, an `init_params_from`
    that is neither a phijax export nor a Hugging Face directory (or a hub id in the local hub
    cache), a local data path (data_source.data_path / .tokenizer_path, the CodeTextbook sources
    and tokenizer) that does not exist, a MODEL_DIR that cannot be created or written. Nothing is created unless every setting is good.
    """
    problems = []
    for name, low in _INT_SETTINGS.items():
        label, value = _setting(name)
        if not _plain(value):
            continue
        hint = " (drop the quotes)" if isinstance(value, str) and value.strip().lstrip("-").isdigit() else ""
        if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
            problems.append(f"{label} = {value!r} must be an integer{'' if low is None else f' >= {low}'}{hint}")
    label, keep = _setting("keep_checkpoints")
    if _plain(keep) and keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        problems.append(f"{label} = {keep!r} must be an integer >= 1 or None (keep all)")
    label, dtype = _setting("export_dtype")
    if _plain(dtype) and dtype is not None:
        try:
            jnp.dtype(dtype)
        except TypeError:
            problems.append(f"{label} = {dtype!r} is not a dtype (e.g. 'bfloat16', 'float32', or None: no export)")
    label, init = _setting("init_params_from")
    if _plain(init) and init is not None:
        try:
            init_dir = convert.resolve_model_dir(init)  # a hub id (microsoft/phi-1) -> its cached snapshot
        except ValueError as e:
            problems.append(f"{label} = {e}")
        else:
            if not (epath.Path(init_dir, ckpt_lib.EXPORT_INFO_FILE).exists()
                    or epath.Path(init_dir, "config.json").exists()):
                what = "is neither a phijax export (export_info.json) nor a Hugging Face directory (config.json)" \
                    if epath.Path(init_dir).exists() else "does not exist"
                problems.append(f"{label} = {init!r} {what}")
    label, model_dir = _setting("model_dir")
    if _plain(model_dir) and not (isinstance(model_dir, str) and model_dir):
        problems.append(f"{label} = {model_dir!r} must be a directory path")
    problems += _data_path_problems()
    if problems:
        raise ValueError("; ".join(problems))
    if isinstance(model_dir, str) and not files.is_url(model_dir):  # gs://: orbax/etils create them
        try:
            os.makedirs(model_dir, exist_ok=True)
        except OSError as e:
            where = f" ({e.filename})" if e.filename and e.filename != model_dir else ""
            raise ValueError(f"{label} = {model_dir!r} cannot be created: {e.strerror}{where}") from None
        if not os.access(model_dir, os.W_OK | os.X_OK):
            raise ValueError(f"{label} = {model_dir!r} is not writable")


# The run as gin describes it: `train.<setting>` (gin/runs/base.gin and the experiments) binds the
# fields of RunConfig, whose defaults are the only ones; base.gin's %gin.REQUIRED macros say which
# settings an experiment must give.
configure = gin.external_configurable(RunConfig, "train")


def train(run: RunConfig, *, gin_config_str: str | None = None) -> dict:
    """Train (or resume) and return a summary dict: first/last loss, final step, paths."""
    s = train_setup.setup(run)
    cfg, mesh, rules, train_steps = s.cfg, s.mesh, s.rules, run.train_steps
    model_dir = run.model_dir
    if not files.is_url(model_dir):  # remote (gs://) model dirs are handled by orbax/etils
        model_dir = os.path.abspath(model_dir)
        os.makedirs(model_dir, exist_ok=True)

    # State: the latest good checkpoint, restored before the (possibly slow) data preparation so
    # that a checkpoint of another model is refused at once; or, after it, a fresh initialisation.
    checkpointer = ckpt_lib.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                         save_interval_steps=run.checkpoint_every, max_to_keep=run.keep_checkpoints,
                                         async_save=run.async_checkpoint)
    meta = {"model": cfg.to_dict(), "seq_len": run.seq_len, "batch_size": run.batch_size}
    evaluator = train_eval.PeriodicEval()  # gin: PeriodicEval.every_steps etc. (0: off)
    evaluator.check(model_dir=model_dir, mesh=mesh)
    restored = checkpointer.restore_latest(s.abstract_state,
                                           check_meta=functools.partial(_check_same_model, cfg, model_dir))
    data = s.make_data()
    evaluator.setup(model_dir=model_dir, graphdef=s.graphdef, cfg=cfg, mesh=mesh, rules=rules, data=data)
    if restored is None:
        state = s.init_state()
        if run.init_params_from:  # e.g. fine-tuning from a pretraining export or an HF directory
            state["params"] = _load_params(run.init_params_from, s.abstract_state["params"])
            log.info("initialised parameters from %s", run.init_params_from)
        start = 0
        log.info("initialised %s parameters (%.1fM)", "phi", cfg.param_count() / 1e6)
    else:
        start, state, data_state = restored
        data.check_state(data_state)
        log.info("resumed from step %d (%s)", start, checkpointer.directory)
        if run.init_params_from:
            log.info("train.init_params_from is ignored: it initialises a new run, and this one resumes")

    writer = metrics_lib.MetricsWriter(model_dir, enabled=jax.process_index() == 0)
    writer.truncate_after(start)
    peak = (run.peak_flops_per_device or metrics_lib.device_peak_flops()) * jax.device_count()
    tokens_per_step = run.batch_size * run.seq_len
    flops_per_token = cfg.flops_per_token(run.seq_len)
    if gin_config_str is not None and jax.process_index() == 0:
        files.atomic_write_text(os.path.join(model_dir, "config.gin"), gin_config_str)

    # The loop. Metrics of step s are read after step s+1 is dispatched, so the host never
    # stalls the device; a non-finite loss stops before any later state is saved.
    first_loss = last_loss = None
    pending = None  # (step, metrics) not yet checked
    t_window = t_start = time.perf_counter()
    last_logged = start
    if start and evaluator.due(start, train_steps) and start not in evaluator.evaluated_steps():
        writer.write(start, evaluator.run(start, state["params"]))  # killed after the save, before the eval
    for step in range(start, train_steps):
        batch = s.to_global(data.local_batch(step))
        state, step_metrics = s.step(state, batch)
        if pending is not None:
            _check_finite(*pending)
        pending = (step, step_metrics)
        done = step + 1
        # metrics.jsonl holds the steps of the log grid only, so a resumed run's file equals an
        # uninterrupted one's; the first step after a (re)start is also logged to the console.
        on_grid = done % run.log_every == 0 or done in (1, train_steps) or checkpointer.should_save(done)
        if on_grid or done == start + 1:
            m = jax.device_get(step_metrics)
            _check_finite(step, m)
            pending = None
            now = time.perf_counter()
            tok_s = tokens_per_step * (done - last_logged) / max(now - t_window, 1e-9)
            record = {"loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                      "tokens_per_second": tok_s, "mfu": tok_s * flops_per_token / peak}
            if on_grid:
                writer.write(done, record)
            if done == start + 1 and jax.process_index() == 0:  # everything configurable has been read
                files.atomic_write_text(os.path.join(model_dir, "operative_config.gin"), gin.operative_config_str())
            t_window, last_logged = now, done
            first_loss = record["loss"] if first_loss is None else first_loss
            last_loss = record["loss"]
            eta = (now - t_start) / (done - start) * (train_steps - done)
            log.info("step %d/%d | loss %.4f | lr %.2e | %.0f tok/s | mfu %.1f%% | eta %s", done, train_steps,
                     record["loss"], record["lr"], tok_s, 100 * record["mfu"], metrics_lib.format_duration(eta))
        if checkpointer.should_save(done) or done == train_steps:
            writer.flush()  # a gs:// metrics.jsonl is buffered: store the records this checkpoint covers
            checkpointer.save(done, state, data_state=data.state(done), meta=meta, force=done == train_steps)
        if evaluator.due(done, train_steps):
            writer.write(done, evaluator.run(done, state["params"]))
    if pending is not None:
        _check_finite(*pending)
    checkpointer.wait_until_finished()
    export_dir = None
    if run.export_dtype:  # also when nothing was left to train: a kill may have come before the export
        export_dir = os.path.join(model_dir, "export")
        ckpt_lib.export_params(state["params"], export_dir, dtype=jnp.dtype(run.export_dtype), config=cfg.to_dict(),
                               tokenizer_path=getattr(data, "tokenizer_path", None))  # decodes on its own
    checkpointer.close()
    writer.close()
    return {"first_loss": first_loss, "last_loss": last_loss, "start_step": start, "final_step": train_steps,
            "checkpoint_dir": checkpointer.directory, "export_dir": export_dir, "model_dir": model_dir,
            "best": evaluator.best if evaluator.enabled else None}


def _load_params(path: str, abstract_params):
    """Parameters from a phijax export (checkpoint.export_params) or a Hugging Face directory or hub id."""
    path = convert.resolve_model_dir(path)
    if epath.Path(path, "config.json").exists():
        from phijax import model as model_lib
        _, params, _ = model_lib.split(convert.load_hf(path))
        return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), params, abstract_params)
    return ckpt_lib.load_params(path, abstract_params)


def _check_finite(step, m):
    loss, gnorm = np.asarray(jax.device_get(m["loss"])), np.asarray(jax.device_get(m["grad_norm"]))
    if not (np.isfinite(loss) and np.isfinite(gnorm)):
        raise NonFiniteLossError(
            f"non-finite loss at step {step + 1}: loss={loss}, grad_norm={gnorm}. Training stopped; "
            f"the last good checkpoint is untouched (lower the learning rate, check the data, or resume).")


def _check_same_model(cfg: PhiConfig, model_dir: str, step: int, meta: dict):
    """Checkpointer.restore_latest's check_meta: refuses a checkpoint of another model shape."""
    saved = meta.get("model")
    if saved is None:
        return
    saved_shape = PhiConfig.from_dict(saved).shape_dict()
    diff = {k: (saved_shape[k], v) for k, v in cfg.shape_dict().items() if saved_shape[k] != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise ValueError(f"MODEL_DIR {model_dir} holds a checkpoint (step {step}) "
                         f"of a different model shape ({detail}); use a new MODEL_DIR or the matching model gin")


EXIT_PEER_LOST = cli.EXIT_PEER_LOST


def _exit_peer_lost(e: Exception):
    """A runtime failure in a multi-process job (usually a collective whose peer died: killed,
    preempted, OOM). Exits at once: jax's shutdown would first wait for the dead peer at a barrier
    (up to the heartbeat timeout) and then abort."""
    msg = str(e).splitlines()[0][:500]
    print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: {type(e).__name__}: {msg}\n"
          f"error: another process of this job has probably died (killed, preempted, out of memory). "
          f"Restart all {jax.process_count()} processes with the same MODEL_DIR to resume from its last "
          f"checkpoint (tpu_scripts/resume.sh does this on TPU VMs).", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(EXIT_PEER_LOST)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0], exit_codes=cli.ALL_CODES)
    gin_config.add_gin_flags(parser)
    parser.add_argument("--coordinator_address", default=None,
                        help="multi-process: host:port of process 0 (env PHIJAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num_processes", default=None, help="multi-process: process count (env PHIJAX_NUM_PROCESSES)")
    parser.add_argument("--process_id", default=None, help="multi-process: this process's id (env PHIJAX_PROCESS_ID)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    try:  # before anything touches jax devices
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:
        return cli.fail(e)
    if jax.process_index() != 0:  # one progress log per job (training, checkpoints, evaluation)
        logging.getLogger("phijax").setLevel(logging.WARNING)
    try:
        gin_config.parse(args.gin_file, args.gin_param, args.gin_search_path)
        gin_config.check_macros_used()
        check_settings()  # before any data or device work; creates MODEL_DIR
    except ValueError as e:  # GinError included
        return cli.fail(e)
    try:
        summary = train(configure(), gin_config_str=gin.config_str())
    except NonFiniteLossError as e:
        return cli.fail(e, cli.EXIT_INCOMPLETE)
    except ValueError as e:
        return cli.fail(gin_config.explain(e))
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        _exit_peer_lost(e)
    if jax.process_index() == 0:
        operative = gin.operative_config_str()
        files.atomic_write_text(os.path.join(summary["model_dir"], "operative_config.gin"), operative)
        if summary["start_step"] < summary["final_step"]:
            print(f"done: step {summary['final_step']}, loss {summary['first_loss']} -> {summary['last_loss']}")
        else:  # e.g. killed after the final checkpoint, before the export
            print(f"done: nothing left to train: the latest checkpoint is step {summary['start_step']} "
                  f"(TRAIN_STEPS = {summary['final_step']})"
                  + ("; the export was written from it" if summary["export_dir"] else ""))
        print(f"checkpoints: {summary['checkpoint_dir']}")
        if summary["export_dir"]:
            print(f"inference params: {summary['export_dir']}")
        print(f"metrics: {os.path.join(summary['model_dir'], 'metrics.jsonl')}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
