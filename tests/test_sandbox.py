"""The execution sandbox against hostile programs: each must end in bounded time, score as not
passed, leave no process behind and change nothing outside its directory.

All hostile programs run at once (one thread each) in a module fixture, so the file takes about
one timeout; the tests then check one case each.
"""
import concurrent.futures
import os
import socket
import sys
import tempfile
import threading
import time
import uuid

import pytest

from phijax.evaluate import execution, sandbox

TIMEOUT = 2.5
MEMORY_BOMB_TIMEOUT = 4 * TIMEOUT
SECRET = f"sk-phijax-test-{uuid.uuid4().hex}"
MARK = f"phijax-leftover-{uuid.uuid4().hex}"  # in the argv of every process a case leaves around


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def _sleeper(mark):
    return f"[sys.executable, '-c', 'import time; time.sleep(60)', {mark!r}]"


def _cases(canary_dir, canary, outside_new, port):
    m = MARK
    return {
        "infinite_loop": ("while True:\n    pass\n", {}),
        "fork_bomb": (
            # every process past the first re-execs with MARK in its argv, to be found later
            "import os, sys\n"
            "bomb = 'import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass\\n'\n"
            "while True:\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            f"            os.execv(sys.executable, [sys.executable, '-c', bomb, {m + '-fork'!r}])\n"
            "    except OSError:\n"
            "        pass\n", {"max_processes": 8}),
        "process_limit": (
            "import os, time\nn = 0\nwhile n < 100:\n    try:\n        pid = os.fork()\n    except OSError as e:\n"
            "        print('forks', n, e.errno)\n        break\n    if pid == 0:\n        time.sleep(30)\n"
            "        os._exit(0)\n    n += 1\nassert False\n", {"max_processes": 8}),
        # Its own wall limit: it copies ≈ 256 MB before the cap stops it, while every other case of
        # the wave starts up beside it (and on CI another test worker shares the 2 cores); 2.5 s was
        # once not enough there. The point is the MemoryError, not the clock.
        "memory_bomb": ("s = b'x' * (1 << 20)\nwhile True:\n    s = s + s\n",
                        {"memory_bytes": 256 << 20, "timeout_s": MEMORY_BOMB_TIMEOUT}),
        "huge_stdout": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", {"max_output_bytes": 100_000}),
        "huge_stderr": ("import os\nwhile True:\n    os.write(2, b'y' * 65536)\n", {"max_output_bytes": 100_000}),
        "os_exit_0": ("import os\nos._exit(0)\nassert False, 'never reached'\n", {}),
        "sys_exit_0": ("import sys\nsys.exit(0)\n", {}),
        "forged_done_fd": ("import os\nos.write(3, b'0' * 32)\nos._exit(0)\n", {}),
        "kill_parent": (
            "import os, signal, time\n"
            "for target in (os.getppid(), 1):\n"
            "    try:\n"
            "        os.kill(target, signal.SIGKILL)\n"
            "    except OSError:\n"
            "        pass\n"
            "if os.getpid() < 10:  # only inside a pid namespace: kill(-1) there reaches the sandbox only\n"
            "    try:\n"
            "        os.kill(-1, signal.SIGKILL)\n"
            "    except OSError:\n"
            "        pass\n"
            "time.sleep(0.2)\n"
            "os._exit(0)\n", {}),
        "kill_own_group": ("import os, signal\nos.killpg(0, signal.SIGKILL)\n", {}),
        "files_outside": (
            "import os, shutil\n"
            "escaped = []\n"
            f"for name, act in [('remove', lambda: os.remove({canary!r})),\n"
            f"                  ('overwrite', lambda: open({canary!r}, 'w').write('pwned')),\n"
            f"                  ('create', lambda: open(os.path.join({canary_dir!r}, 'new'), 'w').write('x')),\n"
            f"                  ('tmp', lambda: open({outside_new!r}, 'w').write('x')),\n"
            f"                  ('rmtree', lambda: shutil.rmtree({canary_dir!r}))]:\n"
            "    try:\n"
            "        act()\n"
            "        escaped.append(name)\n"
            "    except OSError as e:\n"
            "        print(name, type(e).__name__, e.errno)\n"
            "assert escaped, 'nothing outside the work dir could be changed'\n", {}),
        "env_secrets": (
            "import os\n"
            "found = [k for k, v in os.environ.items() if 'sk-phijax' in v or 'KEY' in k or 'TOKEN' in k]\n"
            "for pid in os.listdir('/proc'):\n"
            "    for what in ('environ', 'cmdline'):\n"
            "        try:\n"
            "            if b'sk-phijax' in open(f'/proc/{pid}/{what}', 'rb').read():\n"
            "                found.append(pid)\n"
            "        except OSError:\n"
            "            pass\n"
            "print(sorted(os.environ), found)\n"
            "assert found, 'no secret visible'\n", {}),
        "socket": (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'pwned')\n", {}),
        "signal_handlers": (
            "import signal\n"
            "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM, signal.SIGXCPU):\n"
            "    signal.signal(s, signal.SIG_IGN)\n"
            "while True:\n"
            "    pass\n", {}),
        "recursion": ("def f(n):\n    return f(n + 1) + 1\nf(0)\n", {}),
        "deep_recursion": (  # no RecursionError: frames grow until MemoryError (or the clock)
            "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n",
            {"memory_bytes": 256 << 20}),
        "daemon_grandchild": (
            "import os, sys, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, {_sleeper(m + '-daemon')})\n"
            "    os._exit(0)\n"
            "time.sleep(0.5)\n"
            "assert False, 'the daemon is what this case is about'\n", {}),
        "daemon_on_timeout": (
            "import os, sys\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            f"    os.execv(sys.executable, {_sleeper(m + '-timeout')})\n"
            "while True:\n"
            "    pass\n", {}),
    }


# Cases that run until the wall clock stops them; the others end by themselves and run first,
# so the CPU burners do not starve them on a small machine.
BURNERS = ("infinite_loop", "fork_bomb", "signal_handlers", "daemon_on_timeout", "deep_recursion", "loop")


def _run_all(cases, **common):
    results = {}
    for wave in ([n for n in cases if n not in BURNERS], [n for n in cases if n in BURNERS]):
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(len(wave), 1)) as pool:
            futs = {name: pool.submit(sandbox.run_program, cases[name][0],
                                      **{"timeout_s": TIMEOUT, **common, **cases[name][1]}) for name in wave}
            results.update({name: f.result() for name, f in futs.items()})
    return results


@pytest.fixture(scope="module")
def hostile():
    canary_dir = tempfile.mkdtemp(prefix="phijax-canary-")
    os.chmod(canary_dir, 0o777)  # world-writable: only the sandbox's read-only view protects it
    canary = os.path.join(canary_dir, "canary.txt")
    with open(canary, "w") as f:
        f.write("canary")
    os.chmod(canary, 0o666)
    outside_new = os.path.join(tempfile.gettempdir(), f"phijax-escape-{uuid.uuid4().hex}")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    old = {k: os.environ.get(k) for k in ("OPENAI_API_KEY", "HF_TOKEN")}
    os.environ["OPENAI_API_KEY"] = SECRET
    os.environ["HF_TOKEN"] = SECRET
    try:
        t0 = time.monotonic()
        results = _run_all(_cases(canary_dir, canary, outside_new, listener.getsockname()[1]))
        total = time.monotonic() - t0
        listener.settimeout(0.3)
        try:
            conn, _ = listener.accept()
            accepted = conn.recv(100) or b"<connected>"
        except (socket.timeout, OSError):
            accepted = None
        yield {"results": results, "total": total, "canary_dir": canary_dir, "canary": canary,
               "outside_new": outside_new, "accepted": accepted}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        listener.close()
        import shutil
        shutil.rmtree(canary_dir, ignore_errors=True)
        if os.path.exists(outside_new):
            os.remove(outside_new)


def test_isolation_is_namespaces_here(hostile):
    # This machine allows user namespaces; the hostile cases below ran fully isolated.
    assert {r.isolation for r in hostile["results"].values()} == {"namespaces"}


def test_every_case_fails_in_bounded_time(hostile):
    res = hostile["results"]
    for name, r in res.items():
        assert r.status != sandbox.PASSED, (name, r)
        assert r.status != sandbox.ERROR, (name, r)
        assert r.wall_s < (MEMORY_BOMB_TIMEOUT if name == "memory_bomb" else TIMEOUT) + 3, (name, r.wall_s)
    # two concurrent waves: the batch took about two timeouts, not the sum
    assert hostile["total"] < 2 * TIMEOUT + 8


@pytest.mark.parametrize("name,status", [
    ("infinite_loop", sandbox.TIMEOUT), ("fork_bomb", sandbox.TIMEOUT), ("signal_handlers", sandbox.TIMEOUT),
    ("daemon_on_timeout", sandbox.TIMEOUT), ("memory_bomb", sandbox.FAILED), ("huge_stdout", sandbox.OUTPUT_LIMIT),
    ("huge_stderr", sandbox.OUTPUT_LIMIT), ("os_exit_0", sandbox.FAILED), ("process_limit", sandbox.FAILED), ("sys_exit_0", sandbox.FAILED),
    ("forged_done_fd", sandbox.FAILED), ("kill_parent", sandbox.FAILED), ("kill_own_group", sandbox.FAILED),
    ("files_outside", sandbox.FAILED), ("env_secrets", sandbox.FAILED), ("socket", sandbox.FAILED),
    ("recursion", sandbox.FAILED),
    ("daemon_grandchild", sandbox.FAILED)])
def test_case_status(hostile, name, status):
    assert hostile["results"][name].status == status, hostile["results"][name]


def test_details(hostile):
    res = hostile["results"]
    assert res["process_limit"].stdout.split() == ["forks", "7", "11"]  # 8 with itself; EAGAIN
    assert "MemoryError" in res["memory_bomb"].stderr
    assert res["os_exit_0"].returncode == 0 and "before the end" in res["os_exit_0"].reason
    assert res["kill_own_group"].returncode == -9
    assert "RecursionError" in res["recursion"].stderr
    assert res["deep_recursion"].status in (sandbox.FAILED, sandbox.TIMEOUT)
    for name in ("huge_stdout", "huge_stderr"):
        r = res[name]
        stream = r.stdout if name == "huge_stdout" else r.stderr
        assert len(stream) <= 100_000 + 100 and stream.endswith("truncated at 100000 bytes]")
        assert r.wall_s < TIMEOUT, "the flood is cut at the cap, not at the wall clock"


def test_no_process_left_behind(hostile):
    assert hostile["results"]
    deadline = time.monotonic() + 2
    while _processes_with(MARK) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(MARK) == []


def test_nothing_outside_changed(hostile):
    with open(hostile["canary"]) as f:
        assert f.read() == "canary"
    assert os.listdir(hostile["canary_dir"]) == ["canary.txt"]
    assert not os.path.exists(hostile["outside_new"])
    # every attempt failed, not for lack of trying: the host paths are not in the jail (ENOENT = 2;
    # read-only EROFS = 30 where a path is, as with the old read-only view of the host)
    out = hostile["results"]["files_outside"].stdout.split("\n")
    assert [line.split()[0] for line in out if line] == ["remove", "overwrite", "create", "tmp", "rmtree"]
    assert all(line.split()[-1] in ("2", "30") for line in out if line), out


def test_no_secret_reaches_the_program(hostile):
    r = hostile["results"]["env_secrets"]
    assert SECRET not in r.stdout + r.stderr
    assert "OPENAI_API_KEY" not in r.stdout and "HF_TOKEN" not in r.stdout
    assert "PATH" in r.stdout  # the program did print its environment


def test_no_network(hostile):
    r = hostile["results"]["socket"]
    assert hostile["accepted"] is None
    assert "OSError" in r.stderr or "Error" in r.stderr


def test_harness_survives_and_still_runs(hostile):
    assert hostile["results"]
    r = sandbox.run_program("import os\nopen('own.txt', 'w').write('ok')\nassert open('own.txt').read() == 'ok'\n"
                            "print(os.getcwd())\n", timeout_s=TIMEOUT)
    assert r.status == sandbox.PASSED, r
    assert not os.path.exists(r.stdout.strip()), "the work dir is removed afterwards"


def test_run_many_keeps_order_and_is_deterministic():
    srcs = [f"print({i} * 7)\n" + ("" if i % 3 else "raise SystemExit(3)\n") for i in range(9)]
    srcs.append("print(list({'apple', 'pear', 'fig', 'kiwi'}))\n")
    a = sandbox.run_many(srcs, workers=3, timeout_s=TIMEOUT)
    b = sandbox.run_many(srcs, workers=2, timeout_s=TIMEOUT)
    assert [r.stdout for r in a[:9]] == [f"{i * 7}\n" for i in range(9)]
    assert [r.status for r in a[:9]] == [sandbox.FAILED if i % 3 == 0 else sandbox.PASSED for i in range(9)]
    assert [r.returncode for r in a[:9:3]] == [3, 3, 3]
    assert [(r.status, r.stdout) for r in a] == [(r.status, r.stdout) for r in b]  # PYTHONHASHSEED fixed


def test_basic_isolation_fallback():
    """The fallback (no namespaces) still kills daemons, scrubs the environment, blocks sockets
    in Python and catches early exits."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    mark = MARK + "-basic"
    cases = {
        "daemon": ("import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n"
                   f"    os.execv(sys.executable, {_sleeper(mark)})\ntime.sleep(0.3)\n", {}),
        "loop": ("while True:\n    pass\n", {}),
        "socket": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", {}),
        "env": ("import os\nassert not any('KEY' in k or 'TOKEN' in k for k in os.environ)\n", {}),
        "exit": ("import os\nos._exit(0)\n", {}),
    }
    os.environ["OPENAI_API_KEY"] = SECRET
    try:
        res = _run_all(cases, isolation="basic")
    finally:
        os.environ.pop("OPENAI_API_KEY", None)
        listener.close()
    assert {r.isolation for r in res.values()} == {"basic"}
    assert res["daemon"].status == sandbox.PASSED and _processes_with(mark) == []
    assert res["loop"].status == sandbox.TIMEOUT and res["loop"].wall_s < TIMEOUT + 3
    assert res["socket"].status == sandbox.FAILED and "network access is disabled" in res["socket"].stderr
    assert res["env"].status == sandbox.PASSED
    assert res["exit"].status == sandbox.FAILED
    assert "fallback" in sandbox.describe_isolation("basic") and "readable" in sandbox.describe_isolation("basic")


def test_bad_limits_are_rejected():
    for kw in ({"timeout_s": 0}, {"memory_bytes": 10}, {"max_processes": 0}, {"isolation": "docker"},
               {"cpu_s": -1}, {"max_disk_bytes": -1}, {"max_files": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            sandbox.run_program("pass", **kw)
    with pytest.raises(ValueError, match="workers"):
        sandbox.run_many(["pass"], workers=0)


def test_python_argument_is_used():
    r = sandbox.run_program("import sys\nprint(sys.version_info[:2])\n", python=sys.executable, timeout_s=TIMEOUT)
    assert r.status == sandbox.PASSED and r.stdout.strip() == str(tuple(sys.version_info[:2]))


# --- The jail (issue 14): nothing of the host's filesystem but what the interpreter needs ---------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534


def _unix_listener(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    s.setblocking(False)
    return s


def _accepted(listener):
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, OSError):
        return None
    conn.settimeout(0.5)
    try:
        return conn.recv(100) or b"<connected>"
    except OSError:
        return b"<connected>"
    finally:
        conn.close()


_CONNECT = r"""
import errno, socket, sys
reached, seen = [], []
for path in PATHS:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.sendall(b'pwned')
        reached.append(path)
    except OSError as e:
        seen.append(errno.errorcode.get(e.errno, str(e.errno)))
print(*seen)
assert reached, 'no socket reached'
"""

_READ = r"""
import os
got = []
for path in PATHS:
    try:
        with open(path) as f:
            got.append(f.read())
    except OSError as e:
        print(type(e).__name__)
print('visible:', [p for p in SHOWN if os.path.exists(p)])
print('home:', sorted(os.listdir(HOME)) if os.path.isdir(HOME) else None)
raise RuntimeError('read: ' + ' '.join(got))   # what it read would come back as 'failed: ...'
"""


def _program(template, **names):
    return "".join(f"{k} = {v!r}\n" for k, v in names.items()) + template


def test_unix_sockets_on_the_filesystem_are_unreachable():
    """A socket file is reachable through a read-only mount (connect() is not a write) and a
    network namespace only isolates abstract sockets: D-Bus, docker.sock, an ssh-agent. The
    listeners here are world-connectable, in the temp dir and (when writable) in /run."""
    d = tempfile.mkdtemp(prefix="phijax-sock-")
    os.chmod(d, 0o755)
    paths = [os.path.join(d, "bus.sock")]
    if os.access("/run", os.W_OK):
        paths.append(f"/run/phijax-test-{uuid.uuid4().hex[:12]}.sock")
    abstract = f"\0phijax-test-{uuid.uuid4().hex}"
    listeners = []
    try:
        for p in paths:
            listeners.append(_unix_listener(p))
            os.chmod(p, 0o777)
        listeners.append(_unix_listener(abstract))
        r = sandbox.run_program(_program(_CONNECT, PATHS=paths + [abstract]), timeout_s=TIMEOUT + 5)
        got = [_accepted(s) for s in listeners]
    finally:
        for s in listeners:
            s.close()
        for p in paths:
            if os.path.exists(p):
                os.remove(p)
        os.rmdir(d)
    assert got == [None] * len(got), (got, r)
    assert r.status == sandbox.FAILED and r.isolation == "namespaces", r
    assert r.stdout.split()[:len(paths)] == ["ENOENT"] * len(paths), r  # not even there


def test_host_files_are_invisible(tmp_path):
    """Only permissions protected host files: a world-readable file in a temp dir was readable and
    came back through the result text. In the jail the host's /tmp, /run, /var/run, $HOME do not
    exist."""
    secret = f"phijax-secret-{uuid.uuid4().hex}"
    d = tempfile.mkdtemp(prefix="phijax-secret-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "notes.txt")
    with open(path, "w") as f:
        f.write(secret)
    os.chmod(path, 0o644)
    shown = [d, "/run", "/var/run", "/etc/shadow", "/sys", "/var", "/home"]
    home = os.path.realpath(os.path.expanduser("~"))
    try:
        r = sandbox.run_program(_program(_READ, PATHS=[path], SHOWN=shown, HOME=home), timeout_s=TIMEOUT + 5)
    finally:
        os.remove(path)
        os.rmdir(d)
    assert r.status == sandbox.FAILED and r.isolation == "namespaces", r
    for text in (r.stdout, r.stderr, r.reason, execution.result_string(r)):
        assert secret not in text
    assert "FileNotFoundError" in r.stdout and "visible: []" in r.stdout, r
    # $HOME is absent, or (an interpreter installed under it, as pyenv's under /root) holds that path only
    prefix = os.path.realpath(sys.base_prefix)
    inside = [prefix[len(home) + 1:].split("/")[0]] if prefix.startswith(home + "/") else []
    assert r.stdout.split("home: ")[1].strip() in ("None", repr(inside)), r.stdout


def _tree_size(path):
    size = entries = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            entries += 1
            try:
                size += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return size, entries


def test_disk_filling_program_cannot_fill_the_host():
    """RLIMIT_FSIZE is per file: many files filled the host's temp dir. Now the work dir is a
    size- and inode-capped tmpfs of the sandbox's own, and the host temp dir does not grow."""
    host_tmp = tempfile.mkdtemp(prefix="phijax-hosttmp-")
    os.chmod(host_tmp, 0o755)
    old_tempdir = tempfile.tempdir
    tempfile.tempdir = host_tmp  # where the harness makes its per-program directories
    peak = [0, 0]
    stop = False

    def watch():
        while not stop:
            size, entries = _tree_size(host_tmp)
            peak[0], peak[1] = max(peak[0], size), max(peak[1], entries)
            time.sleep(0.01)

    src = ("import errno, os\n"
           "def fill(n, data):\n"
           "    done = 0\n"
           "    try:\n"
           "        for i in range(n):\n"
           "            with open(f'f{len(data)}-{i}', 'wb') as f:\n"
           "                f.write(data)\n"
           "            done += 1\n"
           "    except OSError as e:\n"
           "        return done, errno.errorcode.get(e.errno, str(e.errno))\n"
           "    return done, None\n"
           "big = fill(160, b'x' * (1 << 20))   # 160 MiB in 1-MiB files, each under RLIMIT_FSIZE\n"
           "for name in os.listdir('.'):\n"
           "    if name.startswith('f1048576-'):\n"
           "        os.remove(name)\n"
           "small = fill(50000, b'')            # many empty files\n"
           "print(*big, *small)\n"
           "assert big[1] is None and small[1] is None, 'capped'\n")
    t = threading.Thread(target=watch)
    t.start()
    try:
        r = sandbox.run_program(src, timeout_s=30)
    finally:
        stop = True
        t.join()
        tempfile.tempdir = old_tempdir
        import shutil
        shutil.rmtree(host_tmp, ignore_errors=True)
    assert r.status == sandbox.FAILED, r
    big_n, big_err, small_n, small_err = r.stdout.split()
    assert big_err == "ENOSPC" and int(big_n) <= 64, r.stdout      # the default 64-MiB cap
    assert small_err == "ENOSPC" and int(small_n) < 50000, r.stdout
    assert peak[0] < (1 << 20) and peak[1] < 10, f"the host temp dir grew to {peak[0]} bytes, {peak[1]} entries"


_UNPRIVILEGED_LAUNCHER = r"""
import ctypes, json, os, stat, sys
args = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def check(ret, what):
    if ret != 0:
        raise OSError(ctypes.get_errno(), what)
check(libc.unshare(0x00020000), 'unshare(mnt)')
check(libc.mount(None, b'/', None, 16384 | (1 << 18), None), 'make-private')
prefix = args['prefix']
parts = prefix.strip('/').split('/')
for i in range(1, len(parts) + 1):   # the interpreter must be reachable by the unprivileged uid
    d = '/' + '/'.join(parts[:i])
    if not os.stat(d).st_mode & stat.S_IXOTH:
        staging = args['staging']
        check(libc.mount(prefix.encode(), staging.encode(), None, 4096 | 16384, None), 'bind prefix')
        check(libc.mount(b'tmpfs', d.encode(), b'tmpfs', 0, b'mode=755,size=64k'), 'tmpfs')
        os.makedirs(prefix, mode=0o755)
        check(libc.mount(staging.encode(), prefix.encode(), None, 8192, None), 'move prefix')
        break
if args['no_userns']:  # a user namespace whose descendants may not make any: the harness gets none
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid:  # map the child's namespace from outside (root here), then wait for it
        os.read(r1, 1)
        for name in ('uid_map', 'gid_map'):
            with open(f'/proc/{pid}/{name}', 'w') as f:
                f.write(f"0 0 1\n{args['uid']} {args['uid']} 1\n")
        os.write(w2, b'x')
        os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    check(libc.unshare(0x10000000), 'unshare(user)')
    os.write(w1, b'x')
    os.read(r2, 1)
    with open('/proc/sys/user/max_user_namespaces', 'w') as f:
        f.write('0')
os.chdir('/')
os.setgroups([])
os.setresgid(args['uid'], args['uid'], args['uid'])
os.setresuid(args['uid'], args['uid'], args['uid'])
os.execve(args['exe'], [args['exe'], '-S', '-s', '-B', '-c', args['child'], sys.argv[2]],
          {'PATH': '/usr/bin:/bin', 'LANG': 'C.UTF-8', 'HOME': '/nonexistent'})
"""

# Runs as the unprivileged harness: plants its private key and its ssh-agent socket (0600 in a
# 0700 dir, as a user's are), runs the sandbox, and reports what came back.
_UNPRIVILEGED_CHILD = r"""
import json, os, socket, sys, tempfile, uuid
repo, = sys.argv[1:]
sys.path.insert(0, repo)
from phijax.evaluate import execution, sandbox
home = tempfile.mkdtemp(prefix='phijax-home-')
try:
    secret = 'phijax-private-' + uuid.uuid4().hex
    key = os.path.join(home, 'id_ed25519')
    with open(key, 'w') as f:
        f.write(secret)
    os.chmod(key, 0o600)
    agent = os.path.join(home, 'agent.sock')
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(agent)
    s.listen(8)
    os.chmod(agent, 0o600)
    s.setblocking(False)
    prog_read = ''.join(f'{k} = {v!r}\n' for k, v in (('PATHS', [key]), ('SHOWN', [home]), ('HOME', home))) + READ
    prog_conn = f'PATHS = {[agent]!r}\n' + CONNECT
    prog_nest = NEST
    res = sandbox.run_many([prog_read, prog_conn, prog_nest], workers=2, timeout_s=10)
    try:
        conn, _ = s.accept()
        accepted = True
    except BlockingIOError:
        accepted = False
    out = {'uid': os.getuid(), 'isolation': [r.isolation for r in res], 'status': [r.status for r in res],
           'accepted': accepted, 'leaked': any(secret in t for r in res for t in
                                               (r.stdout, r.stderr, r.reason, execution.result_string(r))),
           'read': [res[0].stdout, res[0].stderr[-300:]], 'connect': [res[1].stdout, res[1].stderr[-300:]],
           'nest': [res[2].stdout, res[2].stderr[-300:]],
           'mode': sandbox.isolation_in_use(), 'detail': sandbox.describe_isolation()}
    print(json.dumps(out))
finally:
    import shutil
    shutil.rmtree(home, ignore_errors=True)
"""


# A user namespace of its own would give the program mount namespaces and a tmpfs without the
# work dir's cap (only a program whose uid is mapped, i.e. under an unprivileged harness, can).
_NEST = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
    print('unshare', os.strerror(ctypes.get_errno()))
elif libc.mount(b'tmpfs', b'/sandbox', b'tmpfs', 0, b'size=1g') != 0:
    print('mount', os.strerror(ctypes.get_errno()))
else:
    print('mounted an uncapped tmpfs')
"""


def _run_unprivileged(no_userns=False):
    """The child above as uid 65534 when we are root (in a mount namespace where the interpreter is
    reachable; with `no_userns`, where it may not make user namespaces), else as ourselves (a
    normal user already). Returns (its report, its stderr)."""
    import json
    import subprocess
    child = _UNPRIVILEGED_CHILD.replace("READ", repr(_READ)).replace("CONNECT", repr(_CONNECT)).replace(
        "NEST", repr(_NEST))
    exe = os.path.realpath(sys._base_executable)
    if os.geteuid() != 0:
        cmd = [exe, "-S", "-s", "-B", "-c", child, REPO]
    else:
        staging = tempfile.mkdtemp(prefix="phijax-staging-")
        args = {"prefix": os.path.realpath(sys.base_prefix), "staging": staging, "uid": NOBODY, "exe": exe,
                "child": child, "no_userns": no_userns}
        cmd = [exe, "-I", "-S", "-c", _UNPRIVILEGED_LAUNCHER, json.dumps(args), REPO]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    finally:
        if os.geteuid() == 0:
            os.rmdir(staging)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_unprivileged_harness_private_files_and_sockets():
    """A harness running as a normal user: the program used to run as that same uid and read its
    0600 files (and connect to its 0600 agent socket), and could make user namespaces of its own.
    Under root, this runs the harness as uid 65534 (nobody) in a subprocess."""
    out, _ = _run_unprivileged()
    assert out["uid"] != 0
    if out["isolation"] != ["namespaces"] * 3:
        pytest.skip(f"no user namespaces for uid {out['uid']} here ({out['mode']}): the 'basic' fallback cannot "
                    "hide the harness user's own files (docs/evaluation.md)")
    assert not out["leaked"], out
    assert not out["accepted"], out
    assert out["status"] == ["failed", "failed", "passed"], out
    assert "FileNotFoundError" in out["read"][0] and out["connect"][0].split() == ["ENOENT"], out
    assert out["nest"][0].startswith("unshare "), out  # no namespaces of its own: no uncapped tmpfs


def test_disk_and_file_caps_are_exact_settings():
    src = ("import errno, os\n"
           "def fill(prefix, n, data):\n"
           "    for i in range(n):\n"
           "        try:\n"
           "            with open(f'{prefix}{i}', 'wb') as f:\n"
           "                f.write(data)\n"
           "        except OSError as e:\n"
           "            return i, errno.errorcode[e.errno]\n"
           "fill_mb = fill('mb', 100, b'x' * (1 << 20))\n"
           "for name in os.listdir('.'):\n"
           "    if name.startswith('mb'):\n"
           "        os.remove(name)\n"
           "print(*fill_mb, *fill('e', 100, b''), os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'])\n")
    r = sandbox.run_program(src, timeout_s=TIMEOUT + 5, max_disk_bytes=2 << 20, max_files=10)
    assert r.status == sandbox.PASSED, r
    assert r.stdout.split() == ["2", "ENOSPC", "10", "ENOSPC"] + [sandbox.JAIL_WORK] * 3, r


def test_fallback_without_user_namespaces_is_reported():
    """Where the kernel refuses the harness user namespaces, "auto" falls back to "basic" and says so:
    a warning naming the reason and what is lost, each result's isolation, and the description
    that goes into the summary and report."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a harness in a user namespace that may not make user namespaces")
    out, stderr = _run_unprivileged(no_userns=True)
    assert out["isolation"] == ["basic"] * 3, out
    assert out["mode"][0] == "basic" and "unshare(user)" in out["mode"][1], out
    assert out["detail"].startswith("basic fallback (namespaces isolation unavailable: unshare(user)"), out
    assert "falling back to the weaker 'basic' isolation" in stderr and "can read what" in stderr, stderr
    assert not out["accepted"], out  # the Python-level socket block still holds against plain code
