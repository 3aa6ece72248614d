"""The sandbox supervisor: one short-lived process per untrusted program (see sandbox.py).

`sandbox.py` starts `python -I -S -B _supervisor.py FD` once per process: a fork server (stdlib
only) that forks one supervisor S per program. S builds the isolation, runs the program,
enforces the CPU/wall limits, kills every process the program made, and writes one marshalled
status dict to the status pipe. Neither ever runs untrusted code itself.

Process tree, "namespaces" isolation (Linux user/mount/pid/net namespaces):

    harness --Popen--> fork server --fork, setsid--> S (outside the sandbox's pid namespace)
        S: [non-root: new user ns] + new mount, pid, net, ipc, uts ns; stages the jail on the
           harness's per-program directory: a tmpfs root with read-only binds of only what the
           interpreter needs, and a size- and inode-capped tmpfs work dir holding program.py
        S --fork--> C  pid 1 of the new pid ns: fresh /proc in the jail, pivot_root into it,
                       the host's root detached; [root: drops to uid 65534 and enters a new
                       user ns, so RLIMIT_NPROC counts this sandbox only]
            C --fork--> B  setsid, rlimits, no_new_privs, exec python: the program
    When C exits (after B, or killed by S), the kernel kills everything left in the pid
    namespace, including daemons that called setsid, and the mount namespace with its tmpfs
    goes with the last process in it. The net namespace has only a down loopback device and
    the jail has no socket file, so no socket can reach anything.

"basic" isolation (no namespaces available): S becomes a child subreaper, B runs in its own
session, sockets are disabled inside the program by a preamble, and S kills every
descendant (found through /proc) before it exits.
"""
import ctypes
import io
import marshal
import os
import resource
import _signal as signal  # not `signal`: its enum import costs ~20 ms per program
import stat
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 1, 2, 4, 8
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MNT_DETACH = 2
SYS_MOUNT_SETATTR = 442  # one number on every architecture (syscalls >= 424 are unified)
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217,
               "i686": 217, "i386": 217, "armv7l": 218, "armv8l": 218, "loongarch64": 41}
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
SANDBOX_UID = SANDBOX_GID = 65534  # nobody, when the harness runs as root

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """The requested isolation could not be built (reported, never a program failure)."""


def _check(ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")
    return ret


def _unshare(flags, what):
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({what})")


def _mount(src, target, fstype, flags, data=None, what="mount"):
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"{what} {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _mount_setattr(path, flags, attr_set, attr_clr=0):
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                         ctypes.c_uint(flags), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           f"mount_setattr {path}")


def _prctl(option, arg):
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0)), f"prctl({option})")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _blocked_ancestor(path):
    """The topmost directory on `path`'s way that others cannot traverse (o-x), or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return None


def _setup_namespaces(cfg, root):
    """In S: the namespaces, and the jail's new root, staged on the harness's per-program
    directory (still to be entered by C, see _enter_jail)."""
    if not root:  # an unprivileged user gets the capabilities for the rest from its own user ns
        uid, gid = os.getuid(), os.getgid()
        _unshare(CLONE_NEWUSER, "user")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        # no user namespace below this one: the program (whose uid is mapped here) could otherwise
        # make its own, and in it mount namespaces and tmpfs without the work dir's cap. (As root,
        # the program's uid is unmapped in its user namespace, which refuses nested ones already.)
        try:
            _write("/proc/sys/user/max_user_namespaces", "0")
        except OSError as e:
            raise SetupError(f"cannot forbid nested user namespaces: {e}") from None
    _unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS, "mnt|pid|net|ipc|uts")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, what="make-private")
    _build_jail(cfg, root)


def _build_jail(cfg, root):
    """The new root: a small tmpfs holding only read-only binds of what the interpreter needs
    (cfg["jail"]: its installation, the system libraries, a few /etc files and /dev nodes) and
    the program's work dir, a tmpfs capped in bytes and inodes. Everything else of the host
    (/tmp, /run, /var, /home, sockets in any of them) does not exist there."""
    new = cfg["root_dir"]
    with open("program.py", "rb") as f:  # cwd: the harness's directory, about to be covered
        source = f.read()
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=256k,nr_inodes=4096", what="tmpfs root")
    for op in cfg["jail"]:
        kind, path = op[0], op[1]
        target = new + path
        if kind == "dir":
            os.makedirs(target, 0o755, exist_ok=True)
        elif kind == "bind":  # a directory tree (recursive: a partial bind of locked mounts is refused)
            os.makedirs(target, 0o755, exist_ok=True)
            _mount(path, target, None, MS_BIND | MS_REC, what="bind")
        elif kind == "file":  # a file or device node (binds keep the source mount's dev/suid flags)
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
            _mount(path, target, None, MS_BIND, what="bind")
        elif kind == "symlink":
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            os.symlink(op[2], target)
    work = new + cfg["work"]
    os.makedirs(work, 0o755, exist_ok=True)
    opts = f"mode=700,size={cfg['disk_bytes']},nr_inodes={cfg['disk_inodes']}"
    if root:  # the program runs as SANDBOX_UID and owns its work dir only
        opts += f",uid={SANDBOX_UID},gid={SANDBOX_GID}"
    _mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts, what="tmpfs work dir")
    fd = os.open(work + "/program.py", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, source)  # a tmpfs write of the whole buffer: never short
        if root:
            os.fchown(fd, SANDBOX_UID, SANDBOX_GID)
    finally:
        os.close(fd)
    _mount_setattr(new, AT_RECURSIVE, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    _mount_setattr(work, 0, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, MOUNT_ATTR_RDONLY)


def _enter_jail(cfg):
    """In C (pid 1 of the new pid ns): its own /proc in the staged root, then pivot_root into it
    and detach the host's root. /proc is mounted first: the kernel allows a new procfs in a
    user namespace only while a full one is still visible in the mount namespace."""
    new = cfg["root_dir"]
    try:
        _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, what="mount")
        proc_note = "own /proc"
    except SetupError as e:  # e.g. the host /proc has masked parts: an empty one rather than the host's
        _mount("tmpfs", new + "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k")
        proc_note = f"empty /proc ({e})"
    os.chdir(new)
    nr = _PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise SetupError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_libc.syscall(ctypes.c_long(nr), b".", b"."), "pivot_root")  # the old root is now stacked on "/"
    _check(_libc.umount2(b".", ctypes.c_int(MNT_DETACH)), "umount2 old root")
    os.chdir(cfg["work"])
    return proc_note


def _set_limits(cfg, nproc):
    cpu = cfg["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["max_file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if nproc is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _exec_program(cfg, done_w, nproc):
    """In B: never returns. Any failure before exec exits 127 (reported as a setup error)."""
    try:
        os.setsid()
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(done_w, 3)
        os.closerange(4, 1 << 16)
        _set_limits(cfg, nproc)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as e:  # noqa: BLE001 - the child must never return into the supervisor
        try:
            os.write(2, f"sandbox: cannot start program: {e}\n".encode())
        finally:
            os._exit(127)


def _decode_status(st):
    return os.WEXITSTATUS(st) if os.WIFEXITED(st) else -os.WTERMSIG(st)


def _init_process(cfg, root, done_w, report_w):
    """C: pid 1 of the sandbox's pid namespace; never returns."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        proc_note = _enter_jail(cfg)
        if root:
            os.setgroups([])
            os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
            os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
            try:  # per-sandbox process count: RLIMIT_NPROC is checked per (user ns, uid)
                _unshare(CLONE_NEWUSER, "user")
                nproc = cfg["max_processes"] + 1  # + C
            except SetupError:
                nproc = _user_task_count() + cfg["max_processes"]
        else:
            nproc = cfg["max_processes"] + 2  # + S and C, which share the new user ns
        os.write(report_w, marshal.dumps({"proc": proc_note}))
        pid = os.fork()
        if pid == 0:
            _exec_program(cfg, done_w, nproc)
        os.close(done_w)
        while True:  # reap everything reparented to us until the program itself exits
            try:
                p, st = os.waitpid(-1, 0)
            except ChildProcessError:
                os._exit(0)
            if p == pid:
                os.write(report_w, marshal.dumps({"returncode": _decode_status(st)}))
                os._exit(0)  # the kernel now kills everything else in the namespace
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(report_w, marshal.dumps({"setup_error": f"sandbox init: {e}"}))
        finally:
            os._exit(1)


def _user_task_count():
    """Tasks (threads count for RLIMIT_NPROC) of this real uid, from /proc."""
    uid, n = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass
    return n


def _descendants(root_pid):
    """Live descendants of root_pid, from /proc (basic isolation only)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()
        if rest[0] != b"Z":
            children.setdefault(int(rest[1]), []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


_reaped = {}  # pid -> wait status, for children reaped while killing the tree


def _reap_all():
    while True:
        try:
            p, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if p == 0:
            return
        _reaped[p] = st


def _kill_tree(deadline_s=5.0):
    """SIGKILL every descendant until none is left (we are their subreaper)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        pids = _descendants(os.getpid())
        if not pids:
            return True
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.001)
        _reap_all()
    return False


def _world_reachable(path):
    return _blocked_ancestor(path) is None and os.stat(path).st_mode & stat.S_IXOTH


def supervise(cfg, status_fd):
    """S: run one program (see the module doc) and write its status dict to status_fd."""
    result = {"isolation": None, "returncode": None, "completed": False, "killed": None, "setup_error": None}

    def report():
        os.write(status_fd, marshal.dumps(result))

    root = os.geteuid() == 0
    mode = cfg["isolation"]
    os.umask(0o022)  # the jail's directories must be traversable by the program; its files get 644
    os.chdir(cfg["root_dir"] if mode == "namespaces" else cfg["work"])
    token = cfg["token"].encode()
    done_r, done_w = os.pipe()
    os.set_blocking(done_r, False)
    report_r, report_w = os.pipe()
    try:
        if mode == "namespaces":
            _setup_namespaces(cfg, root)
        else:
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
    except (SetupError, OSError) as e:
        result["setup_error"] = f"{mode} isolation unavailable: {e}"
        report()
        return
    result["isolation"] = mode
    # basic mode can still drop root when uid 65534 reaches the interpreter
    drop_root = mode == "basic" and root and _world_reachable(cfg["argv"][0]) \
        and _blocked_ancestor(cfg["python_prefix"]) is None

    killed = []

    def kill(reason):
        if not killed:
            killed.append(reason)
        if mode == "namespaces":
            try:
                os.kill(child, signal.SIGKILL)  # pid 1 of the namespace: takes everything with it
            except ProcessLookupError:
                pass
        else:
            _kill_tree()

    child = os.fork()
    if child == 0:
        os.close(done_r)
        os.close(report_r)
        if mode == "namespaces":
            _init_process(cfg, root, done_w, report_w)
        try:
            if drop_root:
                os.setgroups([])
                os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
                os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
            nproc = None if os.getuid() == 0 else _user_task_count() + cfg["max_processes"]
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"sandbox: cannot start program: {e}\n".encode())
            os._exit(127)
        _exec_program(cfg, done_w, nproc)
    os.close(done_w)
    os.close(report_w)
    signal.signal(signal.SIGALRM, lambda *_: kill("timeout"))
    signal.signal(signal.SIGTERM, lambda *_: kill("harness"))  # e.g. output over the cap
    signal.setitimer(signal.ITIMER_REAL, cfg["timeout_s"])
    try:
        _, st = os.waitpid(child, 0)
    except ChildProcessError:  # reaped by _kill_tree inside the timeout handler
        st = _reaped[child]
    signal.setitimer(signal.ITIMER_REAL, 0)
    if mode == "basic":
        result["returncode"] = _decode_status(st)
        if not _kill_tree():
            result["setup_error"] = "could not kill every descendant of the program"
    os.set_blocking(report_r, False)
    try:
        reports = io.BytesIO(os.read(report_r, 1 << 16))
    except BlockingIOError:
        reports = io.BytesIO()
    while reports.tell() < len(reports.getbuffer()):
        for key, value in marshal.load(reports).items():
            result[key] = value
    if mode == "namespaces" and result["returncode"] is None and not killed and not result["setup_error"]:
        result["returncode"] = _decode_status(st)
    try:
        result["completed"] = os.read(done_r, 4096) == token
    except BlockingIOError:
        result["completed"] = False
    result["killed"] = killed[0] if killed else None
    report()


def serve(sock_fd):
    """The fork server: one per harness process, started once (python startup and imports are
    most of a sandbox run's overhead). Each request on the SEQPACKET socket is a marshalled
    config with three fds (the program's stdout, stderr, and the status pipe); it forks S, which
    starts its own session, and replies with S's pid (the harness signals it: SIGTERM = kill the
    program now). EOF on the socket (the harness is gone) ends the server."""
    import socket

    # No PR_SET_PDEATHSIG here: it fires when the *thread* that started us exits (a worker
    # thread of run_many, say); EOF on the socket is the harness's death.
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        except InterruptedError:
            continue
        if not data:
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                sock.close()
                os.setsid()
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                devnull = os.open("/dev/null", os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(fds[0], 1)
                os.dup2(fds[1], 2)
                for fd in (devnull, fds[0], fds[1]):
                    os.close(fd)
                supervise(marshal.loads(data), fds[2])
            except BaseException as e:  # noqa: BLE001 - never return into the server loop
                status = 1
                try:
                    os.write(2, f"sandbox supervisor: {e!r}\n".encode())
                except OSError:
                    pass
            os._exit(status)
        for fd in fds:
            os.close(fd)
        sock.send(pid.to_bytes(8, "little", signed=True))
        while True:  # reap finished supervisors
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


if __name__ == "__main__":
    serve(int(sys.argv[1]))
