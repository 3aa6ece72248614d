"""Multi-process training on CPU: 2 processes x 2 devices train exactly like 1 process x 4 devices,
their checkpoints resume in a 1-process run, and each process feeds its slice of the same global batch.

The processes talk over loopback (jax.distributed + gloo CPU collectives). Every child runs under a
deadline and is killed (its whole process group) on timeout or when a sibling fails, so a hang in a
collective cannot stall CI.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from phijax import distributed
from phijax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 6   # the uninterrupted reference run
SPLIT_STEP = 4    # the 2-process run stops (and checkpoints) here; a 1-process run resumes to TOTAL_STEPS
DEADLINE_S = 240  # per launch (all processes of it)

SMALL = [
    "--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin",
    "--gin_param=phijax.PhiConfig.d_model = 64", "--gin_param=phijax.PhiConfig.n_layers = 2",
    "--gin_param=phijax.PhiConfig.n_heads = 4", "--gin_param=phijax.PhiConfig.head_dim = 16",
    "--gin_param=phijax.PhiConfig.rotary_dim = 8", "--gin_param=phijax.PhiConfig.d_mlp = 128",
    "--gin_param=DATA_SOURCE = 'synthetic'", "--gin_param=SEQ_LEN = 32", "--gin_param=BATCH_SIZE = 8",
    "--gin_param=phijax.optim.warmup_linear_decay.peak_lr = 3e-3",
    "--gin_param=phijax.optim.warmup_linear_decay.warmup_steps = 2",
    # The schedule spans TOTAL_STEPS in every run, so a run that stops early has the same lr per step.
    f"--gin_param=phijax.optim.warmup_linear_decay.total_steps = {TOTAL_STEPS}",
    "--gin_param=train.export_dtype = None", "--gin_param=train.log_every = 1",
    "--gin_param=train.mesh_shape = (-1, 1, 1)",  # 4 devices in both layouts
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices_per_process: int, process_id: int | None = None, num_processes: int = 1, port: int = 0):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIJAX_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    if process_id is not None:
        env.update(PHIJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", PHIJAX_NUM_PROCESSES=str(num_processes),
                   PHIJAX_PROCESS_ID=str(process_id))
    return env


def _kill(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the child's own session: it and anything it started
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def _launch(cmd, num_processes: int, devices_per_process: int, log_dir, name: str) -> list[tuple[str, str]]:
    """Runs `cmd` as `num_processes` cooperating processes; returns their (stdout, stderr) texts.

    Fails (after killing every process) if any exits non-zero or the deadline passes."""
    port = _free_port()
    procs, outs, logs = [], [], []
    try:
        for i in range(num_processes):
            env = _env(devices_per_process, i, num_processes, port) if num_processes > 1 else _env(devices_per_process)
            out_path = os.path.join(log_dir, f"{name}.{i}.out")
            outs.append(out_path)
            out = open(out_path, "w")
            err_path = os.path.join(log_dir, f"{name}.{i}.err")
            logs.append(err_path)
            with open(err_path, "w") as err:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err,
                                              start_new_session=True))
            out.close()
        deadline = time.time() + DEADLINE_S
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed or time.time() > deadline:
                _kill(procs)
                why = f"process {failed[0]} exited {codes[failed[0]]}" if failed else f"timed out after {DEADLINE_S}s"
                tails = "\n".join(f"--- {name} process {i} stderr ---\n{open(path).read()[-3000:]}"
                                  for i, path in enumerate(logs))
                pytest.fail(f"{name}: {why}\n{tails}")
            time.sleep(0.1)
    finally:
        _kill(procs)
    return [(open(o).read(), open(e).read()) for o, e in zip(outs, logs)]


def _train_cmd(model_dir, steps):
    return [sys.executable, "-m", "phijax.train", *SMALL, f"--gin_param=MODEL_DIR = '{model_dir}'",
            f"--gin_param=TRAIN_STEPS = {steps}"]


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _assert_same(got, want, steps):
    # Not bitwise: the cross-process (gloo) gradient all-reduce sums in another order than the
    # in-process one, so parameters drift by ~1e-8 and a loss may differ in its last float32 bit.
    for key in ("loss", "grad_norm", "lr"):
        a = np.array([got[s][key] for s in steps])
        b = np.array([want[s][key] for s in steps])
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, err_msg=f"{key} at steps {list(steps)}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(a) 1 process x 4 devices, TOTAL_STEPS uninterrupted steps (checkpoints every 2 steps, all
    kept: later tests start from them). Shared by the tests of this module."""
    d = tmp_path_factory.mktemp("one_process")
    _launch([*_train_cmd(d / "run", TOTAL_STEPS), "--gin_param=train.checkpoint_every = 2",
             "--gin_param=train.keep_checkpoints = None"], 1, 4, d, "ref")
    ref = _metrics(d / "run")
    assert sorted(ref) == list(range(1, TOTAL_STEPS + 1))
    return d / "run", ref


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(reference, tmp_path):
    split_dir = tmp_path / "two_then_one"
    _, ref = reference

    # (b) 2 processes x 2 devices (same 4-device mesh), stopping at SPLIT_STEP with a checkpoint.
    (out0, err0), (out1, err1) = _launch(_train_cmd(split_dir, SPLIT_STEP), 2, 2, tmp_path, "two")
    # Only jax.process_index() == 0 logs progress and prints the summary: the two really were
    # processes 0 and 1 of one job.
    assert f"step {SPLIT_STEP}/{SPLIT_STEP}" in err0 and f"step {SPLIT_STEP}/{SPLIT_STEP}" not in err1
    # ... checkpoint progress included (process 1 logs warnings and errors only once it knows its index).
    assert f"Checkpoint save for step {SPLIT_STEP}" in err0 and "INFO phijax.checkpoint" not in err1, err1[-2000:]
    assert "done: step" in out0 and "done: step" not in out1, (out0, out1)
    two = _metrics(split_dir)  # written by process 0 only
    assert sorted(two) == list(range(1, SPLIT_STEP + 1))
    _assert_same(two, ref, range(1, SPLIT_STEP + 1))
    assert (split_dir / "checkpoints" / str(SPLIT_STEP)).is_dir()

    # (c) 1 process x 4 devices resumes the 2-process checkpoint and continues like the reference.
    ((_, err),) = _launch(_train_cmd(split_dir, TOTAL_STEPS), 1, 4, tmp_path, "resume")
    assert f"resumed from step {SPLIT_STEP}" in err, err[-2000:]
    resumed = _metrics(split_dir)
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    _assert_same(resumed, ref, range(1, TOTAL_STEPS + 1))


# A 2-process run of the trainer's own batch path (data_source-style slicing -> to_global); each
# process saves what its devices hold, and the test reassembles the global batch from the shards.
_BATCH_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from phijax import distributed
    assert distributed.initialize()
    import jax
    from phijax import sharding, train_step
    from phijax.data import pipeline
    out, rules = sys.argv[1], [("batch", ("data", "fsdp")), ("activation_length", None)]
    mesh = sharding.make_mesh((-1, 1, 1))
    data = pipeline.make_batches("synthetic", seq_len=16, global_batch_size=8, seed=3, vocab_size=50,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    for step in (0, 5):
        local = data.local_batch(step)
        shard = train_step.batch_shardings(tuple(local), mesh, rules)
        batch = train_step.to_global(local, shard)
        total = jax.jit(lambda b: {k: v.astype("float32").sum() for k, v in b.items()})(batch)  # a collective
        pieces = {}
        for k, arr in batch.items():
            assert arr.shape == (8, 16), arr.shape
            for s in arr.addressable_shards:
                pieces[f"{k}|{s.index[0].start}"] = np.asarray(s.data)
            pieces[f"sum|{k}"] = np.asarray(total[k])
        np.savez(f"{out}/p{jax.process_index()}_s{step}.npz", **pieces)
""")


@pytest.mark.slow
def test_two_process_global_batch_is_the_one_process_batch(tmp_path):
    _launch([sys.executable, "-c", _BATCH_SCRIPT, str(tmp_path)], 2, 2, tmp_path, "batch")
    want = pipeline.make_batches("synthetic", seq_len=16, global_batch_size=8, seed=3, vocab_size=50)
    for step in (0, 5):
        expected = want.local_batch(step)  # 1 process: its local batch is the global batch
        got = {k: np.zeros_like(v) for k, v in expected.items()}
        seen = {k: set() for k in expected}
        for p in (0, 1):
            with np.load(tmp_path / f"p{p}_s{step}.npz") as z:
                for name in z.files:
                    k, where = name.split("|")
                    if k == "sum":
                        np.testing.assert_allclose(z[name], expected[where].astype(np.float32).sum(), rtol=1e-6)
                        continue
                    lo = int(where)
                    got[k][lo:lo + z[name].shape[0]] = z[name]
                    seen[k].update(range(lo, lo + z[name].shape[0]))
        for k in expected:
            assert seen[k] == set(range(8)), (k, seen[k])
            np.testing.assert_array_equal(got[k], expected[k], err_msg=f"{k} at step {step}")


@pytest.mark.parametrize("kind", ["synthetic", "windows"])
def test_process_slices_concatenate_to_the_single_process_batch(kind):
    windows = np.random.default_rng(0).integers(0, 300, (37, 17), dtype=np.int32)  # 37: steps cross epochs

    def make(pi, pc):
        if kind == "synthetic":
            return pipeline.SyntheticBatches(300, 16, 12, seed=5, process_index=pi, process_count=pc)
        return pipeline.WindowBatches(windows, 12, seed=5, process_index=pi, process_count=pc)

    one = make(0, 1)
    for pc in (2, 4):
        parts = [make(i, pc) for i in range(pc)]
        for step in (0, 1, 3, 7):
            want = one.local_batch(step)
            for k in want:
                np.testing.assert_array_equal(np.concatenate([p.local_batch(step)[k] for p in parts]), want[k])
                np.testing.assert_array_equal(one.global_batch(step)[k], want[k])
                assert all(p.global_batch(step)[k].tobytes() == want[k].tobytes() for p in parts)


# --- initialize(): when it starts jax.distributed, and its errors ---------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("PHIJAX_"):
            monkeypatch.delenv(var)
    return monkeypatch


def test_resolve_single_process_and_explicit(clean_env):
    assert distributed.resolve() is None
    assert distributed.resolve(num_processes=1, process_id=0) is None
    assert distributed.resolve("10.0.0.1:1234", 4, 2) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    clean_env.setenv("PHIJAX_COORDINATOR_ADDRESS", "host:99")
    clean_env.setenv("PHIJAX_NUM_PROCESSES", "2")
    clean_env.setenv("PHIJAX_PROCESS_ID", "1")
    assert distributed.resolve() == {"coordinator_address": "host:99", "num_processes": 2, "process_id": 1}
    assert distributed.resolve(process_id=0)["process_id"] == 0  # arguments win over the environment


def test_resolve_auto(clean_env):
    clean_env.setenv("PHIJAX_DISTRIBUTED", "auto")
    assert distributed.resolve() == {}
    clean_env.setenv("PHIJAX_DISTRIBUTED", "yes please")
    with pytest.raises(ValueError, match="PHIJAX_DISTRIBUTED"):
        distributed.resolve()


@pytest.mark.parametrize("kwargs, env, message", [
    ({"coordinator_address": "h:1"}, {}, "num_processes/PHIJAX_NUM_PROCESSES and process_id/PHIJAX_PROCESS_ID"),
    ({}, {"PHIJAX_COORDINATOR_ADDRESS": "h:1", "PHIJAX_PROCESS_ID": "0"}, "num_processes/PHIJAX_NUM_PROCESSES is"),
    ({"num_processes": 2, "process_id": 0}, {}, "coordinator_address/PHIJAX_COORDINATOR_ADDRESS"),
    ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, {}, "must be 'host:port'"),
    ({"coordinator_address": "h:1", "num_processes": "two", "process_id": 0}, {}, "num_processes/PHIJAX_NUM"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, "process_id/PHIJAX_PROCESS_ID=2 must be <"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, {}, "must be >= 1"),
])
def test_resolve_errors_name_the_setting(clean_env, kwargs, env, message):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.resolve(**kwargs)


def test_train_cli_rejects_incomplete_distributed_flags(clean_env, capsys, tmp_path):
    from phijax import train
    rc = train.main(["--coordinator_address=127.0.0.1:1", f"--gin_param=MODEL_DIR='{tmp_path}'"])
    assert rc == 2
    assert "num_processes/PHIJAX_NUM_PROCESSES and process_id/PHIJAX_PROCESS_ID are not" in capsys.readouterr().err


def test_resolve_heartbeat_timeout(clean_env):
    assert distributed.resolve("h:1", 2, 0, heartbeat_timeout_seconds=7)["heartbeat_timeout_seconds"] == 7
    clean_env.setenv("PHIJAX_HEARTBEAT_TIMEOUT_S", "12")
    assert distributed.resolve("h:1", 2, 0)["heartbeat_timeout_seconds"] == 12
    assert distributed.resolve() is None  # a single process has no heartbeat
    clean_env.setenv("PHIJAX_DISTRIBUTED", "auto")
    assert distributed.resolve() == {"heartbeat_timeout_seconds": 12}
    clean_env.setenv("PHIJAX_HEARTBEAT_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="heartbeat_timeout_seconds/PHIJAX_HEARTBEAT_TIMEOUT_S must be an integer"):
        distributed.resolve("h:1", 2, 0)


# --- a 1-process checkpoint in 2 processes; a killed process; resume after the kill -----------------
HEARTBEAT_S = 10


def _committed_steps(model_dir):
    d = model_dir / "checkpoints"
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if d.is_dir() else []


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_a_killed_process_is_detected_and_the_run_resumes(
        reference, tmp_path):
    ref_dir, ref = reference
    # The 1-process run as if it had stopped after step 2: its later checkpoints removed.
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    for step in _committed_steps(run):
        if step > 2:
            shutil.rmtree(run / "checkpoints" / str(step))

    # 2 processes resume it, checkpointing after every step synchronously (slow enough to be
    # killed mid-way); process 1 is SIGKILLed once step 3's checkpoint is committed.
    cmd = [*_train_cmd(run, TOTAL_STEPS), "--gin_param=train.checkpoint_every = 1",
           "--gin_param=train.async_checkpoint = False", "--gin_param=train.keep_checkpoints = None"]
    port = _free_port()
    procs, errs = [], []
    try:
        for i in range(2):
            env = {**_env(2, i, 2, port), "PHIJAX_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S)}
            errs.append(tmp_path / f"kill.{i}.err")
            with open(errs[-1], "w") as err:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                              start_new_session=True))
        deadline = time.time() + DEADLINE_S
        while 3 not in _committed_steps(run):
            assert all(p.poll() is None for p in procs), ([p.poll() for p in procs], errs[0].read_text()[-3000:])
            assert time.time() < deadline, "no checkpoint before the deadline"
            time.sleep(0.02)
        os.killpg(procs[1].pid, signal.SIGKILL)  # process 1 dies mid-run (preemption, OOM kill, ...)
        killed_at = time.time()
        try:
            rc = procs[0].wait(timeout=HEARTBEAT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still running {HEARTBEAT_S + 60}s after process 1 was killed")
        detect_s = time.time() - killed_at
    finally:
        _kill(procs)
    err0 = errs[0].read_text()
    assert "resumed from step 2" in err0, err0[-3000:]  # the 1-process checkpoint, in 2 processes
    print(f"process 0 exited {rc} {detect_s:.1f}s after process 1 was killed")
    assert rc != 0 and detect_s < HEARTBEAT_S + 30
    # phijax's message (a failed collective: exit 4 at once) or, had process 0 been waiting at a
    # barrier, jax's own (the coordination service saw process 1's heartbeats stop).
    assert ("another process of this job has probably died" in err0 and rc == 4) or \
        "JAX distributed service detected fatal errors" in err0, err0[-3000:]
    last = _committed_steps(run)[-1]
    assert 3 <= last < TOTAL_STEPS, _committed_steps(run)

    # Relaunching both processes resumes from the last committed checkpoint and reproduces the
    # uninterrupted run; metrics the killed run logged past that checkpoint are replaced.
    (_, err), _ = _launch(cmd, 2, 2, tmp_path, "relaunch")
    assert f"resumed from step {last}" in err, err[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # each step once
    _assert_same(_metrics(run), ref, range(1, TOTAL_STEPS + 1))
