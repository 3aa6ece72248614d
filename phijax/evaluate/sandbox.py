"""Run untrusted Python programs: hostile until proven otherwise.

    from phijax.evaluate import sandbox
    r = sandbox.run_program("assert 1 + 1 == 2", timeout_s=3)
    r.status, r.passed, r.stdout, r.wall_s, r.isolation
    results = sandbox.run_many([src1, src2, ...], workers=2, timeout_s=3)   # order preserved

Each program runs under its own supervisor process (forked by a per-process fork server,
`_supervisor.py`), in its own session and work directory (its cwd, HOME and TMPDIR), with a
scrubbed environment, wall and CPU time limits, RLIMIT_AS / RLIMIT_FSIZE / RLIMIT_NPROC, bounded
captured output, and everything it started killed at the end. Isolation, chosen once per process
by "auto" (the threat model is in docs/evaluation.md):

* "namespaces" (Linux with user namespaces): new mount, pid, net, ipc and uts namespaces, and a
  jail: pivot_root into a tmpfs holding read-only binds of only what the interpreter needs (its
  installation, the system libraries, /etc/ld.so.cache, a few /dev nodes) and the work dir
  /sandbox, a tmpfs capped at `max_disk_bytes` and `max_files` (no-exec); nothing else of the
  host exists there (no /tmp, /run, /var, home, no socket file); no network at all; its own
  /proc; no user namespaces of its own; when the harness is root the program runs as uid 65534
  in its own user namespace (so RLIMIT_NPROC counts this sandbox's processes only).
* "basic" (fallback, logged and reported): own session, a child-subreaper supervisor that kills
  every descendant, sockets disabled by a preamble inside the program, a work dir in the host's
  temp dir. Weaker: the program reads what its uid can read, only single files are capped.

A program *passes* only if it runs to its last statement: the runner writes a per-run token
to a private pipe after the program's code returns, so `os._exit(0)`, `sys.exit(0)` or a
killed interpreter before the end score "failed" although the exit code is 0. This defeats
early exits, not code that deliberately digs the token out of the runner's frame.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import inspect
import marshal
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterable, Sequence

SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_supervisor.py")

PASSED, FAILED, TIMEOUT, OUTPUT_LIMIT, ERROR = "passed", "failed", "timeout", "output_limit", "error"
ISOLATIONS = ("auto", "namespaces", "basic")
TRUNCATED = "\n[... output truncated at {} bytes]"

# Runs in the sandboxed interpreter before and after the program (argv: program path, token).
_RUNNER = r"""
import os, sys
_path, _token = sys.argv[1], sys.argv[2].encode()
del sys.argv[1:]
sys.argv[0] = _path
os.set_inheritable(3, False)
{preamble}
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
_globals = {{"__name__": "__main__", "__file__": _path, "__builtins__": __builtins__}}
del _f
exec(_code, _globals)
sys.stdout.flush()
sys.stderr.flush()
os.write(3, _token)
"""

# "basic" isolation only (namespaces give a network namespace with nothing in it).
_NO_SOCKETS = r"""
import socket as _socket_mod, _socket
def _no_network(*a, **k):
    raise PermissionError("network access is disabled in the sandbox")
class _NoSocket(_socket_mod.socket):
    def __init__(self, *a, **k):
        _no_network()
for _m in (_socket_mod, _socket):
    _m.socket = _NoSocket
    _m.socketpair = _m.fromfd = _no_network
_socket_mod.create_connection = _socket_mod.create_server = _no_network
del _m
"""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """One program's outcome. `status` is one of PASSED, FAILED, TIMEOUT (wall or CPU time),
    OUTPUT_LIMIT, ERROR (the sandbox itself could not run it); only PASSED is a pass.
    `returncode` is the program's exit code, negative for a signal, None when it was killed
    by the supervisor. `reason` is a short human-readable line (also for FAILED)."""
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    reason: str
    isolation: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def _validate(timeout_s, cpu_s, memory_bytes, max_output_bytes, max_processes, max_file_bytes, isolation,
              max_disk_bytes, max_files):
    problems = []
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0 and math.isfinite(timeout_s)):
        problems.append(f"timeout_s={timeout_s!r} must be a positive number")
    if cpu_s is not None and not (isinstance(cpu_s, (int, float)) and cpu_s > 0):
        problems.append(f"cpu_s={cpu_s!r} must be a positive number or None")
    for name, v, lo in (("memory_bytes", memory_bytes, 64 << 20), ("max_output_bytes", max_output_bytes, 1),
                        ("max_processes", max_processes, 1), ("max_file_bytes", max_file_bytes, 0),
                        ("max_disk_bytes", max_disk_bytes, 0), ("max_files", max_files, 1)):
        if not isinstance(v, int) or v < lo:
            problems.append(f"{name}={v!r} must be an int >= {lo}")
    if isolation not in ISOLATIONS:
        problems.append(f"isolation={isolation!r} must be one of {ISOLATIONS}")
    if problems:
        raise ValueError("invalid sandbox limits: " + "; ".join(problems))


_python_info_lock = threading.Lock()
_python_info_cache: dict[str, tuple[str, str, tuple[str, ...]]] = {}

# Imported by the probe so that the libraries they load are found (and bound into the jail).
_PROBE_MODULES = ("_ctypes", "_ssl", "_hashlib", "zlib", "_bz2", "_lzma", "_sqlite3", "_decimal", "_uuid",
                  "pyexpat", "readline", "_curses", "_dbm", "_gdbm", "_multiprocessing", "_posixshmem")
_PROBE = f"""
import sys
for m in {_PROBE_MODULES!r}:
    try:
        __import__(m)
    except Exception:
        pass
print('--phijax-probe--')
print(sys._base_executable)
print(sys.base_prefix)
try:
    with open('/proc/self/maps') as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith('/'):
                print(parts[5].rstrip('\\n'))
except OSError:
    pass
"""


def _python_info(python: str) -> tuple[str, str, tuple[str, ...]]:
    """(real interpreter path, its base prefix, the shared objects it loads), from one run of the
    base interpreter (per process and interpreter). The program runs that base interpreter
    with -S: the standard library only, no site-packages (so nothing a venv holds can be
    imported or written)."""
    with _python_info_lock:
        if python not in _python_info_cache:
            exe = sys._base_executable if python == sys.executable else python
            out = subprocess.run([exe, "-I", "-S", "-c", _PROBE], capture_output=True, text=True, timeout=60,
                                 check=True, stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            out = out.stdout.split("--phijax-probe--\n", 1)[1].split("\n")
            libs = tuple(sorted({os.path.realpath(p) for p in out[2:] if p and os.path.isfile(p)}))
            _python_info_cache[python] = (os.path.realpath(out[0]), os.path.realpath(out[1]), libs)
        return _python_info_cache[python]


# The jail (namespaces isolation): what exists in the program's root, everything read-only but
# its work dir. System directories are bound whole (a symlinked one, as /lib -> usr/lib on a
# merged-/usr system, is the same symlink); the interpreter's installation, and the directory of
# any library it loads from elsewhere, at their own paths.
JAIL_WORK = "/sandbox"  # the program's cwd, HOME and TMPDIR (a tmpfs); there is no /tmp
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_JAIL_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/zero", "/dev/full", "/dev/random",
               "/dev/urandom")
_DEV_LINKS = (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"), ("/dev/stdout", "/proc/self/fd/1"),
              ("/dev/stderr", "/proc/self/fd/2"))
_jail_cache: dict[str, list] = {}


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _jail_ops(python: str) -> list:
    """The jail's contents for `python`, as (kind, path[, target]) steps for the supervisor:
    "dir", "bind" (a directory tree), "file" (a file or device node), "symlink"."""
    with _python_info_lock:
        if python in _jail_cache:
            return _jail_cache[python]
    exe, prefix, libs = _python_info(python)
    ops, bound = [("dir", "/proc"), ("dir", "/dev")], []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            ops.append(("symlink", d, os.readlink(d)))
        elif os.path.isdir(d):
            ops.append(("bind", d))
            bound.append(os.path.realpath(d))
    # never bind these whole: a library found there is bound alone (a host temp or home dir
    # holds sockets and private files)
    private = {"/", os.path.realpath(tempfile.gettempdir()), "/tmp", "/run", "/var", "/var/run", "/home", "/root",
               os.path.realpath(os.path.expanduser("~"))}
    for path in sorted({prefix, os.path.dirname(exe)} | {os.path.dirname(p) for p in libs}, key=len):
        if _under(path, bound):
            continue
        if path in private or _under(tempfile.gettempdir(), [path]):
            continue
        ops.append(("bind", path))
        bound.append(path)
    for lib in libs:
        if not _under(lib, bound):
            ops.append(("file", lib))
    for f in _JAIL_FILES:
        if os.path.islink(f) and f.startswith("/etc/"):
            ops.append(("symlink", f, os.readlink(f)))
        elif os.path.exists(f):
            ops.append(("file", f))
    ops.extend(("symlink", link, target) for link, target in _DEV_LINKS)
    with _python_info_lock:
        _jail_cache[python] = ops
    return ops


_auto_lock = threading.Lock()
_auto_isolation: str | None = None   # decided by the first "auto" run, then reused
_auto_reason: str | None = None


def isolation_in_use() -> tuple[str | None, str | None]:
    """("namespaces" | "basic" | None if not decided yet, why namespaces were not available)."""
    return _auto_isolation, _auto_reason


def _env(work: str, hash_seed: int | None) -> dict[str, str]:
    """The whole environment the program sees: nothing is inherited from the parent."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work,
           "TMPDIR": work, "PYTHONIOENCODING": "utf-8"}
    if hash_seed is not None:  # determinism: the same program prints sets in the same order
        env["PYTHONHASHSEED"] = str(hash_seed)
    return env


def run_program(source: str, *, timeout_s: float = 10.0, cpu_s: float | None = None,
                memory_bytes: int = 2 << 30, max_output_bytes: int = 1 << 20, max_processes: int = 16,
                max_file_bytes: int = 16 << 20, max_disk_bytes: int = 64 << 20, max_files: int = 4096,
                python: str = sys.executable, isolation: str = "auto", hash_seed: int | None = 0) -> ExecResult:
    """Run `source` as a Python program in the sandbox; never raises for anything the program
    does. Limits: `timeout_s` wall clock (the program is killed, status TIMEOUT); `cpu_s` CPU
    seconds (default: timeout_s); `memory_bytes` address space; `max_output_bytes` per stream
    (past it the program is killed, status OUTPUT_LIMIT); `max_processes` processes and threads
    including itself; `max_file_bytes` per written file; `max_disk_bytes` and `max_files` in all
    (the work dir is a tmpfs of that size and inode count: past it writes fail with ENOSPC;
    namespaces isolation only). `hash_seed` fixes PYTHONHASHSEED (None: random, as a plain
    interpreter)."""
    _validate(timeout_s, cpu_s, memory_bytes, max_output_bytes, max_processes, max_file_bytes, isolation,
              max_disk_bytes, max_files)
    args = (timeout_s, cpu_s, memory_bytes, max_output_bytes, max_processes, max_file_bytes, python, hash_seed,
            max_disk_bytes, max_files)
    global _auto_isolation, _auto_reason
    if isolation == "auto":
        with _auto_lock:
            decided = _auto_isolation
        if decided is None:
            r = _run_once(source, "namespaces", *args)
            if r.status == ERROR and r.reason.startswith(("namespaces isolation unavailable", "sandbox init")):
                with _auto_lock:
                    _auto_isolation, _auto_reason = "basic", r.reason
                logging.getLogger("phijax.sandbox").warning(
                    "sandbox: %s; falling back to the weaker 'basic' isolation: the program can read what the "
                    "harness's uid can read and connect to Unix sockets through ctypes, and only single files "
                    "are size-capped (docs/evaluation.md)", r.reason)
                decided = "basic"
            else:
                if r.status != ERROR:  # another error (no fork server, ...) decides nothing
                    with _auto_lock:
                        _auto_isolation = "namespaces"
                return r
        isolation = decided
    return _run_once(source, isolation, *args)


def describe_isolation(isolation: str | None = None) -> str:
    """One line on what `isolation` (default: the one "auto" chose) protects, for reports."""
    isolation = isolation or _auto_isolation
    if isolation == "namespaces":
        return ("namespaces: pivot_root jail (read-only interpreter and system libraries only, no host /tmp, /run, "
                "/var or home), tmpfs work dir capped in bytes and files, no network, own pid/ipc/uts namespaces")
    if isolation == "basic":
        why = f" ({_auto_reason})" if _auto_reason and _auto_isolation == "basic" else ""
        return (f"basic fallback{why}: own session, rlimits, scrubbed environment, sockets blocked in Python only; "
                "the host filesystem is readable as the program's uid and only single files are size-capped")
    return "not decided yet"


def _rmtree(path):
    def retry(func, p, _exc):  # the program may have chmod'ed its own files
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        except OSError:
            pass
        func(p)
    try:
        shutil.rmtree(path, onerror=retry)
    except OSError:
        pass


def _run_once(source, isolation, timeout_s, cpu_s, memory_bytes, max_output_bytes, max_processes,
              max_file_bytes, python, hash_seed, max_disk_bytes, max_files) -> ExecResult:
    exe, prefix, _ = _python_info(python)
    # The harness's per-program directory: in the namespaces mode it holds program.py for the
    # supervisor to copy into the jail, and is where the jail's root is mounted (in the
    # sandbox's own mount namespace: on the host it stays as it is); in the basic mode its
    # work/ subdirectory is the program's work dir.
    root_dir = tempfile.mkdtemp(prefix="phijax-sandbox-")
    if isolation == "namespaces":
        work = JAIL_WORK
        program = os.path.join(root_dir, "program.py")
    else:
        os.chmod(root_dir, 0o755)
        work = os.path.join(root_dir, "work")
        os.mkdir(work, 0o700)
        program = os.path.join(work, "program.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(source)
    if isolation == "basic" and os.geteuid() == 0:  # the program may run as uid 65534: its work dir only
        for p in (work, program):
            os.chown(p, 65534, 65534)
    token = secrets.token_hex(16)
    preamble = _NO_SOCKETS if isolation == "basic" else ""
    argv = [exe, "-s", "-S", "-B", "-P", "-c", _RUNNER.format(preamble=preamble), "program.py", token]
    env = _env(work, hash_seed)
    cfg = {"argv": argv, "env": env, "work": work, "root_dir": root_dir, "python_prefix": prefix,
           "isolation": isolation, "token": token, "timeout_s": float(timeout_s),
           "cpu_s": int(math.ceil(cpu_s if cpu_s is not None else timeout_s)), "memory_bytes": memory_bytes,
           "max_file_bytes": max_file_bytes, "max_processes": max_processes}
    if isolation == "namespaces":
        # program.py and the tmpfs's own bookkeeping come on top of what the program may write
        cfg.update(jail=_jail_ops(python), disk_bytes=max_disk_bytes + len(source.encode()) + (64 << 10),
                   disk_inodes=max_files + 2)
    pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, status
    t0 = time.monotonic()
    try:
        try:
            pid = _server().start(cfg, [w for _, w in pipes])
        except OSError:  # the fork server died (killed from outside?): one fresh try
            _reset_server()
            pid = _server().start(cfg, [w for _, w in pipes])
    except OSError as e:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        _rmtree(root_dir)
        return ExecResult(ERROR, None, "", "", 0.0, f"cannot start the sandbox supervisor: {e}", isolation)
    for _, w in pipes:
        os.close(w)
    (out_r, _), (err_r, _), (status_r, _) = pipes
    try:
        out, err, over = _collect(pid, out_r, err_r, max_output_bytes, deadline=t0 + timeout_s + 10.0)
        status = _read_all(status_r, deadline=t0 + timeout_s + 12.0)
        wall = time.monotonic() - t0
    finally:
        for fd in (out_r, err_r, status_r):
            os.close(fd)
        _rmtree(root_dir)
    return _result(status, out, err, over, wall, isolation, max_output_bytes, timeout_s)


class _ForkServer:
    """The `_supervisor.py` fork server of this process (see its docstring)."""

    def __init__(self):
        import socket
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", SUPERVISOR, str(theirs.fileno())],
                                     stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                                     env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
        theirs.close()
        self.sock, self.pid, self.lock = ours, os.getpid(), threading.Lock()

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.proc.poll() is None

    def start(self, cfg: dict, fds: list[int]) -> int:
        """Fork a supervisor for `cfg` with (stdout, stderr, status) = fds; its pid."""
        import socket
        with self.lock:
            socket.send_fds(self.sock, [marshal.dumps(cfg)], fds)
            reply = self.sock.recv(8)
        if len(reply) != 8:
            raise OSError("the sandbox fork server exited")
        return int.from_bytes(reply, "little", signed=True)

    def close(self):
        self.sock.close()
        self.proc.wait()


_server_lock = threading.Lock()
_server_instance: _ForkServer | None = None


def _server() -> _ForkServer:
    global _server_instance
    with _server_lock:
        if _server_instance is None or not _server_instance.alive():
            _server_instance = _ForkServer()
        return _server_instance


def _reset_server():
    global _server_instance
    with _server_lock:
        _server_instance = None


def _read_all(fd: int, deadline: float) -> bytes:
    """Everything until EOF (the supervisor writes its status, then exits)."""
    chunks = []
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=max(deadline - time.monotonic(), 0)):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    return b"".join(chunks)


def _kill_group(pid: int):
    try:
        os.killpg(pid, signal.SIGKILL)  # the supervisor's death takes its pid-1 child along
    except (ProcessLookupError, PermissionError):
        pass


def _collect(pid, out_fd, err_fd, cap, deadline):
    """Read stdout/stderr as they come, keeping at most `cap` bytes of each. Past the cap the
    supervisor `pid` is asked to kill the program; past `deadline` (the supervisor itself stuck)
    it is killed. Returns (stdout bytes, stderr bytes, which streams overflowed)."""
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    over = set()
    asked = False
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                _kill_group(pid)
                over.add("deadline")
                break
            for key, _ in sel.select(timeout=min(left, 1.0)):
                try:
                    chunk = os.read(key.fileobj, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                room = cap - len(buf)
                if len(chunk) > room:
                    buf += chunk[:max(room, 0)]
                    over.add(key.fileobj)
                    if not asked:
                        asked = True
                        try:
                            os.kill(pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
                else:
                    buf += chunk
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), {
        "stdout" if s == out_fd else "stderr" if s == err_fd else s for s in over}


def _result(status, out, err, over, wall, isolation, cap, timeout_s) -> ExecResult:
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    trunc_out, trunc_err = "stdout" in over, "stderr" in over
    if trunc_out:
        stdout += TRUNCATED.format(cap)
    if trunc_err:
        stderr += TRUNCATED.format(cap)

    def res(status, rc, reason, iso=isolation):
        return ExecResult(status, rc, stdout, stderr, wall, reason, iso, trunc_out, trunc_err)

    if "deadline" in over:
        return res(TIMEOUT, None, f"timed out (supervisor unresponsive after {wall:.1f} s)")
    try:
        st = marshal.loads(status)
    except (EOFError, ValueError, TypeError):
        return res(ERROR, None, f"sandbox supervisor failed: {stderr.strip()[-500:] or 'no status'}")
    iso = st.get("isolation") or isolation
    if st.get("setup_error") and st.get("returncode") is None and not st.get("killed"):
        return res(ERROR, None, st["setup_error"], iso)
    rc = st.get("returncode")
    if trunc_out or trunc_err:
        return res(OUTPUT_LIMIT, rc, f"output over the {cap}-byte limit", iso)
    if st.get("killed") == "timeout":
        return res(TIMEOUT, rc, f"timed out after {timeout_s:g} s", iso)
    if rc == -signal.SIGXCPU:
        return res(TIMEOUT, rc, "CPU time limit exceeded", iso)
    if rc == 127 and "sandbox: cannot start program" in stderr:
        return res(ERROR, rc, stderr.strip().splitlines()[-1], iso)
    if st.get("setup_error"):
        return res(ERROR, rc, st["setup_error"], iso)
    if rc == 0 and st.get("completed"):
        return res(PASSED, 0, "passed", iso)
    if rc == 0:
        return res(FAILED, 0, "exited before the end of the program (os._exit / sys.exit)", iso)
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        return res(FAILED, rc, f"killed by {name}", iso)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return res(FAILED, rc, f"exit code {rc}" + (f": {last[:300]}" if last else ""), iso)


def run_many(sources: Sequence[str] | Iterable[str], *, workers: int | None = None, **limits) -> list[ExecResult]:
    """run_program over `sources` on `workers` threads (default: CPU count), results in input order."""
    sources = list(sources)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be a positive int")
    # run_program's own defaults, so that the limits are written once (its signature)
    given = {**{k: p.default for k, p in inspect.signature(run_program).parameters.items()
                if p.kind is p.KEYWORD_ONLY}, **limits}
    _validate(**{k: given[k] for k in inspect.signature(_validate).parameters})
    if not sources:
        return []
    first = []
    if limits.get("isolation", "auto") == "auto" and _auto_isolation is None:
        first = [run_program(sources[0], **limits)]  # decides "auto" isolation once, before the pool
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return first + list(pool.map(lambda s: run_program(s, **limits), sources[len(first):]))
