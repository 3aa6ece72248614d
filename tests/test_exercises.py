"""data_gen.exercises: parsing into prompt / solution / tests, sandbox validation, duplicate
removal, and the CLI end to end against the loopback server, with shards that the packer's
exercises reader accepts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_gen import generator, exercises
from data_gen.llm.fake_server import FakeOpenAIServer
from phijax.data import packing
from phijax.evaluate import sandbox

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-test-EXERCISESECRET13579"

ANSWER = '''Here you go.

```python
import math


def area_circle(r: float) -> float:
    """Area of a circle of radius r.

    >>> round(area_circle(1), 2)
    3.14
    """
    if r < 0:
        raise ValueError("negative radius")
    return math.pi * r * r


assert round(area_circle(1), 2) == 3.14
assert area_circle(0) == 0
```
'''


def test_parse_splits_prompt_solution_tests():
    ex = exercises.parse_exercise(ANSWER, "area_circle")
    assert isinstance(ex, exercises.Exercise)
    assert ex.prompt.startswith("import math\n") and ex.prompt.rstrip().endswith('"""')
    assert "def area_circle(r: float) -> float:" in ex.prompt and "return" not in ex.prompt
    assert ex.solution == '    if r < 0:\n        raise ValueError("negative radius")\n    return math.pi * r * r\n'
    assert ex.tests.splitlines() == ["assert round(area_circle(1), 2) == 3.14", "assert area_circle(0) == 0"]
    assert sandbox.run_program(ex.program, timeout_s=10).passed


@pytest.mark.parametrize("edit,reason", [
    (lambda t: t.replace("```python", "```"), "no_code"),
    (lambda t: t.replace("-> float:", "-> float", 1), "syntax_error"),
    (lambda t: t.replace("area_circle", "circle_area"), "missing_function"),
    (lambda t: t.replace('    """Area of a circle of radius r.\n\n    >>> round(area_circle(1), 2)\n    3.14\n    """\n', ""),
     "no_docstring"),
    (lambda t: t[:t.index("    if r < 0")] + "    pass\n\n\nassert area_circle(0) is None\n```\n", "empty_solution"),
    (lambda t: t[:t.index("\n\nassert")] + "\n```\n", "no_asserts"),
])
def test_parse_rejects_with_reason(edit, reason):
    got = exercises.parse_exercise(edit(ANSWER), "area_circle")
    assert isinstance(got, tuple) and got[0] == reason, got


def test_normalized_makes_renamed_copies_equal():
    a = exercises.parse_exercise(ANSWER, "area_circle")
    b = exercises.parse_exercise(ANSWER.replace("area_circle", "disc_area").replace("Area of", "The area of"),
                                 "disc_area")
    assert exercises.normalized(a, "area_circle") == exercises.normalized(b, "disc_area")
    c = exercises.parse_exercise(ANSWER.replace("r * r", "r ** 2"), "area_circle")
    assert exercises.normalized(a, "area_circle") != exercises.normalized(c, "area_circle")


def test_names_are_constrained_and_reproducible():
    cfg = exercises.ExercisesConfig(n_samples=30, seed=1)
    reqs = exercises.build_requests(cfg, "m")
    assert [r.key for r in reqs] == [r.key for r in exercises.build_requests(cfg, "m")]
    names = [r.meta["function_name"] for r in reqs]
    assert len(set(names)) >= 25 and all(n.isidentifier() for n in names)
    assert all(f"`{r.meta['function_name']}`" in r.messages[-1]["content"] for r in reqs)


@pytest.mark.slow
def test_cli_generates_validated_shards_the_packer_reads(tmp_path):
    n = 30
    out = tmp_path / "ex"
    with FakeOpenAIServer(latency=(0.01, 0.03)) as server:
        args = [sys.executable, "-m", "data_gen.exercises", "--gin_file=gin/data/exercises.gin", f"--out_dir={out}",
                f"--n_samples={n}", "--gin_param=data_gen.EngineConfig.model = 'fake-exercises'",
                "--gin_param=data_gen.EngineConfig.progress = False",
                "--gin_param=data_gen.ExercisesConfig.sandbox_timeout_s = 5.0"]
        env = dict(os.environ, OPENAI_API_KEY=KEY, OPENAI_BASE_URL=server.base_url)
        r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        assert server.stats()["total"] == n

    stats = json.loads((out / generator.STATS_FILE).read_text())
    rejects = [json.loads(x) for x in (out / generator.REJECTS_FILE).read_text().splitlines()]
    reasons = {x["reason"] for x in rejects}
    assert {"tests_failed", "duplicate"} <= reasons and reasons & {"syntax_error", "missing_function", "no_asserts"}
    # Shards load through phijax's exercises reader with nothing skipped.
    shards = sorted((out / "shards").glob("exercises-*.jsonl"))
    recs = [rec for p in shards for rec in packing.read_exercises(p)[0]]
    assert len(recs) == stats["n_accepted"] and len(recs) + len(rejects) == n and len(recs) >= n // 2
    # Every kept exercise passes its own asserts; no two are the same once renamed.
    runs = sandbox.run_many([f"{x['prompt']}{x['solution']}\n\n{x['tests']}\n" for x in recs], workers=2, timeout_s=5)
    assert all(run.passed for run in runs)
    norms = {exercises.normalized(exercises.Exercise(x["prompt"], x["solution"], x["tests"]), x["entry_point"])
             for x in recs}
    assert len(norms) == len(recs)
    assert all(x["prompt"].lstrip().startswith(f"def {x['entry_point']}(") for x in recs)
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes()
