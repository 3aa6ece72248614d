"""Training checkpoints and inference-parameter exports, on orbax-checkpoint.

Layout of a training directory (MODEL_DIR), one sub-directory per step::

    MODEL_DIR/
      120/                       # committed step (orbax renames <step>.orbax-checkpoint-tmp -> <step>)
        state/                   # the train state pytree (OCDBT/zarr arrays + _METADATA + _sharding)
        data_state/metadata      # input pipeline position (JSON)
        meta/metadata            # model config etc. (JSON), optional
        _CHECKPOINT_METADATA, commit_success.txt
      240.orbax-checkpoint-tmp/  # an interrupted save: never listed, never restored

`Checkpointer` wraps one `orbax.checkpoint.CheckpointManager` holding three items
('state', 'data_state', 'meta').  Saves are asynchronous by default: orbax copies
every device array to host memory inside the blocking part of `save` (see
`orbax/checkpoint/_src/serialization/replica_slices.py:transfer_arrays_to_host`,
which ends in `np.asarray(...)` on each shard), so the caller may donate or delete
the arrays as soon as `save` returns.  Writing, the commit (atomic rename on local
/ POSIX file systems, `commit_success.txt` on GCS) and garbage collection of old
steps happen in a background thread.

`restore_latest` walks the committed steps newest-first: a step whose files are
truncated/missing (arrays, their metadata, or with `check_meta` its `meta/metadata`)
is logged as one WARNING line naming the step and the reason, and skipped; a step
whose *shapes* differ from the requested abstract state (or that `check_meta`
rejects) raises `ValueError` before any array is read (that is a different model,
not corruption); if steps exist but none restores it raises `RuntimeError` rather
than letting training start from scratch.

`export_params` / `load_params` write and read a standalone parameters-only
checkpoint (optionally cast, e.g. to bfloat16) plus a small JSON description.

This module deliberately does not import tensorflow.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import logging
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = [
    "Checkpointer",
    "export_params",
    "load_params",
    "read_export_info",
    "EXPORT_INFO_FILE",
    "EXPORT_PARAMS_SUBDIR",
]

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_STATE_ITEM = "data_state"
META_ITEM = "meta"

EXPORT_PARAMS_SUBDIR = "params"
EXPORT_INFO_FILE = "export_info.json"
EXPORT_TOKENIZER_FILE = "tokenizer.json"
EXPORT_FORMAT = "phijax-params-v1"


# --------------------------------------------------------------------------- helpers


def _key_str(k: Any) -> str:
    """One pytree key -> a path component ('params', 'embed', '1', ...)."""
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(path) -> str:
    return "/".join(_key_str(k) for k in path)


def _flatten_by_path(tree) -> dict[str, Any]:
    """Flattens a pytree to {'a/b/c': leaf}.

    Namedtuple fields (GetAttrKey) and dict keys both become their name, so an
    optax state (namedtuples) and orbax's stored metadata tree (plain dicts/lists)
    give the same paths.  Empty containers and None contribute no leaves on
    either side.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(p): v for p, v in leaves}


def _is_key_dtype(dtype) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _check_compatible(
    stored_tree, abstract_tree, *, where: str, check_dtype: bool = True
) -> None:
    """Raises ValueError naming the first leaf whose shape/dtype/presence differs."""
    stored = _flatten_by_path(stored_tree)
    wanted = _flatten_by_path(abstract_tree)
    for path, want in wanted.items():
        if path not in stored:
            raise ValueError(
                f"{where}: parameter '{path}' is expected (shape {tuple(want.shape)}) but is "
                f"not in the checkpoint; the checkpoint holds a different model/state "
                f"structure (stored leaves e.g. {sorted(stored)[:5]})."
            )
        have = stored[path]
        have_shape = tuple(getattr(have, "shape", ()) or ())
        want_shape = tuple(want.shape)
        if have_shape != want_shape:
            raise ValueError(
                f"{where}: shape mismatch for parameter '{path}': checkpoint has shape "
                f"{have_shape}, expected {want_shape} (the checkpoint was written by a "
                f"model of a different shape)."
            )
        if check_dtype and not _is_key_dtype(want.dtype):
            have_dtype = getattr(have, "dtype", None)
            if have_dtype is not None and np.dtype(have_dtype) != np.dtype(want.dtype):
                raise ValueError(
                    f"{where}: dtype mismatch for parameter '{path}': checkpoint has "
                    f"{np.dtype(have_dtype).name}, expected {np.dtype(want.dtype).name}."
                )
    extra = [p for p in stored if p not in wanted]
    if extra:
        raise ValueError(
            f"{where}: parameter '{extra[0]}' (shape "
            f"{tuple(getattr(stored[extra[0]], 'shape', ()))}) is in the checkpoint but not "
            f"in the expected state ({len(extra)} unexpected leaves in total); the "
            f"checkpoint holds a different model/state structure."
        )


def _reason(e: BaseException, limit: int = 400) -> str:
    """One line for a log: the root cause's `Type: first line`. (orbax wraps a tensorstore read
    error in a message that embeds the store's whole multi-line spec; the cause names the file.)"""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).split(" See full TensorStore details")[0].strip().splitlines()
    msg = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return msg if len(msg) <= limit else msg[:limit] + " ...[truncated]"


def _is_failed_read_echo(exc: BaseException | None) -> bool:
    return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or \
        str(exc).startswith("Encountered error while reading array index")


@contextlib.contextmanager
def _failed_read_echoes_dropped():
    """Drops the echoes of a failed array read while a restore runs.

    When one read fails, orbax's restore raises and closes its event loop with the other
    reads still in flight (orbax/checkpoint/_src/asyncio_utils.py:_run_sync_via_new_loop).
    Each of those then reports `RuntimeError: Event loop is closed` from a tensorstore
    thread, and each abandoned read coroutine re-raises its own 'Encountered error while
    reading array index ... <the TensorStore spec>' when collected: dozens to thousands of
    traceback lines through `sys.unraisablehook`. The failure itself is raised normally and
    logged by `restore_latest`; any other unraisable exception passes through.
    """
    previous = sys.unraisablehook
    dropped = 0

    def hook(unraisable):
        nonlocal dropped
        if _is_failed_read_echo(unraisable.exc_value):
            dropped += 1
        else:
            previous(unraisable)

    failed: list = []  # the caller appends when a read failed: only then are there echoes to collect
    sys.unraisablehook = hook
    try:
        yield failed
    finally:
        if failed:
            gc.collect()  # finalise abandoned read coroutines now, under this hook
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous
        if dropped:
            logger.debug("Dropped %d echoes of failed checkpoint reads (Event loop is closed, ...).", dropped)


def _json_copy(obj: Any, what: str) -> Any:
    """Deep copy through JSON: validates serialisability now, in the caller's thread,
    and detaches the value from later in-place mutation while the async write runs."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from e


# --------------------------------------------------------------------------- Checkpointer


def _absolute(directory) -> epath.Path:
    """orbax's tensorstore backend needs absolute paths; URLs (gs://...) are left as they are."""
    directory = str(directory)
    return epath.Path(directory if "://" in directory else os.path.abspath(directory))


class Checkpointer:
    """Periodic (async) train-state checkpoints with resume and corruption fallback.

    Every process of a multi-host job must make the same calls in the same order
    (orbax synchronises the hosts inside save/restore/delete).
    """

    def __init__(
        self,
        directory: str,
        *,
        save_interval_steps: int,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        if int(save_interval_steps) < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and int(max_to_keep) < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self._directory = _absolute(directory)
        self._save_interval_steps = int(save_interval_steps)
        self._async_save = bool(async_save)
        # Steps found unreadable by restore_latest and newer than the step we
        # resumed from: the resumed run will re-save those step numbers, which
        # orbax refuses while the old directory exists, so `save` replaces them.
        self._unrestorable_steps: set[int] = set()
        options = ocp.CheckpointManagerOptions(
            # `save` below decides itself (should_save) and always passes
            # force=True to orbax; these keep orbax's own view consistent.
            save_interval_steps=self._save_interval_steps,
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=self._async_save,
        )
        self._mngr = ocp.CheckpointManager(
            self._directory,
            options=options,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                DATA_STATE_ITEM: ocp.JsonCheckpointHandler(),
                META_ITEM: ocp.JsonCheckpointHandler(),
            },
        )

    # ------------------------------------------------------------------ queries

    @property
    def directory(self) -> epath.Path:
        return self._directory

    def all_steps(self) -> list[int]:
        """Steps known to this manager (committed ones on disk plus, while an async
        save is in flight, the step being written)."""
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """True on multiples of `save_interval_steps` (and at a multi-host preemption
        sync point), unless a valid checkpoint for `step` already exists."""
        step = int(step)
        if step in self._mngr.all_steps() and step not in self._unrestorable_steps:
            return False
        if step % self._save_interval_steps == 0:
            return True
        try:
            return bool(self._mngr.reached_preemption(step))
        except Exception:  # preemption sync manager not initialised: no preemption
            return False

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        state,
        *,
        data_state: dict,
        meta: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` (+ JSON `data_state`, `meta`) as `step` if due (or `force`).

        Returns whether a save was started.  With async saving it returns once the
        arrays are on host memory; the write and commit continue in background.  A
        step that already has a valid checkpoint is never overwritten (returns False).
        """
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if step in self._mngr.all_steps():
            if step in self._unrestorable_steps:
                logger.warning(
                    "Checkpoint step %d in %s was found damaged; deleting it "
                    "so that it can be re-saved.", step, self._directory,
                )
                self._mngr.wait_until_finished()
                self._mngr.delete(step)
                self._unrestorable_steps.discard(step)
            else:
                logger.info("Checkpoint for step %d already exists in %s; not saving again.",
                            step, self._directory)
                return False
        items = {
            STATE_ITEM: ocp.args.StandardSave(state),
            DATA_STATE_ITEM: ocp.args.JsonSave(_json_copy(dict(data_state), "data_state")),
        }
        if meta is not None:
            items[META_ITEM] = ocp.args.JsonSave(_json_copy(dict(meta), "meta"))
        saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            logger.info("Checkpoint save for step %d started in %s (async=%s).",
                        step, self._directory, self._async_save)
        return bool(saved)

    # ------------------------------------------------------------------ restore

    def _stored_state_metadata(self, step: int):
        md = self._mngr.item_metadata(step)
        try:
            tree = md[STATE_ITEM]
        except (KeyError, TypeError) as e:
            raise FileNotFoundError(f"no '{STATE_ITEM}' item in checkpoint step {step}") from e
        if tree is None:
            raise FileNotFoundError(f"no readable '{STATE_ITEM}' metadata in checkpoint step {step}")
        return getattr(tree, "tree", tree)

    def restore_latest(
        self, abstract_state, *, check_meta: Callable[[int, dict], None] | None = None
    ) -> tuple[int, Any, dict] | None:
        """Restores the newest restorable checkpoint onto `abstract_state`'s shardings.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with `.sharding`)
        matching the saved state.  With `check_meta`, each candidate step's 'meta'
        JSON is read first and passed to `check_meta(step, meta)` (which raises to
        refuse it); a step whose meta is missing or unreadable counts as damaged.
        Returns `(step, state, data_state)`, or None when the directory holds no
        committed checkpoint.

        Raises:
          ValueError: a checkpoint's stored shapes/dtypes/structure differ from
            `abstract_state` (checked from metadata, before reading arrays), or
            `check_meta` refused it.
          RuntimeError: checkpoints exist but none of them can be restored.
        """
        self._mngr.wait_until_finished()
        self._mngr.reload()  # re-list the directory: committed steps only
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            return None
        def damaged(step, what, e):
            failures.append((step, f"{what}: {_reason(e)}"))
            logger.warning("Checkpoint step %d in %s is damaged (%s); trying the previous checkpoint.",
                           step, self._directory, failures[-1][1])
            logger.debug("Full error for checkpoint step %d", step, exc_info=e)

        with _failed_read_echoes_dropped() as failures:
            for step in steps:
                try:
                    meta = self._read_meta_item(step, required=True) if check_meta is not None else None
                except Exception as e:  # missing file, bad JSON, not an object
                    damaged(step, f"{META_ITEM}/metadata", e)
                    continue
                try:
                    stored = self._stored_state_metadata(step)
                except Exception as e:  # unreadable/missing array metadata
                    damaged(step, f"{STATE_ITEM} metadata", e)
                    continue
                # A different model is not corruption: fail loudly, do not fall back.
                if check_meta is not None:
                    check_meta(int(step), meta)
                _check_compatible(
                    stored, abstract_state,
                    where=f"checkpoint step {step} in {self._directory}",
                )
                try:
                    restored = self._mngr.restore(
                        step,
                        args=ocp.args.Composite(**{
                            STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                            DATA_STATE_ITEM: ocp.args.JsonRestore(),
                        }),
                    )
                    state = restored[STATE_ITEM]
                    data_state = restored[DATA_STATE_ITEM]
                    if not isinstance(data_state, dict):
                        raise ValueError(f"'{DATA_STATE_ITEM}' is {type(data_state).__name__}, not a dict")
                except Exception as e:  # truncated/missing files, bad JSON, ...
                    damaged(step, "arrays or data_state", e)
                    continue
                self._unrestorable_steps = {s for s, _ in failures}
                if failures:
                    logger.warning(
                        "Restored checkpoint step %d from %s after skipping damaged newer "
                        "step(s) %s.", step, self._directory, [s for s, _ in failures],
                    )
                else:
                    logger.info("Restored checkpoint step %d from %s.", step, self._directory)
                return int(step), state, data_state
        detail = "; ".join(f"step {s}: {msg}" for s, msg in failures)
        raise RuntimeError(
            f"None of the checkpoints in {self._directory} could be restored "
            f"(steps {sorted(steps)}): {detail}. Refusing to start from scratch; fix or "
            f"remove the directory."
        )

    def _read_meta_item(self, step: int, *, required: bool = False) -> dict | None:
        """The 'meta' JSON of committed `step`; None when the step has no meta item (unless `required`)."""
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
        except KeyError:  # item not present in this step
            meta = None
        if meta is None and not required:
            return None
        if not isinstance(meta, dict):
            raise ValueError(f"'{META_ITEM}' is {'missing' if meta is None else type(meta).__name__}, "
                             f"not a JSON object")
        return meta

    def read_meta(self, step: int | None = None) -> dict | None:
        """The 'meta' JSON saved with `step` (default: latest), or None if it has none
        (or the directory holds no checkpoint)."""
        self._mngr.wait_until_finished()
        if step is None:
            self._mngr.reload()
            step = self.latest_step()
            if step is None:
                return None
        step = int(step)
        if step not in self._mngr.all_steps():
            self._mngr.reload()
            if step not in self._mngr.all_steps():
                raise FileNotFoundError(f"No checkpoint for step {step} in {self._directory}")
        return self._read_meta_item(step)

    # ------------------------------------------------------------------ lifecycle

    def wait_until_finished(self) -> None:
        """Blocks until any in-flight async save has committed (re-raises its errors)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- exports


def _param_dtype_name(leaves) -> str:
    names = sorted({np.dtype(x.dtype).name for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)})
    if not names:
        return "none"
    return names[0] if len(names) == 1 else "mixed:" + ",".join(names)


def _export_paths(directory) -> tuple[epath.Path, epath.Path]:
    root = _absolute(directory)
    return root / EXPORT_PARAMS_SUBDIR, root / EXPORT_INFO_FILE


def export_params(
    params,
    directory: str,
    *,
    dtype=None,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    tokenizer_path: str | None = None,
) -> None:
    """Writes inference parameters as a standalone orbax checkpoint.

    `directory/params/` holds the (optionally `dtype`-cast: floating leaves only)
    parameter pytree; `directory/export_info.json` holds
    {"format", "dtype", "param_count", "num_bytes", "config", "tokenizer"}.
    `tokenizer_path` (a tokenizer.json) is copied to `directory/tokenizer.json` so the
    export decodes on its own (phijax.decode.load_for_inference); "tokenizer" names it.
    Sharded arrays are written from their shards (no gather to one host).
    """
    params_dir, info_file = _export_paths(directory)
    if dtype is not None:
        target = jnp.dtype(dtype)

        def cast(x):
            x = x if isinstance(x, jax.Array) else jnp.asarray(x)
            return x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x

        params = jax.tree.map(cast, params)
    leaves = jax.tree.leaves(params)
    info = {
        "format": EXPORT_FORMAT,
        "dtype": _param_dtype_name(leaves),
        "param_count": int(sum(int(np.prod(x.shape)) for x in leaves)),
        "num_bytes": int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)),
        "config": _json_copy(dict(config), "config") if config is not None else None,
        "tokenizer": EXPORT_TOKENIZER_FILE if tokenizer_path is not None else None,
    }
    if tokenizer_path is not None and not epath.Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer_path={tokenizer_path!r} is not a file")
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())  # synchronous
    try:
        ckptr.save(params_dir, args=ocp.args.StandardSave(params), force=overwrite)
    finally:
        ckptr.close()
    if jax.process_index() == 0:
        if tokenizer_path is not None:
            (_absolute(directory) / EXPORT_TOKENIZER_FILE).write_bytes(epath.Path(tokenizer_path).read_bytes())
        info_file.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    logger.info("Exported %d parameters (%s) to %s", info["param_count"], info["dtype"], params_dir)


def read_export_info(directory: str) -> dict:
    """The JSON written next to an `export_params` checkpoint."""
    _, info_file = _export_paths(directory)
    return json.loads(info_file.read_text())


def load_params(directory: str, abstract_params=None):
    """Loads parameters written by `export_params`.

    With `abstract_params` (pytree of ShapeDtypeStruct with .sharding) the arrays
    are restored onto those shardings (and cast to their dtypes; a shape mismatch
    raises ValueError naming the parameter).  Without it, returns plain host numpy
    arrays in the stored dtypes.
    """
    params_dir, _ = _export_paths(directory)
    if not params_dir.exists():
        raise FileNotFoundError(f"No exported parameters at {params_dir}")
    handler = ocp.PyTreeCheckpointHandler()
    ckptr = ocp.Checkpointer(handler)
    try:
        stored = handler.metadata(params_dir)
        stored_tree = getattr(stored, "tree", stored)
        if abstract_params is not None:
            _check_compatible(stored_tree, abstract_params, where=f"exported params {params_dir}",
                              check_dtype=False)
            std = ocp.Checkpointer(ocp.StandardCheckpointHandler())
            try:
                return std.restore(params_dir, args=ocp.args.StandardRestore(abstract_params))
            finally:
                std.close()
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored_tree)
        return ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        ckptr.close()
