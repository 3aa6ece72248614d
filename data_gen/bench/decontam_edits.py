"""Recall of decontamination on edited copies of the benchmark solutions.

    python -m data_gen.bench.decontam_edits [--limit N] [--json out.json]

Every HumanEval item (prompt + canonical solution) and every MBPP item (``code``, all 500 test
problems) is copied with its identifiers renamed and its docstrings dropped -- the copy no
other check catches when no 13-gram survives -- then edited once more:

* ``renamed``: nothing else;
* ``unused_local``: ``unused_0 = 0`` inserted as the first statement of every function;
* ``method``: every top-level function becomes a method (``self`` first) of one class, calls
  between them go through ``self``;
* ``reordered``: every function's positional parameters reversed, and calls between them too;
* ``all``: the three together.

Each copy is scored against HumanEval + all of MBPP (1,138 items), as the CLI does. For each
variant: ``ast_recall`` per τ, the fraction of copies whose AST match with their source item is
>= τ; ``removed``, the fraction the removal rule removes (AST >= 0.9 or a shared 13-gram with
any item); ``removed_by_ast_alone``, the fraction removed by an AST match >= 0.9 with the source
while sharing no 13-gram with it. Uses only the public API of ``data_gen.decontaminate``, so it
also runs against an older checkout of it (``cd <old checkout> && PYTHONPATH=$PWD python
<this file>``).
"""
from __future__ import annotations

import ast
import builtins
import json
import sys
import time
from pathlib import Path

from data_gen import decontaminate as D
from phijax.data.benchmarks import MBPP_SPLITS
from phijax.util.files import atomic_write_bytes  # not bench.save_json: older checkouts lack it
from phijax.util import cli

VARIANTS = ("renamed", "unused_local", "method", "reordered", "all")
_FN = (ast.FunctionDef, ast.AsyncFunctionDef)


def _drop_docstrings(tree: ast.Module) -> None:
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, *_FN, ast.ClassDef)):
            body = n.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                n.body = body[1:] or [ast.Pass()]


def _rename(tree: ast.Module) -> None:
    """Every function, parameter and variable name -> n0, n1, ... (builtins and imported names kept)."""
    keep = set(dir(builtins))
    for n in ast.walk(tree):
        if isinstance(n, ast.alias):
            keep.add((n.asname or n.name).split(".")[0])
    new: dict[str, str] = {}

    def rn(s: str) -> str:
        if s in keep:
            return s
        return new.setdefault(s, f"n{len(new)}")

    defined = {n.name for n in ast.walk(tree) if isinstance(n, _FN)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and n.attr in defined:  # self.helper(...)
            n.attr = rn(n.attr)
        elif isinstance(n, ast.Name):
            n.id = rn(n.id)
        elif isinstance(n, ast.arg):
            n.arg = rn(n.arg)
        elif isinstance(n, (*_FN, ast.ClassDef)):
            n.name = rn(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            n.names = [rn(s) for s in n.names]


def _functions(tree: ast.Module) -> list:
    return [n for n in ast.walk(tree) if isinstance(n, _FN)]


def _unused_local(tree: ast.Module) -> None:
    for fn in _functions(tree):
        fn.body.insert(0, ast.parse("unused_0 = 0").body[0])


def _reorder(tree: ast.Module) -> None:
    arity = {}
    for fn in _functions(tree):
        fn.args.args.reverse()
        arity[fn.name] = len(fn.args.args)
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and len(n.args) == arity.get(n.func.id, -1):
            n.args.reverse()


def _method(tree: ast.Module) -> ast.Module:
    tops = {n.name for n in tree.body if isinstance(n, _FN)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in tops:
            n.func = ast.Attribute(ast.Name("self", ast.Load()), n.func.id, ast.Load())
    methods = [n for n in tree.body if isinstance(n, _FN)]
    for fn in methods:
        fn.args.args.insert(0, ast.arg("self"))
    cls = ast.ClassDef("Solution", [], [], methods, [])
    tree.body = [n for n in tree.body if not isinstance(n, _FN)] + [cls]
    return tree


def edited_copy(code: str, variant: str) -> str:
    tree = ast.parse(code)
    _drop_docstrings(tree)
    if variant in ("reordered", "all"):
        _reorder(tree)  # before renaming: calls are matched by the original names
    if variant in ("unused_local", "all"):
        _unused_local(tree)
    if variant in ("method", "all"):
        tree = _method(tree)
    _rename(tree)
    return ast.unparse(ast.fix_missing_locations(tree))


def measure(dec, idx: list[int]) -> dict:
    """Per variant: AST recall per τ and the removed fraction, for the copies of items ``idx``."""
    taus = sorted(set(dec.taus) | {dec.remove_tau}, reverse=True)
    out = {}
    for variant in VARIANTS:
        t0 = time.process_time()
        hits = {t: 0 for t in taus}
        removed = by_ast_only = 0
        for i in idx:
            pairs = dec.score(edited_copy(dec.items[i].code, variant))
            own = next((p for p in pairs if p.item == i), None)
            rate = own.ast_match if own is not None and own.ast_match is not None else 0.0
            for t in taus:
                hits[t] += rate >= t
            removed += dec.removes(pairs)
            by_ast_only += own is not None and own.ngram_overlap < dec.remove_min_ngrams and rate >= dec.remove_tau
        n = len(idx)
        out[variant] = {"items": n, "ast_recall": {str(t): round(hits[t] / n, 4) for t in taus},
                        "removed": round(removed / n, 4), "removed_by_ast_alone": round(by_ast_only / n, 4),
                        "cpu_s": round(time.process_time() - t0, 1)}
        print(variant, json.dumps(out[variant]), flush=True)
    return out


def main(argv=None) -> int:
    ap = cli.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="first N items of each benchmark")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cli.setup_logging()
    dec = D.Decontaminator(D.load_bench_items(True, "all"))
    res, (lo, hi) = {}, MBPP_SPLITS["test"]
    for bench in ("humaneval", "mbpp"):
        idx = [i for i, it in enumerate(dec.items) if it.benchmark == bench
               and (bench == "humaneval" or lo <= int(it.task_id.split("/")[1]) <= hi)][:args.limit]
        print(f"== {bench}: {len(idx)} items", flush=True)
        res[bench] = measure(dec, idx)
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(res, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
