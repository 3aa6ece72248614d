"""CodeExercises mined from a code corpus: documented functions become exercises, no teacher paid.

    python -m data_gen.mine_exercises --inputs runs/qf/filter/shards --out_dir runs/mined

Every top-level, public function of every document (JSONL records with a `text` field: what
ingest / the quality filter write) whose docstring is followed by a real body becomes

    prompt   = the module's imports + the signature + the docstring
    solution = the body after the docstring
    tests    = the docstring's doctest examples, run by doctest (empty when it has none)

in the record format of data_gen.exercises (phijax.data.packing reads it), with `source`
"mined:<document path or id>". A function is kept only if prompt + solution stand alone: they
parse, and every name the body reads is a parameter, a local, an import of the prompt or a
builtin (a helper defined elsewhere in its module would make the solution unrunnable). A
function with doctests is run with them in the evaluation sandbox and kept only if they pass;
one without is validated by parsing alone. Exact duplicates (same code once renamed, docstrings
dropped, imports aside) are removed in corpus order.

Rejects: syntax_error (the document), private, no_docstring, trivial_body, free_names,
doctest_failed, duplicate — counted in report.json with a sample each.
"""
from __future__ import annotations

import ast
import builtins
import dataclasses
import doctest
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from typing import Iterator, Sequence

from data_gen import dedup, exercises, ingest, stage
from phijax.data import records
from phijax.evaluate import sandbox
from phijax.util import cli

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
BUILTINS = frozenset(dir(builtins))
DOCTEST_RUNNER = """
import doctest as _doctest
_failures = 0
for _test in _doctest.DocTestFinder().find({name}, {name!r}, globs=dict(globals())):
    _failures += _doctest.DocTestRunner(verbose=False).run(_test).failed
assert _failures == 0, f"{{_failures}} doctest example(s) failed"
"""


@dataclasses.dataclass
class MineConfig:
    text_field: str = "text"
    min_body_statements: int = 2  # after the docstring: one-liners teach little
    run_doctests: bool = True
    timeout_s: float = 10.0
    workers: int | None = None
    shard_size: int = 10_000

    def validate(self) -> None:
        if self.min_body_statements < 1 or self.timeout_s <= 0 or self.shard_size < 1:
            raise ingest.IngestError(f"bad mining options: {self}")


@dataclasses.dataclass
class Candidate:
    exercise: exercises.Exercise
    name: str
    source: str
    has_doctests: bool
    function: str  # the function alone (duplicates are judged on it, imports aside)


def _imports(tree: ast.Module, code: str) -> tuple[str, set[str]]:
    """The module's top-level import statements (as source) and the names they bind."""
    lines, names = [], set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not (isinstance(node, ast.ImportFrom) and node.level):
            lines.append(ast.get_source_segment(code, node))
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return "".join(f"{line}\n" for line in lines), names


def _free_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names the function reads that it neither binds (parameters, assignments, imports, nested
    defs, comprehension and except targets) nor gets from builtins."""
    bound = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    read = set()
    for node in ast.walk(fn):
        if node is fn:
            continue
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound - BUILTINS


def candidates(code: str, source: str, cfg: MineConfig, rejects: Counter, samples: dict) -> Iterator[Candidate]:
    """The exercises one document offers; what it does not is counted in `rejects`."""
    def reject(reason: str, detail: str) -> None:
        rejects[reason] += 1
        samples.setdefault(reason, f"{source}: {detail}")

    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as e:
        reject("syntax_error", str(e)[:200])
        return
    header, imported = _imports(tree, code)
    lines = code.splitlines(keepends=True)
    for fn in tree.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if fn.name.startswith("_"):
            reject("private", fn.name)
            continue
        doc = ast.get_docstring(fn)
        if doc is None:
            reject("no_docstring", fn.name)
            continue
        body = fn.body[1:]
        if len(body) < cfg.min_body_statements or all(isinstance(s, (ast.Pass, ast.Raise)) for s in body):
            reject("trivial_body", f"{fn.name}: {len(body)} statement(s) after the docstring")
            continue
        free = _free_names(fn) - imported
        if free:
            reject("free_names", f"{fn.name} reads {sorted(free)[:5]}")
            continue
        start = min([d.lineno for d in fn.decorator_list] + [fn.lineno]) - 1
        doc_end = fn.body[0].end_lineno
        prompt = header + ("\n" if header else "") + "".join(lines[start:doc_end])
        solution = "".join(lines[doc_end:fn.end_lineno])
        has_doctests = bool(doctest.DocTestParser().get_examples(doc))
        tests = DOCTEST_RUNNER.format(name=fn.name).strip() + "\n" if has_doctests and cfg.run_doctests else ""
        yield Candidate(exercises.Exercise(prompt if prompt.endswith("\n") else prompt + "\n",
                                           solution if solution.endswith("\n") else solution + "\n", tests),
                        fn.name, source, has_doctests, "".join(lines[start:fn.end_lineno]))


def run(inputs: Sequence[str], out_dir: str | os.PathLike, cfg: MineConfig | None = None, force: bool = False) -> dict:
    """Mines `inputs` (JSONL files or directories of them) into `out_dir`; returns the report (the
    stored one when already complete)."""
    cfg = cfg or MineConfig()
    cfg.validate()
    files = dedup.expand_inputs(inputs)
    fp = stage.fingerprint(files, {"mine_exercises": dataclasses.asdict(cfg)})
    st = stage.Stage(out_dir, fp, REPORT_FILE, "mine_exercises")
    if (stored := st.resume_or_start(force)) is not None:
        return stored
    rejects, samples, read_report = Counter(), {}, records.ReadReport()
    found: list[Candidate] = []
    n_docs = 0
    for f in files:
        for rec in records.iter_jsonl(f, read_report, required=(cfg.text_field,), where_prefix=f.name):
            n_docs += 1
            source = str(rec.get("path") or rec.get("id") or f"{f.name}:{rec['_line']}")
            found += candidates(rec[cfg.text_field], source, cfg, rejects, samples)
    runs = sandbox.run_many([c.exercise.program for c in found if c.exercise.tests], workers=cfg.workers,
                            timeout_s=cfg.timeout_s)
    run_of = iter(runs)
    kept, seen = [], {}
    for c in found:
        if c.exercise.tests:
            r = next(run_of)
            if not r.passed:
                rejects["doctest_failed"] += 1
                samples.setdefault("doctest_failed", f"{c.source}: {c.name}: {r.status} {r.stderr[-200:]}")
                continue
        digest = hashlib.sha256(exercises.normalized(exercises.Exercise(c.function, "", ""), c.name).encode()
                                ).hexdigest()
        if digest in seen:
            rejects["duplicate"] += 1
            samples.setdefault("duplicate", f"{c.source}: {c.name} = {seen[digest]}")
            continue
        seen[digest] = f"{c.source}:{c.name}"
        kept.append({"prompt": c.exercise.prompt, "solution": c.exercise.solution, "tests": c.exercise.tests,
                     "entry_point": c.name, "id": f"mined-{digest[:16]}", "source": f"mined:{c.source}",
                     "validated": "doctest" if c.exercise.tests else "parse"})
    writer = st.shard_writer("exercises", cfg.shard_size)
    writer.write_all(kept)
    shards = writer.commit()
    report = {"n_documents": n_docs, "n_candidates": len(found), "kept": len(kept),
              "kept_with_doctests": sum(r["validated"] == "doctest" for r in kept),
              "rejects": dict(sorted(rejects.items())), "reject_samples": samples, "shards": shards,
              "unreadable": read_report.as_dict(), "options": dataclasses.asdict(cfg), "fingerprint": fp,
              "resumed": False}
    st.finish(report)
    log.info("mined %d exercises (%d checked by their doctests) from %d documents; rejects %s", len(kept),
             report["kept_with_doctests"], n_docs, dict(rejects))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(description="CodeExercises mined from documented functions of a code corpus (JSONL).")
    p.add_argument("--inputs", nargs="+", required=True, help="JSONL files or directories (ingest / filter shards)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--text_field", default="text")
    p.add_argument("--min_body_statements", type=int, default=2)
    p.add_argument("--no_doctests", action="store_true", help="validate by parsing only (nothing is run)")
    p.add_argument("--workers", type=int, default=None, help="sandbox processes (default: the CPUs)")
    p.add_argument("--force", action="store_true", help="rerun even if the output is complete")
    args = p.parse_args(argv)
    cli.setup_logging()
    cfg = MineConfig(text_field=args.text_field, min_body_statements=args.min_body_statements,
                     run_doctests=not args.no_doctests, workers=args.workers)
    try:
        res = run(args.inputs, args.out_dir, cfg, args.force)
    except ingest.IngestError as e:
        return cli.fail(e, prog="mine-exercises")
    print(json.dumps({k: res[k] for k in ("n_documents", "n_candidates", "kept", "kept_with_doctests", "rejects",
                                          "resumed")}))
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
