"""Gin plumbing shared by the CLIs: flags, search paths, clear errors (no jax: data_gen uses it too).

What gin may configure registers itself where it is defined; what modules that import without gin
define (phijax.config, phijax.sharding, phijax.optim) is registered in phijax.gin_bindings.

t5x-style layering: gin/models/*.gin (architecture), gin/runs/*.gin (hyperparameters and
sharding rules), gin/experiments/*.gin (compose the two and set the required macros).
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import re

import gin

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "gin")

# gin also resolves includes as "python.package/file.gin"; a directory in the working dir
# named like an include's head (e.g. a MODEL_DIR under ./runs) then breaks parsing. phijax
# resolves gin files on the filesystem search path only.
try:
    from gin import resource_reader as _rr
    gin.config._FILE_READERS[:] = [r for r in gin.config._FILE_READERS if r[1] is not _rr.system_path_file_exists]
except (ImportError, AttributeError):  # pragma: no cover - other gin versions
    pass

class GinError(ValueError):
    """A gin file, binding or macro that cannot be used; the message names it."""


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable; later files win)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding, e.g. 'train.seed = 3'")
    parser.add_argument("--gin_search_path", action="append", default=[],
                        help=f"extra directories to resolve gin files and includes (always: ., {REPO_GIN_DIR})")


def _resolve(path: str, search: list[str]) -> str:
    for base in ["", *search]:
        candidate = os.path.join(base, path) if base else path
        if os.path.isfile(candidate):
            return candidate
    raise GinError(f"gin file not found: {path!r} (searched: ., {', '.join(search)})")


def parse(gin_files: list[str], gin_params: list[str], search_paths: list[str] = ()) -> None:
    """Parse files then bindings; every problem is raised as GinError naming the file/binding."""
    if not gin_files:
        raise GinError("no --gin_file given (e.g. --gin_file=gin/experiments/cpu_demo.gin)")
    search = [*search_paths, os.getcwd(), REPO_GIN_DIR, os.path.dirname(REPO_GIN_DIR)]
    for p in search:
        gin.add_config_file_search_path(p)
    files = [_resolve(f, search) for f in gin_files]
    gin.clear_config()
    # gin logs every search-path miss while resolving includes; a real miss raises below.
    logging.disable(logging.ERROR)
    try:
        _parse(files, gin_params)
    finally:
        logging.disable(logging.NOTSET)


def _parse(files, gin_params):
    for f in files:
        try:
            gin.parse_config_file(f)
        except (ValueError, IOError, KeyError, SyntaxError) as e:
            raise GinError(f"in gin file {f}: {e}") from None
    for binding in gin_params:
        try:
            gin.parse_config(binding)
        except (ValueError, IOError, KeyError, SyntaxError) as e:
            raise GinError(f"in --gin_param {binding!r}: {e}") from None
    try:
        gin.finalize()
    except ValueError as e:
        raise GinError(explain(e)) from None


def check_macros_used() -> None:
    """Raises GinError naming a macro that is set but that no binding references: a typo such as
    `TRAIN_STEP = 2` would otherwise be accepted and change nothing. (For CLIs whose gin files
    use every macro they set; call after `parse`.)"""
    config = gin.config._CONFIG  # scoped selector -> bindings; macros are ('NAME', 'gin.macro')
    defined = {scope for scope, selector in config if selector == "gin.macro"}
    used = {ref.scoped_selector.rsplit("/", 1)[0] for ref in gin.config.iterate_references(config)
            if ref.selector == "gin.macro"}
    unused = sorted(defined - used)
    if unused:
        close = difflib.get_close_matches(unused[0], sorted(used), n=1)
        raise GinError(f"gin macro {unused[0]} is set but nothing uses it"
                       + (f" (did you mean {close[0]}?)" if close else ""))


_REQUIRED_MACRO = re.compile(r"^(\w+)/macro\.value set to `%gin\.REQUIRED`")


def explain(e: Exception) -> str:
    """A gin REQUIRED error rephrased as what to pass; other errors unchanged."""
    m = _REQUIRED_MACRO.match(str(e))
    if m:
        return f"required gin macro {m.group(1)} is not set: pass --gin_param=\"{m.group(1)} = ...\""
    return str(e)
