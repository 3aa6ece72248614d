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
import time
import uuid

import pytest

from phijax.evaluate import sandbox

TIMEOUT = 2.5
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
        "memory_bomb": ("s = b'x' * (1 << 20)\nwhile True:\n    s = s + s\n", {"memory_bytes": 256 << 20}),
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
        assert r.wall_s < TIMEOUT + 3, (name, r.wall_s)
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
    # the attempts failed on the read-only filesystem (EROFS = 30), not for lack of trying
    assert "EROFS" in hostile["results"]["files_outside"].stdout or " 30" in hostile["results"]["files_outside"].stdout


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


def test_bad_limits_are_rejected():
    for kw in ({"timeout_s": 0}, {"memory_bytes": 10}, {"max_processes": 0}, {"isolation": "docker"},
               {"cpu_s": -1}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            sandbox.run_program("pass", **kw)
    with pytest.raises(ValueError, match="workers"):
        sandbox.run_many(["pass"], workers=0)


def test_python_argument_is_used():
    r = sandbox.run_program("import sys\nprint(sys.version_info[:2])\n", python=sys.executable, timeout_s=TIMEOUT)
    assert r.status == sandbox.PASSED and r.stdout.strip() == str(tuple(sys.version_info[:2]))
