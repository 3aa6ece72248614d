"""Quality-filter stage 3, data_gen.annotate: the answer parser, the deterministic sample, the
heuristic fallback (named as such), parse retries and rejects against the real loopback server,
bad input (exit 2, nothing sent), and the CLI killed with SIGKILL mid-run and resumed (the same
output as an uninterrupted run; nothing answered is requested again)."""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gin
from data_gen import annotate, classifier, heuristic_annotator
from data_gen.llm import engine as engine_lib
from data_gen.llm import ledger as ledger_lib
from data_gen.llm.fake_server import FakeOpenAIServer

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-test-ANNOTATESECRET1234567890"
RETRY_NOTE = annotate.AnnotateConfig().retry_note


def _docs(n: int, long_every: int = 0) -> list[dict]:
    """n distinct little Python files (every ``long_every``-th a long one) with intrinsic ids."""
    out = []
    for i in range(n):
        body = f"def step_{i}(values):\n    \"\"\"Scale each value by {i}.\"\"\"\n    return [v * {i} for v in values]\n"
        if long_every and i % long_every == 0:
            body += "".join(f"\n\ndef helper_{i}_{j}(x):\n    return x + {j}\n" for j in range(40))
        out.append({"text": body, "id": f"doc{i}", "source": "fixture"})
    return out


def _write(path: Path, recs: list[dict]) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in recs).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _shards(out: Path) -> list[dict]:
    return [json.loads(x) for f in sorted((out / "shards").glob("annotate-*.jsonl")) for x in f.read_text().splitlines()]


def _ecfg(server, **kw) -> engine_lib.EngineConfig:
    base = {"model": "fake-annotator", "base_url": server.base_url, "api_key_env": "ANNOTATE_TEST_KEY",
            "concurrency": 4, "progress": False, "max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05}
    return engine_lib.EngineConfig(**{**base, **kw})


@pytest.fixture
def no_endpoint(monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("answer,want", [
    ('{"educational_value": 7, "reason": "clear"}', (7, "clear")),
    ('```json\n{"educational_value": 3, "reason": "plumbing"}\n```', (3, "plumbing")),
    ('Here you go: {"educational_value": 10} -- hope it helps {', (10, "")),
    ('{"educational_value": "4", "reason": 5}', (4, "")),
    ('{"educational_value": 6.0}', (6, "")),
    ("I would rate it 7 out of 10.", "unparseable"),
    ('{"score": 7}', "missing_score"),
    ('{"educational_value": 7.5}', "not_integer"),
    ('{"educational_value": true}', "not_integer"),
    ('{"educational_value": 11}', "out_of_range"),
    ('{"educational_value": -1}', "out_of_range"),
    ('{"educational_value": 7', "unparseable"),
])
def test_parse_answer(answer, want):
    if isinstance(want, tuple):
        assert annotate.parse_answer(answer) == want
    else:
        with pytest.raises(annotate.AnswerError) as e:
            annotate.parse_answer(answer)
        assert e.value.reason == want


def test_prompt_truncation_retry_note_and_request_keys():
    cfg = annotate.AnnotateConfig(max_doc_chars=300)
    p = annotate.Prompter(cfg, "m")
    long_text = _docs(1, long_every=1)[0]["text"]
    r0, r1 = p.request(long_text, 0), p.request(long_text, 1)
    user0 = r0.messages[-1]["content"]
    assert "for a student whose goal is to learn basic coding concepts" in user0
    assert "only its first" in user0 and "helper_0_39" not in user0 and r0.meta["truncated"] is True
    assert RETRY_NOTE not in user0 and r1.messages[-1]["content"].endswith(RETRY_NOTE)
    assert r0.key != r1.key and r0.params["seed"] != r1.params["seed"]
    assert r0.params["response_format"] == {"type": "json_object"} and r0.messages[0]["role"] == "system"
    assert p.request(long_text, 0).key == r0.key  # stable: a rerun finds it in the ledger
    short = p.request("x = 1\n", 0)
    assert short.meta["truncated"] is False and "only its first" not in short.messages[-1]["content"]


def test_sample_is_deterministic_layout_independent_and_heuristic_is_named(tmp_path, no_endpoint):
    docs = _docs(40)
    one = _write(tmp_path / "a" / "all.jsonl", docs)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    for i in range(3):  # other order, other shard boundaries, one shard gzipped
        _write(tmp_path / "b" / f"part-{i}.jsonl{'.gz' if i == 1 else ''}", shuffled[i::3])
    ecfg = engine_lib.EngineConfig()  # no endpoint, no key: auto -> heuristic
    rep = annotate.run([str(one)], tmp_path / "o1", n_samples=15, engine_config=ecfg)
    annotate.run([str(tmp_path / "b")], tmp_path / "o2", n_samples=15, engine_config=ecfg)
    assert (tmp_path / "o1/shards/annotate-00000.jsonl").read_bytes() == \
        (tmp_path / "o2/shards/annotate-00000.jsonl").read_bytes()
    recs = _shards(tmp_path / "o1")
    assert rep["annotator"] == "heuristic" and rep["heuristic"] is True and "no LLM endpoint" in rep["annotator_choice"]
    assert rep["sampled"] == rep["annotated"] == len(recs) == 15 and rep["n_input"] == 40
    assert sum(rep["histogram"].values()) == 15 and rep["engine"] is None
    by_id = {d["id"]: d for d in docs}
    for r in recs:  # the input record, plus the heuristic's score, named as such
        assert {k: r[k] for k in by_id[r["id"]]} == by_id[r["id"]]
        assert r["annotator"] == "heuristic"
        assert r["educational_value"] == heuristic_annotator.heuristic_score(r["text"])
        assert r["educational_value_raw"] == pytest.approx(10 * r["educational_value"], abs=1e-4)
    ids = [r["id"] for r in recs]
    small = annotate.run([str(one)], tmp_path / "o3", n_samples=6, engine_config=ecfg)
    assert [r["id"] for r in _shards(tmp_path / "o3")] == ids[:6] and small["sampled"] == 6  # extends
    annotate.run([str(one)], tmp_path / "o4", n_samples=15, seed=1, engine_config=ecfg)
    assert {r["id"] for r in _shards(tmp_path / "o4")} != set(ids)
    big = annotate.run([str(one)], tmp_path / "o5", n_samples=10**6, engine_config=ecfg)
    assert big["sampled"] == 40 and sorted(r["id"] for r in _shards(tmp_path / "o5")) == sorted(by_id)
    again = annotate.run([str(one)], tmp_path / "o1", n_samples=15, engine_config=ecfg)
    assert again["resumed"] is True and (tmp_path / "o1" / "_COMPLETE").is_file()


def test_resolve_annotator(monkeypatch, no_endpoint):
    assert annotate.resolve_annotator("auto", engine_lib.EngineConfig())[0] == "heuristic"
    assert annotate.resolve_annotator("auto", engine_lib.EngineConfig(base_url="http://h/v1"))[0] == "llm"
    assert annotate.resolve_annotator("heuristic", engine_lib.EngineConfig(base_url="http://h/v1"))[0] == "heuristic"
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert annotate.resolve_annotator("auto", engine_lib.EngineConfig())[0] == "llm"
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    assert annotate.resolve_annotator("auto", engine_lib.EngineConfig())[0] == "llm"
    with pytest.raises(annotate.AnnotateError, match="annotator must be one of"):
        annotate.resolve_annotator("gpt5", engine_lib.EngineConfig())


def test_llm_parse_retries_rejects_resume_and_no_key_in_outputs(tmp_path, monkeypatch, no_endpoint):
    monkeypatch.setenv("ANNOTATE_TEST_KEY", KEY)
    docs = _docs(12)
    markers = {"A": 1, "B": 2, "C": 3, "D": 4, "E": 5}  # marker -> doc index
    for m, i in markers.items():
        docs[i]["text"] += f"# MARKER_{m}\n"
    inp = _write(tmp_path / "in.jsonl", docs)
    faults = [
        {"kind": "reply", "text": "It is quite good.", "match": "MARKER_A", "unless": RETRY_NOTE},  # once
        {"kind": "reply", "text": "no idea", "match": "MARKER_B"},  # always unparseable
        {"kind": "reply", "text": '{"educational_value": 42}', "match": "MARKER_C"},  # always out of range
        {"kind": "reply", "text": 'Sure:\n```json\n{"educational_value": "7", "reason": "ok"}\n```', "match": "MARKER_D"},
        {"kind": "400", "match": "MARKER_E"},  # a 4xx: not resent; the server echoes the key
    ]
    out = tmp_path / "out"
    with FakeOpenAIServer(responder="annotate", annotate_mix={}, faults=faults) as server:
        ecfg = _ecfg(server)
        rep = annotate.run([str(inp)], out, n_samples=100, annotator="llm", engine_config=ecfg)
        stats = server.stats()
        again = annotate.run([str(inp)], out, n_samples=100, annotator="llm", engine_config=ecfg)
        forced = annotate.run([str(inp)], out, n_samples=100, seed=5, annotator="llm", engine_config=ecfg, force=True)
        after = server.stats()
    recs = {r["id"]: r for r in _shards(out)}
    rejects = {r["id"]: r for r in map(json.loads, (out / annotate.REJECTS_FILE).read_text().splitlines())}
    assert rep["annotator"] == "llm:fake-annotator" and rep["heuristic"] is False and rep["complete"]
    assert rep["sampled"] == 12 and rep["annotated"] == len(recs) == 9 and rep["rejected"] == 3
    assert rep["rejects_by_reason"] == {"out_of_range": 1, "request_failed": 1, "unparseable": 1}
    assert rep["parse_retries"] == 1 + 2 + 2 and rep["docs_retried"] == 3
    assert rejects["doc2"]["reason"] == "unparseable" and rejects["doc2"]["answer"] == "no idea"
    assert rejects["doc2"]["attempts"] == 3 and rejects["doc3"]["reason"] == "out_of_range"
    assert rejects["doc5"]["reason"] == "request_failed" and "HTTP 400" in rejects["doc5"]["detail"]
    assert not {"doc2", "doc3", "doc5"} & set(recs)  # a rejected answer never becomes a score
    assert recs["doc1"]["annotation_attempts"] == 2 and recs["doc4"]["educational_value_raw"] == 7
    for r in recs.values():
        assert r["annotator"] == "llm:fake-annotator" and r["educational_value"] == r["educational_value_raw"] / 10
        assert r["annotation_truncated"] is False
    assert sum(rep["histogram"].values()) == 9
    assert rep["engine"]["n_sent"] == 12 + 5 and rep["engine"]["by_status"] == {"ok": 16}
    # Every request body reached the server once (each retry is a distinct request).
    assert len(stats["by_body"]) == 17 and set(stats["by_body"].values()) == {1}
    # Complete: skipped. Forced (other seed, same documents): all answers come from the ledger.
    assert again["resumed"] is True and forced["resumed"] is False and forced["engine"]["n_sent"] == 0
    assert after["total"] == stats["total"]
    assert {r["id"]: r for r in _shards(out)} == recs
    # The classifier reads these labels as they are.
    labels, name = classifier.labels_from_records(list(recs.values()), "text", "educational_value")
    assert name == "llm:fake-annotator" and labels == [r["educational_value"] for r in recs.values()]
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_budget_stop_leaves_pending_then_a_rerun_finishes(tmp_path, monkeypatch, no_endpoint):
    monkeypatch.setenv("ANNOTATE_TEST_KEY", KEY)
    inp = _write(tmp_path / "in.jsonl", _docs(10))
    prices = {"fake-annotator": {"input": 1000.0, "output": 1000.0}}  # ~$0.3 per request, worst case
    out = tmp_path / "out"
    with FakeOpenAIServer(responder="annotate", annotate_mix={}) as server:
        first = annotate.run([str(inp)], out, n_samples=10, annotator="llm",
                             engine_config=_ecfg(server, prices=prices, budget_usd=1.5, concurrency=1))
        sent_first = server.stats()["total"]
        marker_after_first = (out / "_COMPLETE").exists()
        second = annotate.run([str(inp)], out, n_samples=10, annotator="llm",
                              engine_config=_ecfg(server, prices=prices, budget_usd=100.0))
        total = server.stats()["total"]
    assert first["complete"] is False and first["engine"]["stopped"] == "budget" and not marker_after_first
    assert 0 < first["annotated"] < 10 and first["pending"] == 10 - first["annotated"] and first["rejected"] == 0
    assert first["pending_reasons"] == {"not sent yet (budget cap, or the run was stopped)": first["pending"]}
    assert second["complete"] is True and second["annotated"] == 10 and (out / "_COMPLETE").is_file()
    assert second["engine"]["n_already_done"] == sent_first and total == 10  # the rest only, once each


@pytest.fixture
def clean_gin():
    yield
    gin.clear_config()


@pytest.mark.parametrize("args,message", [
    (["--inputs", "{tmp}/nope/*.jsonl"], "matches no JSONL files"),
    (["--n_samples", "0"], "n_samples must be >= 1"),
    (["--annotator", "gpt5"], "annotator must be one of"),
    (["--gin_param", "data_gen.AnnotateConfig.nope = 1"], "nope"),
    (["--max_parse_retries", "-1"], "max_parse_retries"),
    (["--out_dir", "{tmp}/in.jsonl/out"], "in.jsonl is a file"),
])
def test_bad_input_exits_2_before_any_request(tmp_path, monkeypatch, capsys, clean_gin, args, message):
    inp = _write(tmp_path / "in.jsonl", _docs(3))
    with FakeOpenAIServer(responder="annotate") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        argv = ["--inputs", str(inp), "--out_dir", str(tmp_path / "out"), "--n_samples", "3", "--annotator", "llm"]
        rc = annotate.main(argv + [a.format(tmp=tmp_path) for a in args])
        assert server.stats()["total"] == 0
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "annotate: error:" in err
    assert not (tmp_path / "out" / "shards").exists()


def _cli(inp: Path, out: Path, server, n: int) -> tuple[list[str], dict]:
    args = [sys.executable, "-m", "data_gen.annotate", f"--inputs={inp}", f"--out_dir={out}", f"--n_samples={n}",
            "--annotator=llm", "--gin_param=data_gen.EngineConfig.model = 'fake-annotator'",
            "--gin_param=data_gen.EngineConfig.prices = {'fake-annotator': {'input': 0.5, 'output': 1.5}}",
            "--gin_param=data_gen.EngineConfig.concurrency = 4",
            "--gin_param=data_gen.EngineConfig.rpm = None", "--gin_param=data_gen.EngineConfig.tpm = None"]
    env = dict(os.environ, OPENAI_API_KEY=KEY, OPENAI_BASE_URL=server.base_url, PYTHONUNBUFFERED="1")
    return args, env


@pytest.mark.slow
def test_cli_killed_mid_run_resumes_to_the_uninterrupted_output(tmp_path):
    n = 30
    docs = _docs(n + 5)
    docs[3]["text"] += "# MARKER_A\n"
    inp = _write(tmp_path / "in.jsonl", docs)
    faults = [{"kind": "reply", "text": "hmm", "match": "MARKER_A", "unless": RETRY_NOTE}]
    ref, out = tmp_path / "ref", tmp_path / "out"
    with FakeOpenAIServer(latency=(0.05, 0.15), faults=faults) as server:  # model name -> annotate responder
        args, env = _cli(inp, ref, server, n)
        r = subprocess.run(args, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    responses = out / ledger_lib.RESPONSES_FILE
    with FakeOpenAIServer(latency=(0.05, 0.15), faults=faults) as server:  # same answers, fresh counts
        args, env = _cli(inp, out, server, n)
        with open(tmp_path / "log1", "wb") as log1:
            p = subprocess.Popen(args, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and p.poll() is None:
                if responses.exists() and responses.read_bytes().count(b"\n") >= 10:
                    break
                time.sleep(0.02)
            assert p.poll() is None, (tmp_path / "log1").read_text()
            p.send_signal(signal.SIGKILL)
            p.wait()
        recorded = {r["response_id"].split("-")[1] for r in ledger_lib.iter_results(responses)}
        assert 10 <= len(recorded) < n
        before = server.stats()["by_body"]
        r2 = subprocess.run(args, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert r2.returncode == 0, r2.stderr[-3000:]
        after = server.stats()["by_body"]
    # (b) Nothing answered before the kill was requested again; only requests in flight at the
    # kill (at most `concurrency`) reached the server twice.
    assert all(after[h] == before[h] for h in recorded)
    twice = {h for h, c in after.items() if c > 1}
    assert all(c <= 2 for c in after.values()) and len(twice) <= 4 and not twice & recorded
    results = list(ledger_lib.iter_results(responses))
    assert len({r["key"] for r in results}) == len(results) == len(after)  # one line per request
    led = ledger_lib.Ledger(out / ledger_lib.LEDGER_FILE)
    assert led.state_counts() == {"done": len(results)}
    led.close()
    # (a) The same output as the uninterrupted run.
    rep, ref_rep = (json.loads((d / annotate.REPORT_FILE).read_text()) for d in (out, ref))
    assert (out / "shards" / "annotate-00000.jsonl").read_bytes() == (ref / "shards" / "annotate-00000.jsonl").read_bytes()
    assert (out / annotate.REJECTS_FILE).read_bytes() == (ref / annotate.REJECTS_FILE).read_bytes()
    drop = ("timing", "engine")
    assert {k: v for k, v in rep.items() if k not in drop} == {k: v for k, v in ref_rep.items() if k not in drop}
    assert rep["sampled"] == n and rep["annotated"] + rep["rejected"] == n and rep["parse_retries"] >= 1
    assert rep["engine"]["n_already_done"] >= len(recorded)
    assert (out / "_COMPLETE").is_file()
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in (tmp_path / "log1").read_text() + r2.stdout + r2.stderr
