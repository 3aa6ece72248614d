"""LLM grading (data_gen.llm_grade) and the Unseen set: every canonical solution passes in the real
sandbox and the empty completion fails; the grader against the real loopback OpenAI-compatible
server (data_gen.llm.fake_server): parsed scores, parse retries then a null score with the
reason, 5xx retried by the engine, the budget cap and a resumed rerun that resends nothing
answered, --dry_run sends nothing, no endpoint -> skipped (exit 0, nothing written), and the
API key in no written file."""
from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest

from data_gen import llm_grade
from data_gen.llm import engine as engine_lib
from data_gen.llm.fake_server import FakeOpenAIServer
from phijax.data import benchmarks
from phijax.data.benchmarks import load_unseen
from phijax.evaluate import execution, problems

KEY = "sk-test-GRADESECRET1234567890abcdef"


@pytest.fixture(autouse=True)
def _unlock_gin():
    """The CLI parses gin and locks it; later tests in this process register configurables."""
    yield
    gin.clear_config()


@pytest.fixture
def no_endpoint(monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)


def test_unseen_set_schema_canonical_pass_and_empty_fails():
    recs = load_unseen()
    shipped = [json.loads(x) for x in benchmarks.UNSEEN_BENCH_FILE.read_text().splitlines()]
    assert shipped == benchmarks.unseen_bench_records()  # regenerate the file when the set changes
    assert [r["task_id"] for r in recs] == [f"Unseen/{i}" for i in range(len(recs))] and 20 <= len(recs) <= 30
    assert all(set(r) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"} for r in recs)
    assert all("def check(candidate)" in r["test"] and f"def {r['entry_point']}(" in r["prompt"] for r in recs)
    probs = problems.load_problems("unseen")
    assert probs[0].benchmark == "unseen" and probs[0].stop == problems.HUMANEVAL_STOP
    good = execution.execute(probs, [{"task_id": p.task_id, "completion": p.canonical_solution} for p in probs])
    assert [r["task_id"] for r in good if not r["passed"]] == []
    empty = execution.execute(probs, [{"task_id": p.task_id, "completion": ""} for p in probs])
    assert not any(r["passed"] for r in empty)
    assert "no published pass@1" in problems.comparison_note("unseen", "unseen")
    assert set(problems.FORMAT_DESCRIPTION) >= {f for fs in problems.BENCHMARKS.values() for f in fs}


def _results(tmp_path: Path, n: int = 6) -> Path:
    """A results file as evaluate writes it: even problems solved, odd ones empty."""
    probs = problems.load_problems("unseen")[:n]
    samples = [{"task_id": p.task_id, "completion": p.canonical_solution if i % 2 == 0 else ""}
               for i, p in enumerate(probs)]
    rows = execution.execute(probs, samples)
    path = tmp_path / "unseen_unseen_samples.jsonl_results.jsonl"
    execution.write_jsonl(path, rows)
    return path


def _ecfg(server, **kw) -> engine_lib.EngineConfig:
    base = {"model": "fake-grader", "base_url": server.base_url, "api_key_env": "GRADE_TEST_KEY",
            "concurrency": 4, "progress": False, "max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05}
    return engine_lib.EngineConfig(**{**base, **kw})


def _grades(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / llm_grade.GRADES_FILE).read_text().splitlines()]


RETRY = llm_grade.GradeConfig().retry_note


def test_grader_against_loopback_server(tmp_path, monkeypatch, no_endpoint):
    monkeypatch.setenv("GRADE_TEST_KEY", KEY)
    res = _results(tmp_path)
    good = '{"score": 9, "reason": "correct and clear"}'
    faults = [
        {"kind": "500", "match": "def shelves_needed", "first": 2},          # 5xx: the engine retries
        {"kind": "reply", "text": "It looks fine to me.", "match": "def mirror_words", "unless": RETRY},  # once
        {"kind": "reply", "text": "no idea", "match": "def elevator_order"},  # always unparseable
        {"kind": "reply", "text": '{"score": 42}', "match": "def format_cents"},  # always out of range
        {"kind": "reply", "text": "```json\n{\"score\": \"2\", \"reason\": \"empty\"}\n```", "match": "def tally_total"},
        {"kind": "reply", "text": good},
    ]
    out = tmp_path / "grade"
    with FakeOpenAIServer(faults=faults) as server:
        rep = llm_grade.run(res, out, engine_config=_ecfg(server))
        stats = server.stats()
        again = llm_grade.run(res, out, engine_config=_ecfg(server))
        after = server.stats()
    g = {r["task_id"]: r for r in _grades(out)}
    assert g["Unseen/0"]["score"] == 2 and g["Unseen/0"]["passed"] is True and g["Unseen/0"]["reason"] == "empty"
    assert g["Unseen/1"]["score"] == 9 and g["Unseen/1"]["passed"] is False  # after two 500s
    assert g["Unseen/2"]["score"] == 9 and g["Unseen/2"]["attempts"] == 2    # one parse retry
    assert g["Unseen/3"]["score"] is None and g["Unseen/3"]["status"] == "unparseable"
    assert g["Unseen/3"]["attempts"] == 3 and "no idea" in g["Unseen/3"]["reason"]
    assert g["Unseen/4"]["score"] is None and g["Unseen/4"]["status"] == "out_of_range"
    assert all(r["grader"] == "llm:fake-grader" and r["sample"] == 0 for r in g.values())
    assert rep["graded"] == 4 and rep["complete"] and rep["ungraded_by_status"] == {"out_of_range": 1, "unparseable": 1}
    assert rep["mean_score"] == pytest.approx((2 + 9 + 9 + 9) / 4) and rep["execution_pass_rate"] == 0.5
    assert rep["agreement"]["n_passed"] == 2 and rep["agreement"]["agree_share"] == pytest.approx(0.25)  # 0 (2, passed), 1 and 5 (9, failed) disagree
    assert rep["engine"]["retries_by_reason"] and stats["faults"]
    assert (out / llm_grade.REPORT_FILE).read_text().startswith("# LLM grades: unseen")
    assert again["graded"] == 4 and again["engine"]["n_sent"] == 0 and after["total"] == stats["total"]
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_budget_cap_then_resume_sends_nothing_twice(tmp_path, monkeypatch, no_endpoint):
    monkeypatch.setenv("GRADE_TEST_KEY", KEY)
    res = _results(tmp_path)
    prices = {"fake-grader": {"input": 1.0, "output": 1.0}}  # USD per 1M tokens: ~0.001 per request
    out = tmp_path / "grade"
    with FakeOpenAIServer(faults=[{"kind": "reply", "text": '{"score": 7, "reason": "ok"}'}]) as server:
        small = llm_grade.run(res, out, engine_config=_ecfg(server, prices=prices, budget_usd=0.0025, concurrency=1))
        first = server.stats()
        full = llm_grade.run(res, out, engine_config=_ecfg(server, prices=prices, budget_usd=1.0))
        second = server.stats()
    assert not small["complete"] and 0 < small["graded"] < 6 and small["engine"]["stopped"] == "budget"
    pend = [r for r in json.loads(json.dumps(_grades(out))) if r["status"] == "pending"]
    assert full["complete"] and full["graded"] == 6 and full["engine"]["n_sent"] == 6 - small["graded"]
    assert not pend and second["total"] == first["total"] + 6 - small["graded"]
    assert set(second["by_body"].values()) == {1}  # no request body was sent twice


def test_cli_dry_run_and_skip(tmp_path, monkeypatch, capsys, no_endpoint):
    res = _results(tmp_path, n=3)
    out = tmp_path / "g"
    with FakeOpenAIServer() as server:
        rc = llm_grade.main(["--results", str(res), "--out_dir", str(out), "--dry_run",
                             "--gin_param", f"data_gen.EngineConfig.base_url = '{server.base_url}'"])
        assert server.stats()["total"] == 0
    text = capsys.readouterr().out
    assert rc == 0 and "requests: 3 (0 already done, 3 to send)" in text and "cost at most" in text
    assert not (out / llm_grade.GRADES_FILE).exists()
    rc = llm_grade.main(["--results", str(tmp_path), "--out_dir", str(out)])  # no endpoint: skipped
    assert rc == 0 and "SKIPPED" in capsys.readouterr().out and not (out / llm_grade.GRADES_FILE).exists()
    rc = llm_grade.main(["--results", str(tmp_path / "missing"), "--out_dir", str(out)])
    assert rc == 2 and "no such file" in capsys.readouterr().err
