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
    assert D.main(["--inputs", str(bad), "--text_field", "prompt+solution",
                   "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "missing_solution" in err and str(bad) in err
    assert D.main(["--inputs", str(bad), "--text_field", "prompt", "--tau", "0.9,x",
                   "--out_dir", str(tmp_path / "o")]) == 2
    assert "--tau" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


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
