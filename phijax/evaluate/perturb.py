"""Seeded perturbations of HumanEval problems (ReCode-style robustness, Wang et al. 2022).

    rec = perturb_record(humaneval_record, "typo", seed=0, variant=1)   # a new record, same schema
    problem = problems._humaneval(rec)                                   # a Problem, as usual

Every class changes the prompt a model sees while keeping the problem the same: the record's
canonical solution (rewritten where names change) still passes its tests.

* ``typo``: character swaps / drops / duplications in words of the docstrings' prose and simple
  grammatical errors (an article dropped, a/an swapped, "returns" -> "return"). Never in ``>>>``
  lines, their outputs, lines with ``=``/``->``, quoted text or any identifier of the prompt.
* ``paraphrase``: prose words replaced by synonyms from `SYNONYMS`, and clause-order rules
  ("Given X, return Y." -> "Return Y, given X."); prose only, as above.
* ``rename``: the parameters of the functions defined in the prompt renamed (``arg0``..., a
  synonym, or a short name), consistently in the signatures, the docstrings' examples (and their
  prose, for identifier-like names such as ``n``; not for English words such as ``numbers``) and the
  canonical solution (by the positions of the ast's Name / arg nodes, so formatting is kept).
* ``format``: docstring quotes ``\"\"\"`` -> ``'''``, docstring lines re-indented, blank lines
  added, trailing spaces; the code stays valid and means the same.
* ``funcname``: the tested function renamed (a snake_case synonym or ``func_<n>``) in the prompt,
  the canonical solution (recursive calls), helper code and the test; the record's entry_point
  follows, so the program ends with ``check(<new name>)``.

MBPP's ``docstring`` format (problems.signature_prompt: ``def name(arg0, ...)`` + a docstring with
the description and the first test) is perturbed the same way, on records that carry
benchmark="mbpp" and prompt_format="docstring" (robustness.mbpp_records): typo / paraphrase touch the
description only (the ``>>>`` test line is not prose); rename maps ``arg0, ...`` to short letters,
ordinals or ``a, b, ...``; funcname renames the tested function in the prompt, the docstring's test
line and the test's asserts by ast positions (the test is setup code + asserts, no ``check``).

Each variant is seeded by (seed, class, task_id, variant); the functions are pure.
"""
from __future__ import annotations

import ast
import builtins
import hashlib
import io
import keyword
import random
import re
import tokenize

CLASSES = ("typo", "paraphrase", "rename", "format", "funcname")

# Prose synonyms (lowercase keys; the replacement keeps a leading capital).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "return": ("give back", "output", "produce"), "returns": ("gives back", "outputs", "produces"),
    "given": ("provided", "supplied"), "list": ("sequence", "array"), "lists": ("sequences", "arrays"),
    "number": ("value", "numeral"), "numbers": ("values", "numerals"), "string": ("text", "str"),
    "strings": ("texts",), "integer": ("whole number", "int"), "integers": ("whole numbers", "ints"),
    "function": ("routine", "procedure"), "write": ("implement", "create"), "check": ("verify", "test"),
    "checks": ("verifies", "tests"), "find": ("determine", "compute"), "positive": ("strictly positive",),
    "empty": ("blank", "vacant"), "each": ("every",), "characters": ("chars", "letters"),
    "character": ("char", "letter"), "should": ("must", "ought to"), "first": ("initial",),
    "element": ("item", "entry"), "elements": ("items", "entries"), "contains": ("includes", "holds"),
    "input": ("argument", "parameter"), "largest": ("biggest", "greatest"), "smallest": ("least", "tiniest"),
    "sum": ("total",), "count": ("tally", "number"), "word": ("term",), "words": ("terms",),
    "true": ("True",), "false": ("False",), "otherwise": ("else",), "returned": ("given back", "output"),
    "task": ("job", "assignment"), "example": ("instance", "illustration"), "examples": ("instances",),
    "take": ("accept", "receive"), "takes": ("accepts", "receives"), "array": ("list", "sequence"),
    "vowels": ("vowel letters",), "order": ("ordering", "sequence"), "new": ("fresh",),
    "only": ("solely", "just"), "also": ("additionally",), "whether": ("if",), "value": ("number",),
}
# Clause-order rules on one prose line.
CLAUSE_RULES = (
    (re.compile(r"^(\s*)Given (.+?), return (.+?)\.(\s*)$"), lambda m: f"{m[1]}Return {m[3]}, given {m[2]}.{m[4]}"),
    (re.compile(r"^(\s*)If (.+?), return (.+?)\.(\s*)$"), lambda m: f"{m[1]}Return {m[3]} if {m[2]}.{m[4]}"),
    (re.compile(r"^(\s*)(.+?) returns (.+?) if (.+?)\.(\s*)$"),
     lambda m: f"{m[1]}If {m[4]}, {m[2][0].lower() + m[2][1:]} returns {m[3]}.{m[5]}"),
)
VERB_AGREEMENT = {"returns": "return", "takes": "take", "contains": "contain", "is": "are", "has": "have",
                  "does": "do", "are": "is", "gives": "give", "checks": "check"}
# Name parts -> snake_case synonyms (funcname, rename).
NAME_SYNONYMS = {
    "sum": "total", "count": "tally", "is": "check", "get": "fetch", "find": "search", "sort": "order",
    "sorted": "ordered", "max": "largest", "min": "smallest", "number": "num", "numbers": "nums",
    "string": "text", "strings": "texts", "list": "seq", "lst": "seq", "arr": "array", "num": "value",
    "prime": "primal", "words": "tokens", "word": "token", "len": "length", "digits": "figures",
    "make": "build", "remove": "drop", "filter": "select", "by": "using", "all": "every", "to": "into",
    "check": "verify", "values": "vals", "text": "string", "s": "text", "n": "count", "x": "value",
    "a": "first", "b": "second", "l": "items", "k": "amount", "encode": "encrypt", "decode": "decrypt",
}
SHORT_NAMES = ("p", "q", "z", "w", "u", "v", "t", "r")
MBPP_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
MBPP_LETTERS = ("a", "b", "c", "d", "e", "f", "g", "h")
STOP_WORDS = {"a", "an", "i", "in", "is", "or", "and", "to", "of", "on", "at", "as", "it", "be", "by", "if"}

_WORD = re.compile(r"(?<![\w'\"`\\.\[(])([A-Za-z]+)(?![\w'\"`(\]])")
_QUOTED = re.compile(r"\"[^\"\n]*\"|`[^`\n]*`|(?<![A-Za-z])'[^'\n]*'(?![A-Za-z])")


def rng_for(seed: int, cls: str, task_id: str, variant: int) -> random.Random:
    h = hashlib.sha256(f"{seed}|{cls}|{task_id}|{variant}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


# ------------------------------------------------------------------------------- docstrings / prose

def _code_names(src: str) -> set[str]:
    """Every NAME token of `src` outside strings (identifiers and keywords)."""
    try:
        return {t.string for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.NAME}
    except (tokenize.TokenError, SyntaxError):
        return set(re.findall(r"[A-Za-z_]\w*", src))


def docstring_spans(src: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the triple-quoted string tokens of `src`."""
    lines = src.splitlines(keepends=True)
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln))
    out = []
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        body = t.string.lstrip("rRuUbB")
        if t.type == tokenize.STRING and body[:3] in ('"""', "'''") and not re.match(r"[fF]", t.string):
            out.append((starts[t.start[0] - 1] + t.start[1], starts[t.end[0] - 1] + t.end[1]))
    return out


def prose_lines(doc: str) -> list[bool]:
    """For each line of a docstring's text: whether it is prose (may be perturbed). Not prose:
    ``>>>`` lines and every line up to the next blank line after one, and lines that look like code
    or examples (``=``, ``->``, ``=>``, ``➞``, ``...`` at the start)."""
    out, in_example = [], False
    for ln in doc.split("\n"):
        s = ln.strip()
        if s.startswith(">>>"):
            in_example = True
        elif not s:
            in_example = False
        out.append(bool(s) and not in_example and not s.startswith("...") and
                   not any(c in s for c in ("=", "->", "➞", "→", ">>>")))
    return out


def map_prose(prompt: str, fn) -> str:
    """`prompt` with fn(line) applied to every prose line of its docstrings."""
    pieces, last = [], 0
    for a, b in docstring_spans(prompt):
        tok = prompt[a:b]
        prefix_len = len(tok) - len(tok.lstrip("rRuUbB")) + 3
        head, body, tail = tok[:prefix_len], tok[prefix_len:-3], tok[-3:]
        lines = body.split("\n")
        new = [fn(ln) if prose else ln for ln, prose in zip(lines, prose_lines(body))]
        pieces += [prompt[last:a], head, "\n".join(new), tail]
        last = b
    return "".join(pieces) + prompt[last:]


def _words(line: str, protected: set[str]) -> list[re.Match]:
    """The perturbable words of a prose line: not quoted, not identifiers of the prompt."""
    masked = _QUOTED.sub(lambda m: " " * len(m[0]), line)
    return [m for m in _WORD.finditer(masked) if m[1] not in protected]


def _replace_words(line: str, edits: dict[int, tuple[int, str]]) -> str:
    for start in sorted(edits, reverse=True):
        end, new = edits[start]
        line = line[:start] + new + line[end:]
    return line


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    op = rng.choice(("swap", "drop", "dup"))
    if op == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "dup":
        return word[:i] + word[i] + word[i:]
    return word[:i] + word[i + 1:]


def _protected(prompt: str, extra=()) -> set[str]:
    return _code_names(prompt) | set(extra)


def typo(prompt: str, rng: random.Random, rate: float = 0.12) -> str:
    """Character-level typos and grammatical errors in the docstrings' prose."""
    protected = _protected(prompt)

    def fn(line):
        edits = {}
        for m in _words(line, protected):
            w, low = m[1], m[1].lower()
            if rng.random() >= rate:
                continue
            if low in ("a", "an", "the") and rng.random() < 0.5:
                end = m.end() + 1 if line[m.end():m.end() + 1] == " " else m.end()
                edits[m.start()] = (end, "")
            elif low in ("a", "an"):
                edits[m.start()] = (m.end(), {"a": "an", "an": "a"}[low] if w.islower() else w[0] + "n"[:len(w) == 1])
            elif low in VERB_AGREEMENT:
                edits[m.start()] = (m.end(), _case_like(w, VERB_AGREEMENT[low]))
            elif len(w) >= 4:
                edits[m.start()] = (m.end(), _typo(w, rng))
        return _replace_words(line, edits)
    out = map_prose(prompt, fn)
    if out == prompt:  # nothing drawn: one typo in the longest prose word
        words = []
        map_prose(prompt, lambda ln: words.extend(m[1] for m in _words(ln, protected) if len(m[1]) >= 4) or ln)
        if words:
            target = max(words, key=len)
            done = []

            def once(ln):
                if done:
                    return ln
                for m in _words(ln, protected):
                    if m[1] == target:
                        done.append(1)
                        return ln[:m.start()] + _typo(target, rng) + ln[m.end():]
                return ln
            out = map_prose(prompt, once)
    return out


def _case_like(orig: str, new: str) -> str:
    return new[0].upper() + new[1:] if orig[0].isupper() else new


def paraphrase(prompt: str, rng: random.Random, rate: float = 0.6) -> str:
    """Synonyms from SYNONYMS and clause-order rules in the docstrings' prose."""
    protected = _protected(prompt)

    def fn(line):
        for pat, rule in CLAUSE_RULES:
            m = pat.match(line)
            if m and not _QUOTED.search(line) and rng.random() < 0.8:
                line = rule(m)
                break
        edits = {}
        for m in _words(line, protected):
            syn = SYNONYMS.get(m[1].lower())
            if syn and rng.random() < rate:
                edits[m.start()] = (m.end(), _case_like(m[1], rng.choice(syn)))
        return _replace_words(line, edits)
    return map_prose(prompt, fn)


def reformat(prompt: str, rng: random.Random) -> str:
    """Whitespace and quote-style changes that keep the code valid and its meaning."""
    ops = [op for op in ("quotes", "indent", "blank", "trailing") if rng.random() < 0.5] or \
        [rng.choice(("quotes", "indent", "blank", "trailing"))]
    out = prompt
    if "indent" in ops:  # docstring continuation lines one or two spaces further (string content only)
        extra = " " * rng.choice((1, 2))
        out = _map_docstrings(out, lambda body: "\n".join(ln if i == 0 else (extra + ln if ln.strip() else ln)
                                                          for i, ln in enumerate(body.split("\n"))))
    if "blank" in ops:  # a blank line after each def line, and one inside the docstring after its first line
        out = re.sub(r"^(def [^\n]*:\n)", r"\1\n", out, flags=re.M)
        out = _map_docstrings(out, lambda body: body.replace("\n", "\n\n", 1) if "\n" in body.strip("\n")
                              else body)
    if "trailing" in ops:  # trailing spaces on code lines (never after a line continuation)
        out = "\n".join(ln + " " * rng.choice((1, 2, 4)) if ln.strip() and not ln.endswith("\\") else ln
                        for ln in out.split("\n"))
    if "quotes" in ops or out == prompt:
        out = _map_docstrings(out, None, quotes=True)
    if out == prompt:  # no docstring: indent the code by tabs? no -- add a blank line at the top
        out = "\n" + out
    return out


def _map_docstrings(src: str, fn, quotes: bool = False) -> str:
    pieces, last = [], 0
    for a, b in docstring_spans(src):
        tok = src[a:b]
        plen = len(tok) - len(tok.lstrip("rRuUbB"))
        prefix, q, body = tok[:plen], tok[plen:plen + 3], tok[plen + 3:-3]
        if fn is not None:
            body = fn(body)
        if quotes and q == '"""' and "'''" not in body and not body.endswith(("'", "\\")):
            q = "'''"
        pieces += [src[last:a], prefix, q, body, q]
        last = b
    return "".join(pieces) + src[last:]


# --------------------------------------------------------------------------------------- renaming

def _spans_of(tree: ast.AST, src: str, mapping: dict[str, str]) -> list[tuple[int, int, str]]:
    """(line, byte col, new) of every Name / arg / def-name / keyword-of-a-renamed-function that
    `mapping` renames."""
    lines = src.split("\n")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in mapping:
            out.append((node.lineno, node.col_offset, node.id))
        elif isinstance(node, ast.arg) and node.arg in mapping:
            out.append((node.lineno, node.col_offset, node.arg))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in mapping:
            b = lines[node.lineno - 1].encode()
            m = re.compile(rb"def\s+" + re.escape(node.name.encode()) + rb"\b").search(b, node.col_offset)
            out.append((node.lineno, m.end() - len(node.name.encode()), node.name))
        elif isinstance(node, (ast.Global, ast.Nonlocal)) and set(node.names) & set(mapping):
            raise ValueError("global/nonlocal of a renamed name")
    return out


def rename_code(src: str, mapping: dict[str, str]) -> str:
    """`src` with the identifiers in `mapping` renamed at their ast positions (formatting kept);
    checked against an ast-level rename."""
    if not mapping:
        return src
    tree = ast.parse(src)
    lines = src.split("\n")
    for lineno, col, old in sorted(_spans_of(tree, src, mapping), reverse=True):
        b = lines[lineno - 1].encode()
        assert b[col:col + len(old.encode())] == old.encode(), (b, col, old)
        lines[lineno - 1] = (b[:col] + mapping[old].encode() + b[col + len(old.encode()):]).decode()
    out = "\n".join(lines)
    if ast.dump(ast.parse(out)) != ast.dump(_RenameAst(mapping).visit(ast.parse(src))):
        raise ValueError("renaming by positions disagrees with the ast rename")
    return out


class _RenameAst(ast.NodeTransformer):
    def __init__(self, mapping):
        self.mapping = mapping

    def visit_Name(self, node):
        node.id = self.mapping.get(node.id, node.id)
        return node

    def visit_arg(self, node):
        node.arg = self.mapping.get(node.arg, node.arg)
        self.generic_visit(node)
        return node

    def _def(self, node):
        node.name = self.mapping.get(node.name, node.name)
        self.generic_visit(node)
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _def


def _rename_in_docstrings(prompt: str, mapping: dict[str, str]) -> str:
    """Renamed in the docstrings too: everywhere for identifier-like names (``n``, ``arr_len``), only
    outside the prose (examples) for names that are also English words (``numbers``, ``longest``, ``a``)."""
    def fn(body):
        for old, new in mapping.items():
            pat = re.compile(rf"(?<![\w'.])({re.escape(old)})(?![\w'])")
            wordlike = old.lower() in STOP_WORDS or (len(old) > 1 and old.isalpha() and old.islower())
            body = "\n".join(ln if wordlike and prose else pat.sub(new, ln)
                             for ln, prose in zip(body.split("\n"), prose_lines(body)))
        return body
    return _map_docstrings(prompt, fn)


_EXAMPLE = re.compile(r"^(\s*>>> )(.*)$")


def _rename_in_mbpp_docstring(prompt: str, mapping: dict[str, str]) -> str:
    """MBPP ``docstring`` prompts: the test line (``>>> assert ...``) renamed by its ast positions,
    like the test's asserts; the prose as `_rename_in_docstrings` does."""
    def fn(body):
        lines, prose = body.split("\n"), prose_lines(body)
        for i, ln in enumerate(lines):
            m = _EXAMPLE.match(ln)
            if m:
                try:
                    lines[i] = m[1] + rename_code(m[2], mapping)
                except (SyntaxError, ValueError):
                    lines[i] = re.sub(rf"(?<![\w'.])({'|'.join(map(re.escape, mapping))})(?![\w'])",
                                      lambda x: mapping[x[1]], ln)
            elif prose[i]:
                for old, new in mapping.items():
                    wordlike = old.lower() in STOP_WORDS or (len(old) > 1 and old.isalpha() and old.islower())
                    if not wordlike:
                        lines[i] = re.sub(rf"(?<![\w'.])({re.escape(old)})(?![\w'])", new, lines[i])
        return "\n".join(lines)
    return _map_docstrings(prompt, fn)


def _split_program(prompt: str, solution: str, mapping: dict[str, str]) -> tuple[str, str]:
    """Rename in prompt + solution parsed together (the solution is the body of the prompt's last def)."""
    assert prompt.endswith("\n")
    n = prompt.count("\n")
    whole = rename_code(prompt + solution, mapping).split("\n")
    return "\n".join(whole[:n]) + "\n", "\n".join(whole[n:])


def _taken(rec: dict) -> set[str]:
    names = set()
    for src in (rec["prompt"] + rec["canonical_solution"], rec["test"]):
        names |= _code_names(src)
    return names | set(dir(builtins)) | set(keyword.kwlist) | {"candidate", "check"}


def _fresh(name: str, taken: set[str]) -> str:
    base, i = name, 2
    while name in taken or not name.isidentifier() or keyword.iskeyword(name):
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def _synonym_name(name: str, rng: random.Random) -> str | None:
    parts = name.split("_")
    idx = [i for i, p in enumerate(parts) if p.lower() in NAME_SYNONYMS]
    if not idx:
        return None
    i = rng.choice(idx)
    parts[i] = NAME_SYNONYMS[parts[i].lower()]
    return "_".join(parts)


def _prompt_params(prompt: str) -> list[str]:
    tree = ast.parse(prompt)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
                if arg.arg not in out and arg.arg != "self":
                    out.append(arg.arg)
    return out


def _is_mbpp(rec: dict) -> bool:
    return rec.get("benchmark") == "mbpp"


def rename_params(rec: dict, rng: random.Random) -> tuple[dict, dict[str, str]]:
    """The parameters of the prompt's functions renamed everywhere (prompt, docstrings, solution).
    MBPP's ``docstring`` prompts already name them ``arg0, arg1, ...``: short letters, ordinals
    (``first, second, ...``) or ``a, b, c, ...`` instead."""
    params = _prompt_params(rec["prompt"])
    taken = _taken(rec)
    if _is_mbpp(rec):
        scheme = rng.choice(("short", "ordinal", "letters"))
        if scheme != "short":
            names = MBPP_ORDINALS if scheme == "ordinal" else MBPP_LETTERS
            mapping = {p: _fresh(names[i] if i < len(names) else f"{names[0]}{i}", taken)
                       for i, p in enumerate(params)}
            return _renamed_params(rec, mapping), mapping
    else:
        scheme = rng.choice(("arg", "synonym", "short"))
    mapping = {}
    shorts = list(SHORT_NAMES)
    rng.shuffle(shorts)
    for i, p in enumerate(params):
        if scheme == "arg":
            new = f"arg{i}"
        elif scheme == "synonym":
            new = _synonym_name(p, rng) or f"{p}_value"
        else:
            new = shorts[i % len(shorts)] + ("" if i < len(shorts) else str(i))
        mapping[p] = _fresh(new, taken)
    return _renamed_params(rec, mapping), mapping


def _renamed_params(rec: dict, mapping: dict[str, str]) -> dict:
    prompt, solution = _split_program(rec["prompt"], rec["canonical_solution"], mapping)
    rename_doc = _rename_in_mbpp_docstring if _is_mbpp(rec) else _rename_in_docstrings
    return {**rec, "prompt": rename_doc(prompt, mapping), "canonical_solution": solution}


def rename_function(rec: dict, rng: random.Random) -> tuple[dict, dict[str, str]]:
    """The tested function renamed in the prompt, docstrings, solution and test; entry_point follows."""
    old = rec["entry_point"]
    taken = _taken(rec)
    syn = _synonym_name(old, rng) if rng.random() < 0.6 else None
    new = _fresh(syn or f"func_{rng.randrange(1000)}", taken)
    mapping = {old: new}
    prompt, solution = _split_program(rec["prompt"], rec["canonical_solution"], mapping)
    rename_doc = _rename_in_mbpp_docstring if _is_mbpp(rec) else _rename_in_docstrings
    return {**rec, "prompt": rename_doc(prompt, mapping), "canonical_solution": solution,
            "test": rename_code(rec["test"], mapping), "entry_point": new}, mapping


# ------------------------------------------------------------------------------------ entry point

def perturb_record(rec: dict, cls: str, *, seed: int, variant: int) -> dict:
    """A HumanEval record (task_id, prompt, canonical_solution, test, entry_point) -- or an MBPP
    ``docstring`` record (the same fields plus benchmark="mbpp", prompt_format="docstring"; test =
    setup code + the three asserts) -- perturbed by `cls`; the result has the same fields plus
    "perturbation": {class, variant, seed, renamed}."""
    if cls not in CLASSES:
        raise ValueError(f"unknown perturbation class {cls!r}; expected one of {', '.join(CLASSES)}")
    rng = rng_for(seed, cls, rec["task_id"], variant)
    mapping: dict[str, str] = {}
    if cls == "typo":
        out = {**rec, "prompt": typo(rec["prompt"], rng)}
    elif cls == "paraphrase":
        out = {**rec, "prompt": paraphrase(rec["prompt"], rng)}
    elif cls == "format":
        out = {**rec, "prompt": reformat(rec["prompt"], rng)}
    elif cls == "rename":
        out, mapping = rename_params(rec, rng)
    else:
        out, mapping = rename_function(rec, rng)
    keep = ("task_id", "prompt", "canonical_solution", "test", "entry_point") + \
        tuple(k for k in ("benchmark", "prompt_format") if k in rec)
    return {**{k: out[k] for k in keep},
            "perturbation": {"class": cls, "variant": variant, "seed": seed, "renamed": mapping}}
