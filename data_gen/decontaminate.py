"""Decontamination of training shards against HumanEval and MBPP (phi-1 §5, Table 3).

    python -m data_gen.decontaminate --inputs shards/a.jsonl shards/b.jsonl \\
        --text_field prompt+solution --out_dir /data/decontam [--tau 0.95,0.9,0.85,0.8] \\
        [--ngram 13] [--remove_tau 0.9] [--mbpp_split all] [--extra_bench mine.jsonl] \\
        [--embed hashed_bow|model:PATH]

Three signals per (training document, benchmark item) pair; see docs/decontamination.md:

* n-gram overlap: the number of distinct ``ngram``-token n-grams (tokens of
  ``data_gen.minhash.tokens``: lower-cased ``\\w+`` runs and single punctuation characters,
  whitespace dropped) the document shares with the item.
* AST match rate: every function definition is normalised (``normalize_functions``) and
  compared with every function of the item; rate = 1 - TED / max(|T1|, |T2|) with TED the
  unit-cost Zhang–Shasha tree edit distance. The pair's score is the best function pair.
* embedding L2 distance between L2-normalised embeddings from a pluggable
  ``embed(list[str]) -> np.ndarray``: ``--embed model:PATH`` uses a phijax model's mean-pooled
  hidden states (as the paper used a pretrained code model); the default ``hashed_bow_embed``
  is a cheap fallback (hashed bag of tokens), not a model embedding. The report names it.

Removal rule: a document is removed iff some pair has AST match >= ``remove_tau`` or
n-gram overlap >= ``remove_min_ngrams`` (default 1). Embedding distance is reported only.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from data_gen import stage
from data_gen.minhash import tokens
from data_gen.text_blocks import all_code_blocks as code_blocks  # D.code_blocks, as the docs show
from phijax.data import benchmarks
from phijax.data.records import ReadReport, check_text_fields, iter_jsonl
from phijax.util import cli
from phijax.util.cli import EXIT_BAD_INPUT  # noqa: F401 (the CLI's exit code for bad input)
from phijax.util.files import atomic_write_bytes

DEFAULT_TAUS = (0.95, 0.9, 0.85, 0.8)
DEFAULT_NGRAM = 13
DEFAULT_MAX_TED_NODES = 600  # Zhang–Shasha is ~O(n^2 m^2) worst case in pure Python
_BUILTINS = frozenset(dir(builtins))


class DecontamError(ValueError):
    """Bad input (missing file, bad field, bad option); the message names the problem."""


# --- benchmark references ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BenchItem:
    benchmark: str  # "humaneval" | "mbpp" | the extra file's stem
    task_id: str
    code: str


def join_fields(rec: dict, fields: Sequence[str]) -> str:
    """The fields concatenated as source text (a newline inserted only where one is missing)."""
    out = ""
    for f in fields:
        v = rec[f]
        out = out + v if not out or out.endswith("\n") else out + "\n" + v
    return out


def load_bench_items(humaneval: bool = True, mbpp_split: str | None = "all",
                     extra: Sequence[str | os.PathLike] = ()) -> list[BenchItem]:
    """HumanEval (prompt + canonical_solution), MBPP ``code`` of ``mbpp_split`` ('all', a
    split name, or None for none) and extra JSONL files with fields task_id, code."""
    items: list[BenchItem] = []
    if humaneval:
        for r in benchmarks.load_humaneval():
            items.append(BenchItem("humaneval", r["task_id"],
                                   join_fields(r, ("prompt", "canonical_solution"))))
    if mbpp_split is not None:
        for r in benchmarks.load_mbpp(mbpp_split):
            items.append(BenchItem("mbpp", f"MBPP/{r['task_id']}", r["code"]))
    for path in extra:
        p = Path(path)
        if not p.is_file():
            raise DecontamError(f"extra benchmark file not found: {str(path)!r}")
        rep = ReadReport()
        for rec in iter_jsonl(p, rep):
            if not isinstance(rec.get("task_id"), (str, int)) or check_text_fields(rec, ["code"]):
                raise DecontamError(f"{p}:{rec['_line']}: extra benchmark records need task_id "
                                    f"and a non-empty string code")
            items.append(BenchItem(p.stem, str(rec["task_id"]), rec["code"]))
        if rep.n_skipped:
            raise DecontamError(f"{p}: unreadable lines {dict(rep.skipped)} "
                                f"(first: {rep.samples[0]})")
    return items


# --- n-grams ----------------------------------------------------------------------------
def ngrams(text: str, n: int = DEFAULT_NGRAM) -> set[str]:
    """Distinct n-grams of ``tokens(text)``; a text shorter than n tokens has none."""
    toks = tokens(text)
    return {" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)}


class NgramIndex:
    """n-gram -> ids of the benchmark items containing it."""

    def __init__(self, texts: Sequence[str], n: int = DEFAULT_NGRAM):
        if n < 1:
            raise DecontamError(f"--ngram must be >= 1, got {n}")
        self.n = n
        self.index: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(texts):
            for g in ngrams(t, n):
                self.index[g].append(i)

    def overlaps(self, text: str) -> Counter:
        """item id -> number of distinct n-grams shared with ``text``."""
        c: Counter = Counter()
        for g in ngrams(text, self.n):
            for i in self.index.get(g, ()):
                c[i] += 1
        return c


# --- normalised ASTs --------------------------------------------------------------------
@dataclasses.dataclass
class NormTree:
    """A normalised function tree in postorder, ready for Zhang–Shasha."""
    labels: list[str]
    lml: list[int]        # leftmost leaf (postorder index) of each node
    keyroots: list[int]
    key: str              # digest of the structure: equal keys <=> identical trees
    counts: Counter       # label multiset, for the TED lower bound

    @property
    def size(self) -> int:
        return len(self.labels)


_SKIP_FIELDS = {"ctx", "type_comment", "type_ignores", "kind"}
_STMT_LISTS = {"body", "orelse", "finalbody"}
_IMPURE = (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr)
_FN = (ast.FunctionDef, ast.AsyncFunctionDef)


def _strip_docstring(body: list) -> list:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1:]
    return body


def _index(mod: ast.Module) -> tuple[dict[str, str], set[int], list[ast.AST]]:
    """One walk over ``mod``: (imports, methods, functions).

    * imports: name bound by an import anywhere in ``mod`` -> what it imports (``np`` -> ``numpy``,
      ``sqrt`` -> ``math.sqrt``): the API a name stands for, whatever the alias;
    * methods: ids of the functions defined directly in a class body, static methods excepted;
    * functions: every function definition (nested ones too), in ``ast.walk`` order."""
    imports, methods, functions = {}, set(), []
    for n in ast.walk(mod):
        if isinstance(n, ast.Import):
            for a in n.names:
                imports[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(n, ast.ImportFrom):
            for a in n.names:
                imports[a.asname or a.name] = f"{'.' * n.level}{n.module or ''}.{a.name}"
        elif isinstance(n, ast.ClassDef):
            methods.update(id(f) for f in n.body if isinstance(f, _FN) and not any(
                isinstance(d, ast.Name) and d.id == "staticmethod" for d in f.decorator_list))
        elif isinstance(n, _FN):
            functions.append(n)
    return imports, methods, functions


class _Scope:
    """What every identifier of one function is: a parameter ("p"), a local ("l": assigned
    or defined in it), what an import binds it to, a builtin, or else free ("g": globals,
    helpers, the function itself when recursive); plus the names it reads and those it
    declares global/nonlocal."""

    def __init__(self, fn: ast.AST, imports: dict[str, str], method: bool = False):
        self.imports = imports
        # A method's receiver (self, cls) comes with the class, not with what the code does.
        params = [*fn.args.posonlyargs, *fn.args.args]
        self.receiver = params[0] if method and params else None
        self.params, self.bound, self.loaded, self.declared = set(), set(), set(), set()
        for n in ast.walk(fn):
            if isinstance(n, ast.arg):
                self.params.add(n.arg)
            elif isinstance(n, ast.Name):
                (self.loaded if isinstance(n.ctx, ast.Load) else self.bound).add(n.id)
            elif isinstance(n, (*_FN, ast.ClassDef)) and n is not fn:
                self.bound.add(n.name)
            elif isinstance(n, ast.ExceptHandler) and n.name:
                self.bound.add(n.name)
            elif isinstance(n, (ast.Global, ast.Nonlocal)):
                self.declared.update(n.names)

    def name(self, s: str) -> str:
        if s in self.params:
            return "Name:p"
        if s in self.bound:
            return "Name:l"
        if s in self.imports:
            return f"Name:{self.imports[s]}"
        return f"Name:{s}" if s in _BUILTINS else "Name:g"

    def dead_store(self, stmt: ast.AST) -> bool:
        """An assignment to names nothing reads, of a value without calls: removing it changes
        nothing the function computes (an inserted unused local)."""
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
            targets, value = [stmt.target], stmt.value
        else:
            return False
        return (all(isinstance(t, ast.Name) and t.id not in self.loaded and t.id not in self.declared
                    for t in targets)
                and (value is None or not any(isinstance(n, _IMPURE) for n in ast.walk(value))))


def _label(node: ast.AST, scope: _Scope) -> str:
    """A node's label: its class, plus what survives renaming -- an identifier's role
    (parameter / local / free), a builtin's name, attribute, keyword and imported-module names,
    a literal's type. Names of variables, arguments, functions and classes are dropped."""
    kind = type(node).__name__
    if isinstance(node, ast.Constant):
        return f"Const:{type(node.value).__name__}"
    if isinstance(node, ast.Name):
        return scope.name(node.id)
    if isinstance(node, ast.Attribute):
        return f"Attribute:{node.attr}"
    if isinstance(node, ast.keyword):
        return f"keyword:{node.arg}"
    if isinstance(node, ast.alias):
        return f"alias:{node.name}"
    return kind


def _children(node: ast.AST, scope: _Scope) -> list:
    out = []
    for field, value in ast.iter_fields(node):
        if field in _SKIP_FIELDS:
            continue
        if field in ("posonlyargs", "args") and isinstance(node, ast.arguments):
            # Parameter order is a naming choice too: parameters sorted by their annotations.
            value = sorted((a for a in value if a is not scope.receiver),
                           key=lambda a: [_label(n, scope) for n in ast.walk(a)])
        if field in _STMT_LISTS and isinstance(value, list):
            value = [s for s in (_strip_docstring(value) if field == "body" else value)
                     if not scope.dead_store(s)]
        for v in (value if isinstance(value, list) else [value]):
            if isinstance(v, ast.AST):
                out.append(v)
    return out


def _to_tree(fn: ast.AST, imports: dict[str, str] | None = None, method: bool = False) -> tuple:
    """(label, children) of a function, normalised (``_label``; docstrings, expression contexts,
    dead stores and a method's receiver parameter dropped, parameters in a canonical order);
    ``imports``: those of its module (``_index``). Iterative: any nesting depth the parser accepts."""
    scope = _Scope(fn, imports or {}, method)
    stack = [(fn, _children(fn, scope), [])]
    while True:
        node, todo, done = stack[-1]
        if len(done) < len(todo):
            child = todo[len(done)]
            stack.append((child, _children(child, scope), []))
            continue
        stack.pop()
        tree = (_label(node, scope), tuple(done))
        if not stack:
            return tree
        stack[-1][2].append(tree)


def flatten_tree(tree: tuple) -> NormTree:
    """A (label, children) tree in postorder (iterative)."""
    labels: list[str] = []
    lml: list[int] = []
    stack = [[tree, 0, None]]  # node, next child, leftmost leaf found so far
    while stack:
        top = stack[-1]
        children = top[0][1]
        if top[1] < len(children):
            top[1] += 1
            stack.append([children[top[1] - 1], 0, None])
            continue
        stack.pop()
        idx = len(labels)
        labels.append(top[0][0])
        leaf = idx if top[2] is None else top[2]
        lml.append(leaf)
        if stack and stack[-1][2] is None:
            stack[-1][2] = leaf
    # keyroots: the highest node for each distinct leftmost leaf
    seen: dict[int, int] = {}
    for i, l in enumerate(lml):
        seen[l] = i
    keyroots = sorted(seen.values())
    # postorder labels + leftmost leaves determine the tree: node i spans [lml[i], i]
    key = hashlib.blake2b(json.dumps([labels, lml]).encode("utf-8"), digest_size=16).hexdigest()
    return NormTree(labels, lml, keyroots, key, Counter(labels))


def parse_python(src: str) -> tuple[ast.Module | None, str | None]:
    """(module, None); (None, None) for text that is not Python; (None, reason) when the
    parser's own limits stop it on nesting (RecursionError, MemoryError, "too many nested
    parentheses"): the code cannot be analysed, which the report counts."""
    try:
        return ast.parse(src), None
    except RecursionError:
        return None, "parser_recursion_limit"
    except MemoryError:
        return None, "parser_memory_limit"
    except SyntaxError as e:
        return None, "parser_nesting_limit" if "too many nested" in str(e.msg) else None
    except ValueError:  # e.g. null bytes
        return None, None


def analyse(text: str, min_nodes: int = 1) -> tuple[list[NormTree], str | None]:
    """Normalised trees of every function definition (nested ones too) in ``text``'s Python --
    the whole text if it parses, else every code block of it (``code_blocks``) -- and the
    reason, if any, some of that Python could not be analysed. Code that does not parse
    contributes nothing."""
    mod, why = parse_python(text)
    parsed = [(mod, why)] if mod is not None else [parse_python(b) for b in code_blocks(text)]
    why = why or next((w for _, w in parsed if w), None)
    out = []
    for m, _ in parsed:
        if m is None:
            continue
        imports, methods, functions = _index(m)
        for node in functions:
            t = flatten_tree(_to_tree(node, imports, id(node) in methods))
            if t.size >= min_nodes:
                out.append(t)
    return out, why


def normalize_functions(text: str, min_nodes: int = 1) -> list[NormTree]:
    """``analyse``'s trees."""
    return analyse(text, min_nodes)[0]


def tree_edit_distance(a: NormTree, b: NormTree) -> int:
    """Zhang–Shasha ordered tree edit distance, unit costs (insert, delete, relabel)."""
    la, lb = a.labels, b.labels
    ma, mb = a.lml, b.lml
    td = [[0] * len(lb) for _ in range(len(la))]
    for i in a.keyroots:
        for j in b.keyroots:
            li, lj = ma[i], mb[j]
            ni, nj = i - li + 2, j - lj + 2
            fd = [[0] * nj for _ in range(ni)]
            for x in range(1, ni):
                fd[x][0] = x
            for y in range(1, nj):
                fd[0][y] = y
            for x in range(1, ni):
                ix = li + x - 1
                fdx, fdx1 = fd[x], fd[x - 1]
                for y in range(1, nj):
                    jy = lj + y - 1
                    if ma[ix] == li and mb[jy] == lj:
                        fdx[y] = min(fdx1[y] + 1, fdx[y - 1] + 1,
                                     fdx1[y - 1] + (la[ix] != lb[jy]))
                        td[ix][jy] = fdx[y]
                    else:
                        fdx[y] = min(fdx1[y] + 1, fdx[y - 1] + 1,
                                     fd[ma[ix] - li][mb[jy] - lj] + td[ix][jy])
    return td[-1][-1]


def match_upper_bound(a: NormTree, b: NormTree) -> float:
    """An upper bound on ``ast_match_rate``: TED >= max(n, m) - |labels(a) ∩ labels(b)|."""
    return sum((a.counts & b.counts).values()) / max(a.size, b.size)


def ast_match_rate(a: NormTree, b: NormTree, floor: float = 0.0,
                   max_nodes: int = DEFAULT_MAX_TED_NODES) -> float | None:
    """1 - TED / max(|a|, |b|). Pairs whose cheap upper bounds (node-count ratio, label
    multiset overlap) are below ``floor`` return that bound instead of running TED (the true
    rate is no higher); pairs over ``max_nodes`` nodes that pass the bounds return None."""
    if a.key == b.key:
        return 1.0
    ub = min(a.size, b.size) / max(a.size, b.size)
    if ub < floor:
        return ub
    ub = match_upper_bound(a, b)
    if ub < floor:
        return ub
    if max(a.size, b.size) > max_nodes:
        return None
    return 1.0 - tree_edit_distance(a, b) / max(a.size, b.size)


# --- embeddings -------------------------------------------------------------------------
DEFAULT_EMBED = "hashed_bow"


def hashed_bow_embed(texts: Sequence[str], dim: int = 1024) -> np.ndarray:
    """FALLBACK embedding (not a model): bag of ``tokens`` hashed (blake2b) into ``dim``
    buckets. ``--embed model:PATH`` gives the paper's kind: a code model's embeddings."""
    out = np.zeros((len(texts), dim), np.float32)
    cache: dict[str, int] = {}
    for r, t in enumerate(texts):
        for tok in tokens(t):
            h = cache.get(tok)
            if h is None:
                h = cache[tok] = int.from_bytes(
                    hashlib.blake2b(tok.encode("utf-8"), digest_size=8).digest(), "little") % dim
            out[r, h] += 1.0
    return out


class ModelEmbed:
    """Mean-pooled final hidden states of a phijax model (checkpoint, export or HF dir):
    ``data_gen.classifier.ModelFeaturizer`` -- batched, jit-compiled per length bucket, the
    first ``max_len`` tokens of each text."""

    def __init__(self, settings: dict):
        from data_gen import classifier

        try:
            self.featurizer = classifier.make_featurizer(settings)
        except classifier.InputError as e:
            raise DecontamError(f"--embed: {e}") from None
        self.settings = dict(settings)
        self.name = embed_label(self.settings)[0]

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.featurizer.featurize(texts)


def embed_settings(spec: str, max_len: int | None = None, batch_size: int | None = None) -> dict:
    """``hashed_bow`` | ``model:PATH`` -> picklable settings for ``make_embed`` (checked here:
    a bad spec fails before any work)."""
    if spec == DEFAULT_EMBED:
        return {"kind": DEFAULT_EMBED}
    if spec.startswith("model:"):
        from data_gen import classifier

        try:
            return classifier.parse_features(spec, max_len=max_len, batch_size=batch_size)
        except classifier.InputError as e:
            raise DecontamError(f"--embed: {e}") from None
    raise DecontamError(f"--embed must be {DEFAULT_EMBED!r} or 'model:PATH', got {spec!r}")


def make_embed(settings: dict) -> Callable[[list[str]], np.ndarray]:
    """The embedding function ``embed_settings`` describes."""
    if settings.get("kind") == DEFAULT_EMBED:
        return hashed_bow_embed
    return ModelEmbed(settings)


def embed_label(embed: Callable | dict) -> tuple[str, dict | None]:
    """(name, settings) the report gives for an embedding function or ``embed_settings``' dict:
    ``("hashed_bow_embed", None)``, ``("model:/abs/path", {max_len, batch_size, ...})``."""
    if isinstance(embed, dict):
        if embed.get("kind") == DEFAULT_EMBED:
            return hashed_bow_embed.__name__, None
        return f"model:{embed['path']}", dict(embed)
    name = getattr(embed, "name", None) or getattr(embed, "__name__", None) or str(embed)
    return name, getattr(embed, "settings", None)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n == 0, 1.0, n)


def _unit_distances(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    sq = np.maximum(2.0 - 2.0 * d @ e.T, 0.0)  # |u - v|^2 = 2 - 2 u·v for unit vectors
    return np.sqrt(sq)


def embedding_distances(docs: Sequence[str], items: Sequence[str],
                        embed: Callable[[list[str]], np.ndarray] = hashed_bow_embed,
                        item_emb: np.ndarray | None = None) -> np.ndarray:
    """(len(docs), len(items)) L2 distances between L2-normalised embeddings."""
    d = _l2_normalize(np.asarray(embed(list(docs)), np.float64))
    e = _l2_normalize(np.asarray(embed(list(items)) if item_emb is None else item_emb,
                                 np.float64))
    return _unit_distances(d, e)


def nearest_embedding(docs: Sequence[str], items: Sequence[str],
                      embed: Callable[[list[str]], np.ndarray] = hashed_bow_embed
                      ) -> tuple[np.ndarray, np.ndarray]:
    """For each doc: (index of the nearest item, its L2 distance)."""
    dist = embedding_distances(docs, items, embed)
    idx = dist.argmin(axis=1)
    return idx, dist[np.arange(len(docs)), idx]


# --- scoring ----------------------------------------------------------------------------
@dataclasses.dataclass
class PairScore:
    item: int                     # index into Decontaminator.items
    ngram_overlap: int
    ast_match: float | None       # best function pair; None: no functions / not computed
    embed_l2: float | None = None


def check_options(taus: Sequence[float], remove_tau: float, remove_min_ngrams: int,
                  ngram: int = DEFAULT_NGRAM) -> list[float]:
    """The τ sweep, distinct and descending; a bad option raises DecontamError."""
    taus = sorted({float(t) for t in taus}, reverse=True)
    if not taus or any(not 0.0 < t <= 1.0 for t in taus) or not 0.0 < remove_tau <= 1.0:
        raise DecontamError(f"taus and remove_tau must be in (0, 1], got {taus}, {remove_tau}")
    if remove_min_ngrams < 1:
        raise DecontamError(f"remove_min_ngrams must be >= 1, got {remove_min_ngrams}")
    if ngram < 1:
        raise DecontamError(f"--ngram must be >= 1, got {ngram}")
    return taus


class Decontaminator:
    """Scores documents against a fixed set of benchmark items."""

    def __init__(self, items: Sequence[BenchItem], ngram: int = DEFAULT_NGRAM,
                 taus: Sequence[float] = DEFAULT_TAUS, remove_tau: float = 0.9,
                 remove_min_ngrams: int = 1, max_ted_nodes: int = DEFAULT_MAX_TED_NODES,
                 embed: Callable[[list[str]], np.ndarray] = hashed_bow_embed,
                 min_ast_nodes: int = 1):
        taus = check_options(taus, remove_tau, remove_min_ngrams, ngram)
        self.items = list(items)
        self.taus = taus
        self.remove_tau = remove_tau
        self.remove_min_ngrams = remove_min_ngrams
        self.floor = min(taus + [remove_tau])  # below this an AST score is not needed exactly
        self.max_ted_nodes = max_ted_nodes
        self.ngram_index = NgramIndex([it.code for it in self.items], ngram)
        # Functions under min_ast_nodes take no part in AST matching (tiny ones match by chance)
        self.min_ast_nodes = min_ast_nodes
        self.item_trees = [normalize_functions(it.code, min_ast_nodes) for it in self.items]
        self.embed = embed
        self.item_emb = _l2_normalize(np.asarray(embed([it.code for it in self.items]),
                                                 np.float64))

    def best_match(self, trees: Sequence[NormTree], i: int, floor: float) -> float | None:
        """Best match rate between ``trees`` and item i's functions (exact when >= floor);
        None when either side has no functions or only TED-capped pairs pass the bounds."""
        best: float | None = None
        for a in trees:
            for b in self.item_trees[i]:
                r = ast_match_rate(a, b, floor, self.max_ted_nodes)
                if r is not None and (best is None or r > best):
                    best = r
        return best

    def ast_scores(self, trees: Sequence[NormTree]) -> dict[int, float]:
        """item -> best match rate over function pairs, for items reaching ``self.floor``."""
        out: dict[int, float] = {}
        for i in range(len(self.items) if trees else 0):
            r = self.best_match(trees, i, self.floor)
            if r is not None and r >= self.floor:
                out[i] = r
        return out

    def score(self, text: str) -> list[PairScore]:
        """The pairs (this doc, item) sharing >= 1 n-gram or with AST match >= min(taus)."""
        return self.score_batch([text])[0]

    def score_batch(self, texts: Sequence[str]) -> list[list[PairScore]]:
        """``score`` of each text."""
        return [pairs for pairs, _ in self.score_docs(texts)]

    def score_docs(self, texts: Sequence[str]) -> list[tuple[list[PairScore], str | None]]:
        """(``score``, why its code could not be analysed or None) of each text: such a text still
        gets its n-gram and embedding checks. The embedding runs once for the batch (only on texts
        with some pair), so a model embedding sees full batches."""
        found, why = [], []
        for text in texts:
            ov = self.ngram_index.overlaps(text)
            trees, reason = analyse(text, self.min_ast_nodes)
            why.append(reason)
            ast_s: dict[int, float | None] = dict(self.ast_scores(trees))
            for i in ov:  # n-gram-only pairs get their exact AST score too (reported, not a flag)
                if i not in ast_s:
                    ast_s[i] = self.best_match(trees, i, 0.0)
            found.append((ov, ast_s, sorted(set(ov) | set(ast_s))))
        need = [k for k, (_, _, ids) in enumerate(found) if ids]
        emb = _l2_normalize(np.asarray(self.embed([texts[k] for k in need]), np.float64)) if need else None
        out: list[list[PairScore]] = [[] for _ in texts]
        for row, k in enumerate(need):
            ov, ast_s, ids = found[k]
            d = _unit_distances(emb[row:row + 1], self.item_emb[ids])[0]
            out[k] = [PairScore(i, ov.get(i, 0), ast_s.get(i), float(dist)) for i, dist in zip(ids, d)]
        return list(zip(out, why))

    def removes(self, pairs: Iterable[PairScore]) -> bool:
        return any((p.ast_match is not None and p.ast_match >= self.remove_tau)
                   or p.ngram_overlap >= self.remove_min_ngrams for p in pairs)


# --- CLI --------------------------------------------------------------------------------
def _parse_taus(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise DecontamError(f"--tau must be comma-separated numbers, got {s!r}") from None


def _shard_name(p: Path) -> str:
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    return name if name.endswith(".jsonl") else name + ".jsonl"


def validate_inputs(paths: Sequence[str], fields: Sequence[str], strict: bool = False) -> list[Path]:
    """Every file exists and no two share an output name; with ``strict``, also every line is a
    JSON object whose ``fields`` are non-empty strings (otherwise such lines are skipped and
    counted when read). The first problem raises DecontamError."""
    out, names = [], {}
    for s in paths:
        p = Path(s)
        if not p.is_file():
            raise DecontamError(f"input not found: {s!r}")
        n = _shard_name(p)
        if n in names:
            raise DecontamError(f"inputs {names[n]!r} and {s!r} would both write {n}")
        names[n] = s
        if strict:
            rep = ReadReport()
            for _ in iter_jsonl(p, rep, required=fields):
                pass
            if rep.n_skipped:
                where, why, detail = rep.samples[0]
                raise DecontamError(f"{s}: line {where}: {why} {detail}".rstrip()
                                    + f" (--text_field {'+'.join(fields)}; {rep.n_skipped} bad lines; "
                                    "without --strict they are skipped and counted)")
        out.append(p)
    return out


def text_fields(text_field: str) -> list[str]:
    """``prompt+solution`` -> ["prompt", "solution"]."""
    fields = [f for f in text_field.split("+") if f]
    if not fields:
        raise DecontamError(f"--text_field is empty: {text_field!r}")
    return fields


def build_decontaminator(taus: Sequence[float] = DEFAULT_TAUS, ngram: int = DEFAULT_NGRAM,
                         remove_tau: float = 0.9, remove_min_ngrams: int = 1,
                         mbpp_split: str | None = "all", humaneval: bool = True,
                         extra_bench: Sequence[str] = (), min_ast_nodes: int = 1,
                         embed: Callable[[list[str]], np.ndarray] = hashed_bow_embed) -> Decontaminator:
    """The benchmark items ``run`` selects, indexed (a Beam worker builds the same one)."""
    items = load_bench_items(humaneval, mbpp_split, extra_bench)
    if not items:
        raise DecontamError("no benchmark items selected")
    return Decontaminator(items, ngram, taus, remove_tau, remove_min_ngrams, embed=embed,
                          min_ast_nodes=min_ast_nodes)


def flagged_row(shard: str, line: int, item: BenchItem, ps: PairScore, removed: bool) -> dict:
    """One line of flagged.jsonl."""
    return {"shard": shard, "line": line, "benchmark": item.benchmark, "task_id": item.task_id,
            "ngram_overlap": ps.ngram_overlap,
            "ast_match": None if ps.ast_match is None else round(ps.ast_match, 4),
            "embed_l2": round(ps.embed_l2, 4), "removed": removed}


class ReportCounts:
    """The counts of report.json, added one document at a time; ``merge`` combines partial
    counts (the Beam pipeline's combiner), so both runs report the same numbers."""

    def __init__(self, taus: Sequence[float]):
        self.taus = list(taus)
        self.shards: dict[str, list[int]] = {}  # shard -> [docs, removed]
        self.ng_pairs: Counter = Counter()
        self.ng_docs = 0
        self.ng_items: set[int] = set()
        self.ast_pairs = {t: Counter() for t in self.taus}  # tau -> benchmark -> pairs
        self.ast_docs = {t: 0 for t in self.taus}
        self.ast_items: dict[float, set[int]] = {t: set() for t in self.taus}
        self.unanalysed: Counter = Counter()  # reason -> documents whose code could not be analysed
        self.skipped: dict[str, Counter] = {}  # shard -> reason -> unreadable lines skipped

    def add_read(self, shard: str, skipped: dict) -> None:
        """A shard's unreadable lines, by reason (``ReadReport.skipped``)."""
        self.skipped.setdefault(shard, Counter()).update(skipped)

    def add(self, shard: str, pairs: Sequence[PairScore], removed: bool,
            items: Sequence[BenchItem], unanalysed: str | None = None) -> None:
        c = self.shards.setdefault(shard, [0, 0])
        c[0] += 1
        c[1] += bool(removed)
        if unanalysed:
            self.unanalysed[unanalysed] += 1
        ng, hit = False, set()
        for ps in pairs:
            bench = items[ps.item].benchmark
            if ps.ngram_overlap:
                self.ng_pairs[bench] += 1
                self.ng_items.add(ps.item)
                ng = True
            for t in self.taus:
                if ps.ast_match is not None and ps.ast_match >= t:
                    self.ast_pairs[t][bench] += 1
                    self.ast_items[t].add(ps.item)
                    hit.add(t)
        self.ng_docs += ng
        for t in hit:
            self.ast_docs[t] += 1

    def merge(self, other: "ReportCounts") -> "ReportCounts":
        for shard, (d, r) in other.shards.items():
            c = self.shards.setdefault(shard, [0, 0])
            c[0] += d
            c[1] += r
        self.ng_pairs.update(other.ng_pairs)
        self.ng_docs += other.ng_docs
        self.ng_items |= other.ng_items
        for t in self.taus:
            self.ast_pairs[t].update(other.ast_pairs[t])
            self.ast_docs[t] += other.ast_docs[t]
            self.ast_items[t] |= other.ast_items[t]
        self.unanalysed.update(other.unanalysed)
        for shard, c in other.skipped.items():
            self.add_read(shard, c)
        return self

    def fields(self, shards: Sequence[str]) -> dict:
        """docs / removed / kept and skipped lines, per shard (in ``shards`` order) and in all;
        n-gram and per-τ AST counts; documents whose code could not be analysed, by reason."""
        per_shard = {}
        for s in shards:
            d, r = self.shards.get(s, (0, 0))
            per_shard[s] = {"docs": d, "kept": d - r, "removed": r,
                            "skipped_lines": dict(sorted(self.skipped.get(s, Counter()).items()))}
        skipped = sum((Counter(v["skipped_lines"]) for v in per_shard.values()), Counter())
        n_docs = sum(v["docs"] for v in per_shard.values())
        n_removed = sum(v["removed"] for v in per_shard.values())
        return {
            "docs": n_docs, "removed": n_removed, "kept": n_docs - n_removed, "shards": per_shard,
            "skipped_lines": dict(sorted(skipped.items())),
            "ast_unanalysed": dict(sorted(self.unanalysed.items())),
            "ngram_overlap": {"pairs": dict(sorted(self.ng_pairs.items())), "docs": self.ng_docs,
                              "items": len(self.ng_items)},
            "ast": {str(t): {"pairs": dict(sorted(self.ast_pairs[t].items())),
                             "docs": self.ast_docs[t], "items": len(self.ast_items[t])}
                    for t in self.taus},
        }


def build_report(inputs: Sequence[str], text_field: str, benchmarks: dict, mbpp_split: str | None, *,
                 ngram: int, taus: Sequence[float], remove_tau: float, remove_min_ngrams: int,
                 min_ast_nodes: int, embedding: tuple[str, dict | None], counts_fields: dict,
                 seconds: float, strict: bool = False) -> dict:
    """report.json's content (``counts_fields``: ``ReportCounts.fields``; ``embedding``:
    ``embed_label``)."""
    return {
        "inputs": list(inputs), "text_field": text_field, "benchmarks": benchmarks,
        "mbpp_split": mbpp_split, "ngram": ngram, "taus": list(taus), "remove_tau": remove_tau,
        "remove_min_ngrams": remove_min_ngrams, "min_ast_nodes": min_ast_nodes, "strict": strict,
        "embedding": embedding[0], "embedding_settings": embedding[1],
        "rule": f"removed iff AST match >= {remove_tau} or >= {remove_min_ngrams} shared "
                f"{ngram}-grams with some benchmark item",
        **counts_fields,
        "seconds": round(seconds, 2),
    }


def write_report(out: Path, report: dict) -> None:
    stage.write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", render_markdown(report).encode())


def _as_embed(embed) -> Callable[[list[str]], np.ndarray]:
    """A callable, a spec (``hashed_bow`` | ``model:PATH``) or ``embed_settings``' dict."""
    if isinstance(embed, str):
        embed = embed_settings(embed)
    return make_embed(embed) if isinstance(embed, dict) else embed


def run(inputs: Sequence[str], text_field: str, out_dir: str | os.PathLike,
        taus: Sequence[float] = DEFAULT_TAUS, ngram: int = DEFAULT_NGRAM, remove_tau: float = 0.9,
        remove_min_ngrams: int = 1, mbpp_split: str | None = "all", humaneval: bool = True,
        extra_bench: Sequence[str] = (), min_ast_nodes: int = 1,
        embed: Callable[[list[str]], np.ndarray] | str | dict = hashed_bow_embed,
        batch_size: int = 64, strict: bool = False) -> dict:
    """Decontaminates ``inputs``; writes <out_dir>/clean/<shard>.jsonl, flagged.jsonl,
    report.json, report.md. Returns the report dict. ``embed``: a function, or
    ``hashed_bow`` / ``model:PATH`` (see ``embed_settings``); documents are scored
    ``batch_size`` at a time (one embedding call per batch). Unreadable lines (blank, not
    UTF-8, over 1 MiB, not a JSON object with the text fields) are skipped and counted by
    reason; ``strict``: any of them is an error before any work."""
    fields = text_fields(text_field)
    if batch_size < 1:
        raise DecontamError(f"batch_size must be >= 1, got {batch_size}")
    paths = validate_inputs(inputs, fields, strict)
    t0 = time.time()
    dec = build_decontaminator(taus, ngram, remove_tau, remove_min_ngrams, mbpp_split, humaneval,
                               extra_bench, min_ast_nodes, _as_embed(embed))
    out = Path(out_dir)
    counts = ReportCounts(dec.taus)
    with stage.AtomicFile(out / "flagged.jsonl") as flagged:  # each file in place only when complete
        for p in paths:
            with stage.AtomicFile(out / "clean" / _shard_name(p)) as clean:
                rep = ReadReport()
                recs = iter_jsonl(p, rep, required=fields)
                while batch := list(itertools.islice(recs, batch_size)):
                    scored = dec.score_docs([join_fields(r, fields) for r in batch])
                    for rec, (pairs, why) in zip(batch, scored):
                        line = rec.pop("_line")
                        rm = dec.removes(pairs)
                        counts.add(str(p), pairs, rm, dec.items, why)
                        for ps in pairs:
                            flagged.write(json.dumps(flagged_row(str(p), line, dec.items[ps.item], ps, rm))
                                          + "\n")
                        if not rm:
                            clean.write(json.dumps(rec, ensure_ascii=False) + "\n")
                counts.add_read(str(p), rep.skipped)
    inputs = [str(p) for p in paths]
    report = build_report(inputs, text_field, dict(Counter(it.benchmark for it in dec.items)), mbpp_split,
                          ngram=ngram, taus=dec.taus, remove_tau=remove_tau,
                          remove_min_ngrams=remove_min_ngrams, min_ast_nodes=min_ast_nodes,
                          embedding=embed_label(dec.embed), counts_fields=counts.fields(inputs),
                          seconds=time.time() - t0, strict=strict)
    write_report(out, report)
    return report


def prune(inputs: Sequence[str | os.PathLike], text_field: str, flagged: str | os.PathLike,
          out_dir: str | os.PathLike, tau: float, benchmarks: Sequence[str] = ("humaneval",)) -> dict:
    """The paper's pruned-data experiment (§5): ``run``'s clean output for ``inputs``, less every
    document whose AST match with an item of ``benchmarks`` is >= ``tau`` (per ``flagged``, the
    flagged.jsonl of that run). Writes <out_dir>/<shard>.jsonl; returns the counts."""
    if not 0.0 < tau <= 1.0:
        raise DecontamError(f"prune tau must be in (0, 1], got {tau}")
    removed, pruned = set(), set()
    for row in iter_jsonl(Path(flagged)) if Path(flagged).exists() else ():
        key = (Path(row["shard"]).name, row["line"])  # by shard name: the run's directory may have moved
        if row["removed"]:
            removed.add(key)
        elif row["benchmark"] in benchmarks and (row.get("ast_match") or 0.0) >= tau:
            pruned.add(key)
    fields = text_fields(text_field)
    out = Path(out_dir)
    counts = {"tau": tau, "benchmarks": list(benchmarks), "docs": 0, "pruned": 0, "kept": 0}
    for p in map(Path, inputs):
        with stage.AtomicFile(out / _shard_name(p)) as f:
            for rec in iter_jsonl(p, ReadReport(), required=fields):
                key = (p.name, rec.pop("_line"))
                if key in removed:
                    continue
                counts["docs"] += 1
                if key in pruned:
                    counts["pruned"] += 1
                    continue
                counts["kept"] += 1
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return counts


def render_markdown(r: dict) -> str:
    lines = ["# Decontamination report", "",
             f"Documents: {r['docs']} in, {r['removed']} removed, {r['kept']} kept. "
             f"Rule: {r['rule']}.", "",
             f"Benchmarks: {r['benchmarks']} (MBPP split: {r['mbpp_split']}). "
             f"Embedding: `{r['embedding']}`.", "",
             f"Unreadable input lines skipped: {r['skipped_lines'] or 'none'}"
             f"{' (strict: none allowed)' if r.get('strict') else ''}. Documents whose code could not "
             f"be analysed (still checked by n-grams and embedding): {r['ast_unanalysed'] or 'none'}.", "",
             "## AST match rate (Table 3 style)", "",
             "| τ | docs | benchmark items | pairs by benchmark |", "|---|---|---|---|"]
    for t, v in r["ast"].items():
        lines.append(f"| {t} | {v['docs']} | {v['items']} | {v['pairs']} |")
    ng = r["ngram_overlap"]
    lines += ["", f"## {r['ngram']}-gram overlap", "",
              f"{ng['docs']} docs share >= 1 {r['ngram']}-gram with {ng['items']} benchmark items; "
              f"pairs by benchmark: {ng['pairs']}.", "", "## Shards", "",
              "| shard | docs | kept | removed |", "|---|---|---|---|"]
    for s, v in r["shards"].items():
        lines.append(f"| {s} | {v['docs']} | {v['kept']} | {v['removed']} |")
    return "\n".join(lines) + "\n"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The stage's flags (shared with ``python -m data_gen.beam_stages decontaminate``)."""
    ap.add_argument("--inputs", nargs="+", required=True, help="JSONL shards (.gz ok)")
    ap.add_argument("--text_field", default="text",
                    help="field, or fields joined by '+' (e.g. prompt+solution)")
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--tau", default=",".join(map(str, DEFAULT_TAUS)))
    ap.add_argument("--ngram", type=int, default=DEFAULT_NGRAM)
    ap.add_argument("--remove_tau", type=float, default=0.9)
    ap.add_argument("--remove_min_ngrams", type=int, default=1)
    ap.add_argument("--min_ast_nodes", type=int, default=1,
                    help="functions with fewer normalised AST nodes are not AST-matched")
    ap.add_argument("--mbpp_split", default="all",
                    help="all | prompt | test | validation | train | none")
    ap.add_argument("--no_humaneval", action="store_true")
    ap.add_argument("--extra_bench", nargs="*", default=[],
                    help="extra JSONL benchmark files (fields task_id, code)")
    ap.add_argument("--embed", default=DEFAULT_EMBED,
                    help="hashed_bow (a cheap fallback) or model:PATH (a phijax checkpoint/export/HF "
                         "dir: mean-pooled hidden states)")
    ap.add_argument("--embed_max_len", type=int, default=None, help="model embedding: tokens per document")
    ap.add_argument("--embed_batch_size", type=int, default=None, help="model embedding: rows per batch")
    ap.add_argument("--strict", action="store_true",
                    help="an unreadable input line (blank, not UTF-8, over 1 MiB, bad JSON or fields) is an "
                         "error (exit 2 before any work) instead of being skipped and counted")


def run_kwargs(args: argparse.Namespace) -> dict:
    """``add_arguments``' flags -> keyword arguments of ``run`` (bad values raise DecontamError);
    ``embed`` is left as ``embed_settings``' picklable dict."""
    split = None if args.mbpp_split == "none" else args.mbpp_split
    if split not in (None, "all", *benchmarks.MBPP_SPLITS):
        raise DecontamError(f"unknown --mbpp_split {args.mbpp_split!r}")
    return dict(taus=_parse_taus(args.tau), ngram=args.ngram, remove_tau=args.remove_tau,
                remove_min_ngrams=args.remove_min_ngrams, mbpp_split=split,
                humaneval=not args.no_humaneval, extra_bench=args.extra_bench,
                min_ast_nodes=args.min_ast_nodes, strict=args.strict,
                embed=embed_settings(args.embed, args.embed_max_len, args.embed_batch_size))


def main(argv: Sequence[str] | None = None) -> int:
    ap = cli.ArgumentParser(description=__doc__)
    add_arguments(ap)
    args = ap.parse_args(argv)
    cli.setup_logging()
    try:
        r = run(args.inputs, args.text_field, args.out_dir, **run_kwargs(args))
    except DecontamError as e:
        return cli.fail(e)
    print(f"{r['docs']} docs, {r['removed']} removed -> {args.out_dir}/report.md")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
