"""Multi-process (multi-host) start-up: one call, before anything touches jax devices.

`initialize()` decides from explicit arguments or environment variables whether this is a
multi-process run and, if so, calls `jax.distributed.initialize`:

  - explicit: `coordinator_address` ("host:port"), `num_processes`, `process_id`
    (or env PHIJAX_COORDINATOR_ADDRESS, PHIJAX_NUM_PROCESSES, PHIJAX_PROCESS_ID;
    arguments win over the environment);
  - auto: PHIJAX_DISTRIBUTED=auto lets jax detect the cluster (TPU VMs, SLURM, Open MPI, ...);
  - otherwise (nothing set): a single process, nothing is done.

`heartbeat_timeout_seconds` (env PHIJAX_HEARTBEAT_TIMEOUT_S) bounds how long the survivors of a
killed or hung process wait: the coordinator then reports the missing process and jax terminates
every other process with a non-zero exit, so a launcher (tpu_scripts/resume.sh) can restart the
job from its last checkpoint.

On CPU, cross-process computations need a collectives implementation for the CPU client;
`jax_cpu_collectives_implementation` is set to 'gloo' unless it already names one.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

ENV_ADDRESS = "PHIJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "PHIJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "PHIJAX_PROCESS_ID"
ENV_MODE = "PHIJAX_DISTRIBUTED"  # 'auto' -> jax.distributed.initialize() with cluster auto-detection
ENV_LOCAL_DEVICE_IDS = "PHIJAX_LOCAL_DEVICE_IDS"  # optional, comma-separated
# Seconds without a heartbeat after which the coordinator declares a process dead and every other
# process exits (non-zero) instead of waiting in a collective forever; jax's default is 100.
ENV_HEARTBEAT_TIMEOUT = "PHIJAX_HEARTBEAT_TIMEOUT_S"

log = logging.getLogger("phijax.distributed")

_initialized = False


def _int(value, name: str, *, minimum: int) -> int:
    try:
        out = int(str(value).strip())
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def _device_ids(value, name: str):
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]
        if not parts:
            return None
        return [_int(p, name, minimum=0) for p in parts]
    return [_int(p, name, minimum=0) for p in value]


def resolve(coordinator_address: str | None = None, num_processes: int | str | None = None,
            process_id: int | str | None = None, local_device_ids: int | str | Sequence[int] | None = None,
            environ=None, heartbeat_timeout_seconds: int | str | None = None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, {} for auto-detection, or None for a
    single process. Raises ValueError naming the missing or bad setting."""
    env = os.environ if environ is None else environ
    addr_name = f"coordinator_address/{ENV_ADDRESS}"
    n_name = f"num_processes/{ENV_NUM_PROCESSES}"
    id_name = f"process_id/{ENV_PROCESS_ID}"
    ids_name = f"local_device_ids/{ENV_LOCAL_DEVICE_IDS}"

    def pick(arg, var):
        if arg is not None and str(arg).strip() != "":
            return arg
        v = env.get(var)
        return v if v is not None and v.strip() != "" else None

    address = pick(coordinator_address, ENV_ADDRESS)
    n = pick(num_processes, ENV_NUM_PROCESSES)
    pid = pick(process_id, ENV_PROCESS_ID)
    ids = _device_ids(pick(local_device_ids, ENV_LOCAL_DEVICE_IDS), ids_name)
    heartbeat = pick(heartbeat_timeout_seconds, ENV_HEARTBEAT_TIMEOUT)
    if heartbeat is not None:
        heartbeat = _int(heartbeat, f"heartbeat_timeout_seconds/{ENV_HEARTBEAT_TIMEOUT}", minimum=1)
    mode = (env.get(ENV_MODE) or "").strip().lower()
    if mode not in ("", "auto", "0", "off", "false", "no"):
        raise ValueError(f"{ENV_MODE} must be 'auto' or unset, got {env.get(ENV_MODE)!r}")

    if address is None and n is None and pid is None:
        if mode == "auto":
            return {k: v for k, v in (("local_device_ids", ids), ("heartbeat_timeout_seconds", heartbeat))
                    if v is not None}
        return None  # single process

    if n is not None:
        n = _int(n, n_name, minimum=1)
    if pid is not None:
        pid = _int(pid, id_name, minimum=0)
    if address is None:
        if n == 1 and pid in (None, 0):
            return None  # an explicit single-process run
        if mode != "auto":
            raise ValueError(f"a multi-process run needs a coordinator address: set {addr_name} "
                             f"(host:port of process 0), or {ENV_MODE}=auto on TPU VMs / SLURM")
    else:
        address = str(address).strip()
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{addr_name} must be 'host:port', got {address!r}")
    if mode != "auto":
        missing = [name for name, v in ((n_name, n), (id_name, pid)) if v is None]
        if missing:
            raise ValueError(f"{addr_name}={address!r} is set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not")
    if n is not None and pid is not None and pid >= n:
        raise ValueError(f"{id_name}={pid} must be < {n_name}={n}")
    if n == 1 and mode != "auto":
        return None  # one process: nothing to coordinate
    kwargs = {k: v for k, v in (("coordinator_address", address), ("num_processes", n), ("process_id", pid),
                                ("local_device_ids", ids), ("heartbeat_timeout_seconds", heartbeat))
              if v is not None}
    return kwargs


def initialize(coordinator_address: str | None = None, num_processes: int | str | None = None,
               process_id: int | str | None = None,
               local_device_ids: int | str | Sequence[int] | None = None,
               heartbeat_timeout_seconds: int | str | None = None) -> bool:
    """Start jax's multi-process runtime if asked to (see the module doc); returns whether it did.

    Must run before the first jax computation or device query. Idempotent."""
    global _initialized
    kwargs = resolve(coordinator_address, num_processes, process_id, local_device_ids,
                     heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    if kwargs is None:
        return False
    import jax

    if _initialized or _jax_distributed_is_initialized():
        return True
    # Cross-process collectives on the CPU backend (a no-op for TPU/GPU clients). jax 0.10's
    # default is already 'gloo'; an explicit choice (e.g. 'mpi') is kept.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "auto")
    jax.distributed.initialize(**kwargs)
    _initialized = True
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def _jax_distributed_is_initialized() -> bool:
    try:
        from jax._src import distributed as _dist
        return _dist.global_state.client is not None
    except Exception:  # private API moved: rely on our own flag
        return False
