"""How the recipe runs its stages: fingerprints, completion markers, child processes, the teacher.

Each stage's directory holds ``recipe_stage.json``: ``{"fingerprint", "complete", ...}``, written
when the stage starts (complete false) and rewritten, atomically, when it has finished. On a
rerun a stage whose marker holds its current fingerprint and ``complete`` is skipped; one with
the same fingerprint but not complete is resumed (every stage's own tool resumes: ledgers,
checkpoints, stage markers); one whose fingerprint changed is redone. A stage's fingerprint
covers its settings (the gin files' text, their bindings, the files they name), the recipe
settings it reads, and the fingerprints of the stages it reads from: changing a stage reruns it
and the stages downstream of it, never the ones before.

Children run as ``python -m <module> ...`` (their own gin, their own jax), their output teed to
``<stage>/recipe.log`` and the terminal. On Linux a child gets SIGKILL when the recipe dies
(prctl PDEATHSIG), so a killed recipe leaves no training or server running.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

from phijax.recipe import config as config_lib
from phijax.util import files, gin_config

log = logging.getLogger("phijax.recipe")

MARKER = "recipe_stage.json"
LOG_FILE = "recipe.log"
STALE_DIR = "stale"  # where a training stage's outputs go when its settings change


class StageFailed(RuntimeError):
    def __init__(self, stage: str, rc: int, message: str):
        super().__init__(message)
        self.stage, self.rc = stage, rc


# --- fingerprints -------------------------------------------------------------------------------
_INCLUDE = re.compile(r"^\s*include\s+['\"]([^'\"]+)['\"]", re.M)
_FILE_REF = re.compile(r"['\"]([\w./-]+\.(?:gin|txt|json|jinja|j2))['\"]")


def _search_paths(extra: Sequence[str] = ()) -> list[str]:
    """Where gin_config.parse looks (the --gin_search_path dirs first)."""
    return [*extra, os.getcwd(), gin_config.REPO_GIN_DIR, os.path.dirname(gin_config.REPO_GIN_DIR)]


def resolve_gin_file(name: str, search: Sequence[str] = ()) -> Path | None:
    for base in ["", *_search_paths(search)]:
        p = Path(base, name) if base else Path(name)
        if p.is_file():
            return p
    return None


def gin_digest(names: Sequence[str], bindings: Sequence[str] = (), search: Sequence[str] = ()) -> str:
    """A digest of gin files (and bindings) with everything they include and the data files they
    name (prompt templates, topic lists): the text a stage's child will read."""
    h = hashlib.sha256()
    seen: set[Path] = set()
    todo = [(n, True) for n in names] + [(m, False) for b in bindings for m in _FILE_REF.findall(b)]
    for b in bindings:
        todo += [(m, True) for m in _INCLUDE.findall(b)]
    while todo:
        name, required = todo.pop(0)
        p = resolve_gin_file(name, search)
        if p is None:
            if required:
                raise config_lib.RecipeError(f"gin file not found: {name!r} (searched: ., "
                                             f"{', '.join(_search_paths(search))})")
            continue
        p = p.resolve()
        if p in seen:
            continue
        seen.add(p)
        data = p.read_bytes()
        h.update(f"{name}\n".encode() + hashlib.sha256(data).digest())
        if p.suffix == ".gin":
            text = data.decode("utf-8", "replace")
            todo += [(m, True) for m in _INCLUDE.findall(text)]
            todo += [(m, False) for m in _FILE_REF.findall(text) if not m.endswith(".gin")]
    return h.hexdigest()[:16]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- shards -------------------------------------------------------------------------------------
def shard_files(d: Path) -> list[Path]:
    """The *.jsonl files of a stage's shard directory, sorted ([] when it does not exist)."""
    return sorted(d.glob("*.jsonl")) if d.is_dir() else []


def read_jsonl(paths: Sequence[Path]):
    """The records of JSONL files written by the stages (blank lines skipped), in order."""
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def metrics(model_dir: Path) -> list[dict]:
    """A training stage's metrics.jsonl rows ([] before its first logged step)."""
    p = Path(model_dir) / "metrics.jsonl"
    return list(read_jsonl([p])) if p.is_file() else []


def count_records(paths: Sequence[Path]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            n += sum(1 for line in f if line.strip())
    return n


# --- markers ------------------------------------------------------------------------------------
def read_marker(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(stage_dir: Path, record: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(stage_dir / MARKER, json.dumps(record, indent=2, sort_keys=True) + "\n")


def status(stage_dir: Path, fp: str) -> str:
    """'complete', 'resume' (same settings, not finished), 'changed' (other settings) or 'new'."""
    m = read_marker(stage_dir)
    if m is None:
        return "new"
    if m.get("fingerprint") != fp:
        return "changed"
    return "complete" if m.get("complete") else "resume"


def set_aside(stage_dir: Path, old_fp: str) -> Path:
    """Moves a stage directory whose settings changed to <out>/stale/<stage>-<old fp> (one rename:
    nothing that was paid for is deleted by the recipe)."""
    dest = stage_dir.parent / STALE_DIR / f"{stage_dir.name}-{old_fp}"
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stage_dir, dest)
    return dest


# --- children -----------------------------------------------------------------------------------
def _die_with_parent(parent: int) -> Callable[[], None]:
    def fn():
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the recipe died before prctl took effect
            os._exit(1)
    return fn


def run_child(stage: str, module: str, args: Sequence[str], log_path: Path,
              env: dict[str, str] | None = None, echo: bool = True) -> None:
    """`python -m module args` with its output teed to `log_path` (and the terminal); raises
    StageFailed with the child's exit code and its last lines."""
    cmd = [sys.executable, "-m", module, *args]
    child_env = dict(os.environ, **(env or {}))
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: python -m %s %s", stage, module, " ".join(_quote(a) for a in args))
    tail: list[str] = []
    with open(log_path, "a", encoding="utf-8") as lf:
        lf.write(f"\n$ python -m {module} {' '.join(_quote(a) for a in args)}\n")
        lf.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                                preexec_fn=_die_with_parent(os.getpid()), text=True, errors="replace")
        try:
            for line in proc.stdout:
                lf.write(line)
                lf.flush()
                tail = (tail + [line.rstrip()])[-20:]
                if echo:
                    sys.stderr.write(f"[{stage}] {line}")
            rc = proc.wait()
        except BaseException:  # Ctrl-C: the child got SIGINT too (same process group); let it stop
            try:
                proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
            raise
    if rc != 0:
        errors = [t for t in tail if t.startswith("error:") or t.startswith("incomplete:")]
        detail = errors[-1] if errors else "\n  ".join(tail[-8:])
        raise StageFailed(stage, rc, f"stage {stage}: python -m {module} exited with {rc}: {detail} "
                                     f"(full output: {log_path})")


def _quote(a: str) -> str:
    return a if re.fullmatch(r"[\w./:=,@%+-]+", a) else "'" + a.replace("'", "'\\''") + "'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_model(model: str, name: str, tokenizer: str, log_path: Path, serve_args: Sequence[str] = (),
                 start_timeout_s: float = 900.0):
    """phijax.serve over `model` on a loopback port, with a fresh random key; yields the env the
    data_gen clients need (OPENAI_BASE_URL, OPENAI_API_KEY). Stopped (Ctrl-C: it drains) on exit."""
    key = "sk-recipe-" + secrets.token_hex(16)  # per run; never written anywhere
    port = free_port()
    args = ["--model", model, "--model_name", name, "--tokenizer", tokenizer, "--host", "127.0.0.1",
            "--port", str(port), "--api_key_env", "PHIJAX_RECIPE_TEACHER_KEY", *serve_args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("teacher: python -m phijax.serve %s", " ".join(args))
    lf = open(log_path, "a", encoding="utf-8")
    lf.write(f"\n$ python -m phijax.serve {' '.join(args)}\n")
    lf.flush()
    proc = subprocess.Popen([sys.executable, "-m", "phijax.serve", *args], stdout=lf, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PHIJAX_RECIPE_TEACHER_KEY=key),
                            preexec_fn=_die_with_parent(os.getpid()))
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                lf.flush()
                last = Path(log_path).read_text(errors="replace").strip().splitlines()[-5:]
                raise StageFailed("teacher", proc.returncode or 1, "the teacher server (phijax.serve) exited "
                                  f"with {proc.returncode}: " + " | ".join(last) + f" (full output: {log_path})")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > start_timeout_s:
                raise StageFailed("teacher", 1, f"the teacher server did not answer {url}/health within "
                                  f"{start_timeout_s:.0f} s (output: {log_path})")
            time.sleep(0.5)
        log.info("teacher: %s serves %s (ready in %.0f s)", url, name, time.monotonic() - t0)
        yield {"OPENAI_BASE_URL": url + "/v1", "OPENAI_API_KEY": key}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # drains, then exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        lf.close()
