"""data_gen.mine_exercises: documented functions of a corpus become exercises; doctests run in the
real sandbox; what is not standalone or does not pass is rejected by reason."""
import json

from data_gen import mine_exercises
from phijax.data import packing

GOOD = '''import math


def hypotenuse(a, b):
    """The hypotenuse of a right triangle.

    >>> hypotenuse(3, 4)
    5.0
    """
    squares = a * a + b * b
    return math.sqrt(squares)


def clamp(x, lo, hi):
    """x limited to [lo, hi]."""
    if x < lo:
        return lo
    return min(x, hi)
'''
BAD = '''SCALE = 3


def scaled(x):
    """x times the module's SCALE."""
    y = x * SCALE
    return y


def wrong(x):
    """Doubles x.

    >>> wrong(2)
    4
    """
    y = x * 3
    return y


def _private(x):
    """Hidden."""
    y = x
    return y


def undocumented(x):
    y = x
    return y


def stub(x):
    """Not yet."""
    pass


def limit(x, lo, hi):
    """The same as clamp, under another name."""
    if x < lo:
        return lo
    return min(x, hi)
'''


def _corpus(tmp_path):
    path = tmp_path / "shards" / "code-00000.jsonl"
    path.parent.mkdir()
    docs = [{"text": GOOD, "path": "pkg/geometry.py"}, {"text": BAD, "path": "pkg/bad.py"},
            {"text": "def broken(:\n", "path": "pkg/broken.py"}]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path.parent


def test_mining_keeps_standalone_documented_functions_and_names_every_reject(tmp_path):
    report = mine_exercises.run([str(_corpus(tmp_path))], tmp_path / "out",
                                mine_exercises.MineConfig(workers=2))
    assert report["n_documents"] == 3 and report["kept"] == 2 and report["kept_with_doctests"] == 1
    assert report["rejects"] == {"doctest_failed": 1, "duplicate": 1, "free_names": 1, "no_docstring": 1,
                                 "private": 1, "syntax_error": 1, "trivial_body": 1}
    assert "SCALE" in report["reject_samples"]["free_names"] and "pkg/bad.py" in report["reject_samples"]["duplicate"]
    rows = [json.loads(line) for f in sorted((tmp_path / "out" / "shards").iterdir()) for line in f.open()]
    by_name = {r["entry_point"]: r for r in rows}
    hyp = by_name["hypotenuse"]
    assert hyp["prompt"].startswith("import math\n") and hyp["prompt"].rstrip().endswith('"""')
    assert hyp["solution"].strip().endswith("return math.sqrt(squares)") and hyp["validated"] == "doctest"
    assert by_name["clamp"]["tests"] == "" and by_name["clamp"]["validated"] == "parse"
    assert all(r["source"] == "mined:pkg/geometry.py" for r in rows)
    assert all(set(packing.EXERCISE_FIELDS) <= set(r) for r in rows)  # what the CodeExercises packer reads
    again = mine_exercises.run([str(tmp_path / "shards")], tmp_path / "out",
                               mine_exercises.MineConfig(workers=2))
    assert again["resumed"] and again["kept"] == 2


def test_command_reports_and_rejects_bad_input(tmp_path, capsys):
    assert mine_exercises.main(["--inputs", str(_corpus(tmp_path)), "--out_dir", str(tmp_path / "o"),
                                "--no_doctests"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept"] == 3 and "doctest_failed" not in out["rejects"]  # parse-only: `wrong` is kept
    assert mine_exercises.main(["--inputs", str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "p")]) == 2
