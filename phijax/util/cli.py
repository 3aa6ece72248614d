"""Command-line conventions shared by every phijax and data_gen CLI (`phijax <command>` or
`python -m <module>`): exit codes, the --help epilog that names them, one logging set-up, and the
one-line `error: ...` exit. Imports neither jax nor tensorflow.

    from phijax.util import cli

    def main(argv=None) -> int:
        p = cli.ArgumentParser(description="...", exit_codes=cli.INCOMPLETE_CODES)
        args = p.parse_args(argv)
        cli.setup_logging()
        try:
            ...
        except SomeInputError as e:
            return cli.fail(e)              # "error: <message>" on stderr, returns EXIT_BAD_INPUT
        return cli.EXIT_OK

`quiet_native_logs` (called when `phijax` is imported, phijax/__init__.py, so before any CLI can
import TensorFlow or jax) keeps their C++ start-up lines off the terminal.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import sys
import threading
from typing import Iterable

EXIT_OK = 0
EXIT_FAILED = 1  # failed (an unexpected error: the traceback says where); compile-check: does not fit
EXIT_BAD_INPUT = 2  # bad input, flags or settings: the `error:` line names the problem; nothing was done
EXIT_INCOMPLETE = 3  # incomplete or stopped (non-finite loss, unanswered samples): rerun to continue
EXIT_PEER_LOST = 4  # multi-process training: another process of the job was lost
EXIT_INTERRUPTED = 130  # Ctrl-C: what was done is kept; rerun the same command to resume

EXIT_MEANINGS = {
    EXIT_OK: "done",
    EXIT_FAILED: "failed (an unexpected error; compile-check: does not fit)",
    EXIT_BAD_INPUT: "bad input, flags or settings: the `error:` line names the problem",
    EXIT_INCOMPLETE: "incomplete or stopped (e.g. non-finite loss, unanswered samples): see the last lines",
    EXIT_PEER_LOST: "another process of a multi-process job was lost: restart them all to resume",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): rerun the same command to resume",
}
DEFAULT_CODES = (EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED)
INCOMPLETE_CODES = (EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERRUPTED)
ALL_CODES = tuple(EXIT_MEANINGS)  # phijax.train: every one, 4 included

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OWN_LOGGERS = ("phijax", "data_gen", "__main__")  # the program's own lines: INFO by default
# Third-party loggers that set their own level or are chatty: WARNING, like every other non-own logger.
QUIET_LOGGERS = ("absl", "jax", "orbax", "tensorflow", "tensorstore", "etils", "seqio", "apache_beam", "gin",
                 "matplotlib", "PIL", "urllib3", "fsspec", "gcsfs", "google", "httpx", "httpx2", "httpcore", "openai")

invoked_as: str | None = None  # "phijax <command>" while phijax.cli runs a command (usage lines say so)


def epilog(codes: Iterable[int] = DEFAULT_CODES) -> str:
    """The --help text naming the exit codes a CLI may return."""
    return "exit codes:\n" + "\n".join(f"  {c:<4} {EXIT_MEANINGS[c]}" for c in codes)


def _default_prog() -> str | None:
    if invoked_as:
        return invoked_as
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # python -m <module>
    return f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None and spec.name else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the conventions: usage names how the program was started (`phijax convert`,
    `python -m phijax.convert`), --help ends with the exit codes (subcommands' too), the
    description's line breaks are kept. Bad flags exit 2 (argparse's own `error:` line)."""

    def __init__(self, *args, exit_codes: Iterable[int] = DEFAULT_CODES, **kwargs):
        self.exit_codes = tuple(exit_codes)
        if not args and "prog" not in kwargs:
            kwargs["prog"] = _default_prog()
        kwargs.setdefault("epilog", epilog(self.exit_codes))
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", functools.partial(type(self), exit_codes=self.exit_codes))
        return super().add_subparsers(**kwargs)


def setup_logging(level: str | int = "INFO") -> None:
    """One format for every CLI (time, level, logger: message) on stderr; the program's own loggers
    (phijax.*, data_gen.*) at `level`, everything else (absl, jax, orbax, tensorflow, ...) at
    WARNING. A default handler that an early `logging.info` call installed is replaced; handlers
    that someone else installed on purpose (pytest's) are kept."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if type(h) is logging.StreamHandler]:  # noqa: E721 (not subclasses)
        root.removeHandler(h)
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        level = level if isinstance(level, int) else logging.INFO
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def error_text(e: BaseException | str) -> str:
    """An exception's message without gin's "In call to configurable ..." trailer lines."""
    lines = str(e).splitlines() or [type(e).__name__]
    return "\n".join(ln for ln in lines if not ln.lstrip().startswith("In call to configurable"))


def fail(e: BaseException | str, code: int = EXIT_BAD_INPUT, *, prog: str | None = None) -> int:
    """Prints `error: <message>` (`<prog>: error: ...` with prog) to stderr; returns `code`."""
    print(f"{prog + ': ' if prog else ''}error: {error_text(e)}", file=sys.stderr, flush=True)
    return code


# --- a quiet start ---------------------------------------------------------------------------
# TensorFlow >= 2.19 writes INFO lines from C++ while it is imported, before absl logging is
# initialised, so TF_CPP_MIN_LOG_LEVEL cannot hide them: absl's "All log messages before
# absl::InitializeLog() ...", oneDNN's "custom operations are on", "Could not find cuda drivers".
NATIVE_ENV_DEFAULTS = {
    "TF_CPP_MIN_LOG_LEVEL": "1",  # TensorFlow / XLA C++ logging after start-up: warnings and errors
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "1",
}
NATIVE_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ [\w.-]+:\d+\] "  # an absl/glog INFO line
    r"|To enable the following instructions: .* rebuild TensorFlow")  # cpu_feature_guard's second line
QUIET_IMPORTS = ("tensorflow",)


@contextlib.contextmanager
def filtered_stderr(drop: re.Pattern = NATIVE_NOISE):
    """File descriptor 2 (C++ libraries write there directly) goes through a pipe while the block
    runs; a thread passes on every line except those `drop` matches, as they come."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr: nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()

    def forward():
        with os.fdopen(read_fd, "rb") as src:
            for line in src:
                if not drop.match(line.decode("utf-8", "replace")):
                    os.write(saved, line)

    thread = threading.Thread(target=forward, name="phijax-stderr-filter", daemon=True)
    thread.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the thread reads to the end and stops
        thread.join(timeout=10)
        os.close(saved)


class _QuietImport:
    """A meta-path finder: the first import of a module in QUIET_IMPORTS runs under filtered_stderr
    (then the finder steps aside). Specs found without an import (find_spec availability checks)
    change nothing."""

    def find_spec(self, name, path=None, target=None):
        if name not in QUIET_IMPORTS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def quiet_exec_module(module):
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
            try:
                with filtered_stderr():
                    exec_module(module)
            finally:
                with contextlib.suppress(AttributeError):
                    del loader.exec_module  # the loader's own method again

        loader.exec_module = quiet_exec_module
        return spec


def quiet_native_logs() -> None:
    """Sets NATIVE_ENV_DEFAULTS where the user has not, and filters the INFO lines TensorFlow's
    C++ code writes while it is imported (warnings and errors still print). Idempotent."""
    for k, v in NATIVE_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if not any(m in sys.modules for m in QUIET_IMPORTS) and not any(isinstance(f, _QuietImport)
                                                                     for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
