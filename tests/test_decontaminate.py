"""Decontamination (data_gen/decontaminate.py): planted HumanEval contamination is caught by
AST match and 13-gram overlap, common idioms are not, and the CLI removes exactly the
planted documents and counts them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_gen import decontaminate as D
from phijax.data.benchmarks import load_humaneval

REPO = Path(__file__).resolve().parent.parent
HE = load_humaneval()
HE0 = HE[0]["prompt"] + HE[0]["canonical_solution"]  # has_close_elements

RENAMED = (HE0.replace("has_close_elements", "any_near").replace("numbers", "vals")
           .replace("threshold", "eps").replace("idx2", "j").replace("idx", "i")
           .replace("elem2", "b").replace("elem", "a").replace("distance", "gap"))
REFORMATTED = '''from typing import List
def has_close_elements(numbers: List[float], threshold: float) -> bool:
    for idx, elem in enumerate(numbers):
        for idx2, elem2 in enumerate(numbers):
            if (idx != idx2):
                distance = abs(
                    elem - elem2)
                if (distance < threshold): return True
    return False
'''
PARAPHRASED = HE0.replace(
    "Check if in given list of numbers, are any two numbers closer to each other than\n"
    "    given threshold.",
    "Tell whether some pair of distinct entries differs by less than the threshold.")
IDIOMS = '''
def weighted_total(values, weights):
    """Sum of values scaled by weights."""
    total = 0
    for i in range(len(values)):
        total += values[i] * weights[i]
    return total


def main():
    data = [1, 2, 3]
    print(weighted_total(data, [0.5, 0.25, 0.25]))


if __name__ == '__main__':
    main()
'''
IDIOMS2 = '''
class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count=1):
        self.items[name] = self.items.get(name, 0) + count
        return self.items[name]

    def report(self):
        lines = []
        for key in sorted(self.items):
            lines.append(f"{key}: {self.items[key]}")
        return "\\n".join(lines)
'''


@pytest.fixture(scope="module")
def dec():
    # HumanEval + the MBPP test split: every idiom check runs against 664 references.
    return D.Decontaminator(D.load_bench_items(True, "test"))


def _best(dec, text, task_id="HumanEval/0"):
    pairs = {dec.items[p.item].task_id: p for p in dec.score(text)}
    return pairs.get(task_id), pairs


def test_planted_variants_are_caught(dec):
    assert RENAMED != HE0 and PARAPHRASED != HE0 and "any_near" in RENAMED
    for name, text in [("renamed", RENAMED), ("reformatted", REFORMATTED),
                       ("paraphrased", PARAPHRASED)]:
        p, _ = _best(dec, text)
        assert p is not None, name
        assert p.ast_match is not None and p.ast_match >= 0.95, (name, p)
        assert dec.removes([p]), name
    # The body survives the docstring paraphrase, so 13-grams catch it as well.
    p, _ = _best(dec, PARAPHRASED)
    assert p.ngram_overlap >= 10
    # The embedding distance to the source is the smallest of all flagged pairs.
    _, pairs = _best(dec, PARAPHRASED)
    assert min(pairs.values(), key=lambda q: q.embed_l2) is pairs["HumanEval/0"]


def test_common_idioms_not_flagged(dec):
    for text in (IDIOMS, IDIOMS2):
        pairs = dec.score(text)
        assert not dec.removes(pairs), [(dec.items[p.item].task_id, p) for p in pairs]
        assert all(p.ast_match is None or p.ast_match < 0.9 for p in pairs)


def test_ast_normalisation_and_partial_match(dec):
    [a] = D.normalize_functions("def f(x):\n    '''doc'''\n    return x + 1\n")
    [b] = D.normalize_functions("def  g( y ) :\n  return (y+7)")
    [c] = D.normalize_functions("def g(y):\n    return y + 'a'\n")
    assert a.key == b.key and a.labels == b.labels  # names, docstring, layout, int values
    assert a.key != c.key and D.tree_edit_distance(a, c) == 1  # int literal vs str literal
    # A genuine near-miss goes through the real tree edit distance: 4 extra nodes.
    near = HE0.replace("    return False", "    print('done')\n    return False")
    p, _ = _best(dec, near)
    [t_near] = D.normalize_functions(near)
    [t_src] = D.normalize_functions(HE0)
    assert t_near.size == t_src.size + 4
    assert p.ast_match == pytest.approx(1 - 4 / t_near.size)


# The renamed solution without its docstring: no 13-gram survives, only the AST match can catch it.
BARE = RENAMED[:RENAMED.index('    """')] + RENAMED[RENAMED.index("    for i, a"):]
EDITED = {
    "unused local": BARE.replace("    for i, a", "    unused = 0\n    for i, a", 1),
    "method": "class Checker:\n" + "".join("    " + l if l.strip() else l for l in
                                           BARE.replace("any_near(vals", "any_near(self, vals").splitlines(True)),
    "reordered arguments": BARE.replace("vals: List[float], eps: float", "eps: float, vals: List[float]"),
}


@pytest.mark.parametrize("edit", list(EDITED))
def test_structural_match_survives_renaming_edits(dec, edit):
    # Numbering identifiers by first occurrence relabelled every later name after one such edit
    # (match 0.3-0.8); labels by role (parameter / local / free / import), dead stores dropped,
    # parameters in canonical order and a method's receiver dropped make these exact matches.
    text = EDITED[edit]
    assert "has_close_elements" not in text and "threshold" not in text and '"""' not in text
    p, _ = _best(dec, text)
    assert p is not None and p.ngram_overlap == 0, p
    assert p.ast_match == 1.0 and dec.removes([p]), p
    # A real change still costs: returning the distance instead of a bool.
    changed = text.replace("return True", "return gap")
    q, _ = _best(dec, changed)
    assert q is not None and 0.9 <= q.ast_match < 1.0


def test_identifier_roles_and_imports_in_labels():
    [t] = D.normalize_functions("import numpy as np\ndef f(a, b):\n    c = np.sqrt(a)\n"
                                "    return len(c) + g(b)\n")
    assert [l for l in t.labels if l.startswith("Name:")] == ["Name:l", "Name:numpy", "Name:p", "Name:len",
                                                                 "Name:l", "Name:g", "Name:p"]
    [u] = D.normalize_functions("from numpy import sqrt\ndef f(b, a):\n    d = sqrt(a)\n    return len(d)\n")
    assert "Name:numpy.sqrt" in u.labels
    # A dead store of a call is kept (the call may matter); of a pure value, dropped.
    [v] = D.normalize_functions("def f(x):\n    y = x + 1\n    z = log(x)\n    return x\n")
    assert v.labels.count("Assign") == 1 and "BinOp" not in v.labels


DEEP = {  # the documents: 3.6 KB, a few hundred chained method calls / + terms
    "method chain": "def clean(s):\n    return s" + ".strip()" * 450 + "\n",
    "plus chain": "def total(x):\n    return " + " + ".join(["x"] * 900) + "\n",
}
TOO_DEEP = {  # beyond the parser's own limits
    "parentheses": "x = " + "(" * 300 + "1" + ")" * 300 + "\n",
    "plus chain": "x = " + " + ".join(["x"] * 5000) + "\n",
    "unary minus": "x = " + "-" * 20000 + "1\n",
}


def test_deep_nesting_is_analysed_or_counted_never_a_crash(dec, tmp_path):
    for name, doc in DEEP.items():
        assert 3000 < len(doc) < 4000, name
        trees, why = D.analyse(doc)
        assert why is None and len(trees) == 1 and trees[0].size > 900, name  # iterative walks
        p, _ = _best(dec, doc + "\n\n" + BARE)  # the deep function does not hide its neighbour
        assert p.ast_match == 1.0, name
    reasons = set()
    for name, code in TOO_DEEP.items():
        (pairs, why), = dec.score_docs([code + HE0])
        assert why in ("parser_nesting_limit", "parser_recursion_limit", "parser_memory_limit"), (name, why)
        reasons.add(why)
        he0 = [p for p in pairs if dec.items[p.item].task_id == "HumanEval/0"]
        assert he0 and he0[0].ngram_overlap > 0 and dec.removes(pairs), name  # n-grams still check it
    shard = tmp_path / "deep.jsonl"
    shard.write_text("".join(json.dumps({"text": t}) + "\n"
                             for t in [*DEEP.values(), TOO_DEEP["parentheses"] + HE0, IDIOMS]))
    rep = D.run([str(shard)], "text", tmp_path / "out", mbpp_split="test")
    assert (rep["docs"], rep["removed"]) == (4, 1)
    assert rep["ast_unanalysed"] == {"parser_nesting_limit": 1}
    assert "could not be analysed (still checked by n-grams and embedding): {'parser_nesting_limit': 1}" \
        in (tmp_path / "out" / "report.md").read_text()


BLOCK_DOCS = {  # textbook prose holding the renamed solution in each kind of code block
    "untagged fence": f"Here is how:\n\n```\n{BARE}```\n\nDone.\n",
    "tilde fence": f"Here is how:\n\n~~~python\n{BARE}~~~\n\nDone.\n",
    "other tag": f"Here is how:\n\n```text\n{BARE}```\n\nDone.\n",
    "indented": "Here is how:\n\n" + "".join("    " + l if l.strip() else l for l in BARE.splitlines(True))
                + "\nDone.\n",
    "unclosed fence": f"Here is how:\n\n````py\n{BARE}",
    "indented fence": "1. Step one:\n\n   ```python\n" + "".join("   " + l if l.strip() else l
                                                            for l in BARE.splitlines(True)) + "   ```\n",
}


@pytest.mark.parametrize("kind", list(BLOCK_DOCS))
def test_every_code_block_is_examined(dec, kind):
    text = BLOCK_DOCS[kind]
    assert D.parse_python(text)[0] is None  # prose: the whole text does not parse
    p, _ = _best(dec, text)
    assert p is not None and p.ast_match == 1.0 and dec.removes([p]), (kind, p)


def test_code_blocks():
    doc = ("Intro.\n\n```\na = 1\n```\n\n~~~~\nb = 2\n~~~\nc = 3\n~~~~\n\n    d = 4\n\n    e = 5\n"
           "text\n    not code: no blank line before\n\n```bash\n    ls\n```\n")
    assert D.code_blocks(doc) == ["a = 1", "b = 2\n~~~\nc = 3", "d = 4\n\ne = 5", "ls"]


def test_a_document_is_walked_once(monkeypatch):
    """analyse() finds imports, methods and functions in one walk of each parsed module."""
    import ast

    walked = []
    walk = ast.walk
    monkeypatch.setattr(ast, "walk", lambda node: walked.append(type(node).__name__) or walk(node))
    text = ("import numpy as np\nclass A:\n    def m(self, x):\n        return np.sqrt(x)\n"
            "    @staticmethod\n    def s(y):\n        return y\ndef f(a):\n    def g(b):\n        return b\n"
            "    return g(a)\n")
    trees, why = D.analyse(text)
    assert why is None and len(trees) == 4  # m, s, f and the nested g
    assert walked.count("Module") == 1, walked
    # What the walk found: the import (np -> numpy) and the method m (its receiver dropped), not
    # the static method s (its parameter kept).
    [m] = [t for t in trees if "Name:numpy" in t.labels]
    [s] = [t for t in trees if "Name:staticmethod" in t.labels]
    assert m.labels.count("arg") == 1 and s.labels.count("arg") == 1


def test_zhang_shasha_known_distance():
    # The Zhang & Shasha (1989) example: f(d(a c(b)) e) -> f(c(d(a b)) e) costs 2.
    a = D.flatten_tree(("f", (("d", (("a", ()), ("c", (("b", ()),)))), ("e", ()))))
    b = D.flatten_tree(("f", (("c", (("d", (("a", ()), ("b", ()))),)), ("e", ()))))
    assert D.tree_edit_distance(a, b) == 2
    assert D.tree_edit_distance(a, a) == 0
    assert D.match_upper_bound(a, b) >= 1 - 2 / 6


def test_ngrams_and_embedding_hook():
    assert D.ngrams("a b c", 13) == set()
    assert len(D.ngrams(" ".join(map(str, range(20))), 13)) == 8
    idx = D.NgramIndex(["x = foo(a, b) + bar(c, d) * 2"], n=5)
    # shared run "x = foo ( a , b ) + bar (" is 11 tokens -> 7 distinct 5-grams
    assert idx.overlaps("y = 1\nx = foo(a, b) + bar(q)")[0] == 7
    calls = []

    def embed(texts):  # a stand-in model embedding: only the seam is under test
        calls.append(len(texts))
        return np.array([[len(t), 1.0] for t in texts])

    i, d = D.nearest_embedding(["aaaa", "a"], ["a", "aaaaaaaa", "zz"], embed)
    assert calls == [2, 3]
    assert i.tolist() == [1, 0] and d[1] == pytest.approx(0.0, abs=1e-6)
    e = D.hashed_bow_embed(["for i in range", "range in for i"])
    assert np.allclose(e[0], e[1]) and e.shape == (2, 1024)


def _rec(code: str) -> dict:
    """Splits code into an exercise-style prompt (up to the first body line) + solution."""
    lines = code.splitlines(keepends=True)
    k = next(i for i, l in enumerate(lines) if l.startswith("def ") or l.startswith("class "))
    return {"prompt": "".join(lines[:k + 1]), "solution": "".join(lines[k + 1:])}


def test_cli_end_to_end(tmp_path):
    planted = [RENAMED, REFORMATTED, PARAPHRASED]
    clean = [IDIOMS, IDIOMS2]
    docs = [planted[0], clean[0], planted[1], clean[1], planted[2]]
    shard = tmp_path / "ex.jsonl"
    shard.write_text("".join(json.dumps({**_rec(c), "id": i}) + "\n" for i, c in enumerate(docs)))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "data_gen.decontaminate", "--inputs", str(shard),
                        "--text_field", "prompt+solution", "--out_dir", str(out),
                        "--mbpp_split", "test"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    kept = [json.loads(l) for l in (out / "clean" / "ex.jsonl").read_text().splitlines()]
    assert [k["id"] for k in kept] == [1, 3]  # exactly the clean docs, in order, fields intact
    assert kept[0]["prompt"] + kept[0]["solution"] == IDIOMS
    rep = json.loads((out / "report.json").read_text())
    assert (rep["docs"], rep["removed"], rep["kept"]) == (5, 3, 2)
    assert rep["benchmarks"] == {"humaneval": 164, "mbpp": 500}
    assert [rep["ast"][t]["docs"] for t in ("0.95", "0.9", "0.85", "0.8")] == [3, 3, 3, 3]
    assert rep["ast"]["0.95"]["pairs"] == {"humaneval": 3}
    assert rep["ast"]["0.95"]["items"] == 1
    assert rep["ngram_overlap"]["docs"] == 3
    flagged = [json.loads(l) for l in (out / "flagged.jsonl").read_text().splitlines()]
    assert {f["line"] for f in flagged} == {1, 3, 5} and all(f["removed"] for f in flagged)
    he0 = [f for f in flagged if f["task_id"] == "HumanEval/0"]
    assert len(he0) == 3 and all(f["ast_match"] == 1.0 and f["embed_l2"] < 1 for f in he0)
    md = (out / "report.md").read_text()
    assert "| 0.95 | 3 | 1 |" in md and "5 in, 3 removed, 2 kept" in md
    assert not [p for p in out.rglob("*.tmp")]


def test_cli_bad_input_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert D.main(["--inputs", str(missing), "--out_dir", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err and not (tmp_path / "o").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "def f():\n", "solution": "  pass\n"}) + "\n"
                   + json.dumps({"prompt": "def g():\n"}) + "\n")
    assert D.main(["--inputs", str(bad), "--text_field", "prompt+solution", "--strict",
                   "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "missing_solution" in err and str(bad) in err
    assert D.main(["--inputs", str(bad), "--text_field", "prompt", "--tau", "0.9,x",
                   "--out_dir", str(tmp_path / "o")]) == 2
    assert "--tau" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_lines_are_skipped_and_counted_unless_strict(tmp_path, capsys):
    # A blank line, a non-UTF-8 line and an oversized line used to reject the whole file.
    shard = tmp_path / "ex.jsonl"
    with open(shard, "wb") as f:
        f.write((json.dumps({"text": IDIOMS, "id": 0}) + "\n\n").encode())
        f.write(b'{"text": "caf\xe9 = 1", "id": 1}\n')
        f.write((json.dumps({"text": "x" * (1 << 20), "id": 2}) + "\n").encode())
        f.write((json.dumps({"text": HE0, "id": 3}) + "\n" + json.dumps({"text": IDIOMS2, "id": 4}) + "\n").encode())
    out = tmp_path / "out"
    assert D.main(["--inputs", str(shard), "--out_dir", str(out), "--mbpp_split", "none"]) == 0
    rep = json.loads((out / "report.json").read_text())
    skipped = {"blank_line": 1, "non_utf8": 1, "too_large": 1}
    assert rep["skipped_lines"] == rep["shards"][str(shard)]["skipped_lines"] == skipped
    assert (rep["docs"], rep["removed"], rep["strict"]) == (3, 1, False)
    assert [json.loads(l)["id"] for l in (out / "clean" / "ex.jsonl").read_text().splitlines()] == [0, 4]
    assert "Unreadable input lines skipped: {'blank_line': 1, 'non_utf8': 1, 'too_large': 1}" in \
        (out / "report.md").read_text()
    capsys.readouterr()
    assert D.main(["--inputs", str(shard), "--out_dir", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "line 2: blank_line" in err and "3 bad lines" in err and not (tmp_path / "strict").exists()


def test_extra_bench_file_and_min_ast_nodes(tmp_path):
    # A structurally near-identical tiny function (copy, in-place update, return) is an AST
    # match by chance; --min_ast_nodes takes such functions out of AST matching.
    bench = tmp_path / "mine.jsonl"
    bench.write_text(json.dumps({"task_id": 263, "code": "def merge_dict(d1,d2):\n d = d1.copy()\n"
                                 " d.update(d2)\n return d\n"}) + "\n")
    items = D.load_bench_items(False, None, [bench])
    assert [(it.benchmark, it.task_id) for it in items] == [("mine", "263")]
    doc = "def diff(self, other):\n    new = self.copy()\n    new.difference_update(other)\n" \
          "    return new\n"
    [p] = D.Decontaminator(items).score(doc)
    assert p.ast_match == pytest.approx(1 - 1 / 16) and p.ngram_overlap == 0
    assert D.Decontaminator(items, min_ast_nodes=20).score(doc) == []
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": 1}) + "\n")
    with pytest.raises(D.DecontamError, match="bad.jsonl:1"):
        D.load_bench_items(False, None, [bad])
