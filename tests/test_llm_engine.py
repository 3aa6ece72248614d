"""data_gen.llm: the engine against a real loopback HTTP server through the real openai client.

Faults (429 + Retry-After, 5xx, timeouts, dropped connections, malformed JSON, cut-off
responses, 4xx), resume without re-sending completed work, the budget cap, the dry run, the
Batch API path (incl. a run interrupted after submitting), rate-limiter accuracy, and that the
API key never reaches logs or files.
"""
import asyncio
import json
import logging
import time

import pytest

from data_gen.llm import ledger as ledger_lib
from data_gen.llm.engine import Engine, EngineConfig, Redactor
from data_gen.llm.fake_server import FakeOpenAIServer, body_hash
from data_gen.llm.ratelimit import RateLimiter
from data_gen.llm.request import Request, TokenCounter, messages_from

KEY = "sk-test-SECRET0123456789abcdefXYZ"
PRICES = {"m": {"input": 2.0, "output": 4.0}}


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAIServer(latency=(0.005, 0.02), completion_tokens=(30, 60)) as s:
        yield s


def make_requests(n, max_tokens=100, model="m"):
    return [Request(model=model, sample_index=i, messages=messages_from("be brief", f"sample s{i}."),
                    params={"max_tokens": max_tokens, "temperature": 1.0}) for i in range(n)]


def config(server, **kw):
    base = dict(model="m", base_url=server.base_url, concurrency=8, backoff_base_s=0.02, backoff_max_s=0.2,
                timeout_s=1.0, max_attempts=5, progress=False, prices=PRICES)
    base.update(kw)
    return EngineConfig(**base)


def results(out):
    return {r["sample_index"]: r for r in ledger_lib.iter_results(out / ledger_lib.RESPONSES_FILE)}


def assert_no_key_in(out, text=""):
    for p in out.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    assert KEY not in text


def test_request_key_identity():
    a, b = make_requests(2)
    same = Request(model="m", sample_index=0, messages=a.messages, params=dict(a.params), meta={"x": 1})
    assert a.key == same.key  # meta is not part of the key
    assert a.key != b.key
    other = Request(model="m", sample_index=0, messages=a.messages, params={**a.params, "temperature": 0.5})
    assert other.key != a.key
    with pytest.raises(ValueError, match="max_tokens"):
        Request(model="m", sample_index=0, messages=a.messages, params={})
    with pytest.raises(ValueError, match="kind"):
        Request(model="m", sample_index=0, kind="edit", prompt="x", params={"max_tokens": 1})


def test_every_fault_kind_then_resume_sends_nothing(server, tmp_path, caplog):
    server.configure(faults=[
        {"kind": "429", "match": "s1.", "first": 1, "retry_after": 0.3},
        {"kind": "500", "match": "s2.", "first": 2},
        {"kind": "503", "match": "s3.", "first": 1},
        {"kind": "timeout", "match": "s4.", "first": 1, "delay": 1.5},
        {"kind": "drop", "match": "s5.", "first": 1},
        {"kind": "malformed", "match": "s6."},
        {"kind": "length", "match": "s7."},
        {"kind": "slow", "match": "s8.", "delay": 0.3},
        {"kind": "400", "match": "s9."},  # echoes the Authorization header back
    ])
    reqs = make_requests(11)
    caplog.set_level(logging.DEBUG)
    report = Engine(tmp_path, config(server, timeout_s=0.8)).run_sync(reqs)
    res = results(tmp_path)
    st = server.stats()
    by_body = {r.sample_index: st["by_body"].get(body_hash(r.body()), 0) for r in reqs}
    # Retryable faults: one extra request each (two for the double 500), then success.
    assert by_body == {0: 1, 1: 2, 2: 3, 3: 2, 4: 2, 5: 2, 6: 1, 7: 1, 8: 1, 9: 1, 10: 1}
    for i in (0, 1, 2, 3, 4, 5, 8, 10):
        assert res[i]["status"] == "ok" and res[i]["finish_reason"] == "stop" and res[i]["text"]
        assert res[i]["response_id"].split("-")[1] == body_hash(reqs[i].body())
    assert res[1]["attempts"] == 2 and res[2]["attempts"] == 3
    # Retry-After honoured: the retry of s1 came at least 0.3 s after the 429.
    t = st["times_by_body"][body_hash(reqs[1].body())]
    assert t[1] - t[0] >= 0.3
    # Malformed and cut-off responses are recorded as such, not used as text.
    assert res[6]["status"] == "malformed" and res[6]["text"] is None and "JSONDecodeError" in res[6]["error"]
    assert res[7]["status"] == "length" and res[7]["finish_reason"] == "length"
    # A 400 is not retried, and is not a result.
    assert 9 not in res
    led = ledger_lib.Ledger(tmp_path / ledger_lib.LEDGER_FILE)
    row = led.get(reqs[9].key)
    assert row["state"] == "failed" and row["retryable"] == 0 and row["status_code"] == 400
    assert "[REDACTED]" in row["error"]
    assert led.state_counts() == {"done": 10, "failed": 1}
    led.close()
    assert report.by_status == {"ok": 8, "malformed": 1, "length": 1} and report.n_failed == 1
    assert report.retries_by_reason == {"429": 1, "5xx": 3, "timeout": 1, "connection": 1}
    assert_no_key_in(tmp_path, caplog.text)

    # A second run: everything is done or failed for good; nothing is sent.
    before = server.stats()["total"]
    report2 = Engine(tmp_path, config(server)).run_sync(reqs)
    assert server.stats()["total"] == before
    assert report2.n_already_done == 10 and report2.n_skipped_failed == 1 and report2.n_sent == 0


def test_retries_exhausted_are_retried_by_the_next_run(server, tmp_path):
    server.configure(faults=[{"kind": "500", "match": "s0."}])
    reqs = make_requests(3)
    r1 = Engine(tmp_path, config(server, max_attempts=3)).run_sync(reqs)
    assert r1.n_failed == 1 and not r1.complete
    assert server.stats()["by_body"][body_hash(reqs[0].body())] == 3
    server.configure(faults=[])
    r2 = Engine(tmp_path, config(server)).run_sync(reqs)
    assert r2.n_already_done == 2 and r2.by_status == {"ok": 1} and r2.complete
    assert sorted(results(tmp_path)) == [0, 1, 2]


def test_torn_last_line_is_repaired_and_completed(server, tmp_path):
    reqs = make_requests(4)
    Engine(tmp_path, config(server)).run_sync(reqs[:3])
    path = tmp_path / ledger_lib.RESPONSES_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + lines[2][:25])  # the third line torn mid-write
    rep = Engine(tmp_path, config(server)).run_sync(reqs)
    assert rep.repaired["torn_bytes_cut"] == 25 and rep.n_already_done == 2
    recs = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert sorted(r["sample_index"] for r in recs) == [0, 1, 2, 3]  # each exactly once


def test_budget_cap_stops_before_exceeding(server, tmp_path):
    reqs = make_requests(20, max_tokens=200)
    eng = Engine(tmp_path, config(server, budget_usd=1.0))
    worst = eng.worst_case(reqs[0])[1]
    cap = 2.5 * worst  # room for 2 worst cases; actual usage is far below them
    rep = Engine(tmp_path, config(server, budget_usd=cap)).run_sync(reqs)
    assert rep.stopped == "budget" and not rep.complete
    spent = rep.total_spent_usd
    assert 0 < spent <= cap
    # Settled requests free their reservations: more than 2 fit, never more than the cap.
    n1 = len(results(tmp_path))
    assert 2 < n1 < 20 and rep.n_not_sent == 20 - n1
    assert spent + worst > cap  # it stopped only when the next worst case no longer fitted
    # Same cap again: nothing fits any more; nothing is sent.
    before = server.stats()["total"]
    rep2 = Engine(tmp_path, config(server, budget_usd=cap)).run_sync(reqs)
    assert server.stats()["total"] - before == rep2.n_http_attempts
    assert rep2.total_spent_usd <= cap
    # A larger cap finishes the job; the budget spans runs.
    rep3 = Engine(tmp_path, config(server, budget_usd=100 * cap)).run_sync(reqs)
    assert rep3.complete and len(results(tmp_path)) == 20
    recs = list(ledger_lib.iter_results(tmp_path / ledger_lib.RESPONSES_FILE))
    assert rep3.total_spent_usd == pytest.approx(sum(r["cost_usd"] for r in recs))
    u = recs[0]["usage"]
    assert recs[0]["cost_usd"] == pytest.approx((u["prompt_tokens"] * 2.0 + u["completion_tokens"] * 4.0) / 1e6)


def test_budget_without_price_is_an_error_before_sending(server, tmp_path):
    eng = Engine(tmp_path, config(server, budget_usd=1.0, prices={}))
    with pytest.raises(ValueError, match="no price for"):
        eng.run_sync(make_requests(2))
    assert server.stats()["total"] == 0


def test_dry_run_contacts_nothing(server, tmp_path):
    reqs = make_requests(10, max_tokens=300)
    out = tmp_path / "run"
    est = Engine(out, config(server, base_url="http://127.0.0.1:9/v1")).estimate(reqs)
    counter = TokenCounter()
    prompt = sum(counter.prompt(r) for r in reqs)
    assert (est.n_to_send, est.prompt_tokens, est.max_completion_tokens) == (10, prompt, 3000)
    assert est.worst_case_usd == pytest.approx((prompt * 1.25 * 2.0 + 3000 * 4.0) / 1e6)
    assert est.batch_worst_case_usd == pytest.approx(est.worst_case_usd / 2)
    assert server.stats()["total"] == 0 and not out.exists()
    Engine(out, config(server)).run_sync(reqs[:4])
    est2 = Engine(out, config(server)).estimate(reqs)
    assert (est2.n_already_done, est2.n_to_send) == (4, 6) and est2.spent_usd > 0


def test_batch_path_reconciles_and_resubmits(server, tmp_path, caplog):
    server.configure(faults=[{"kind": "500", "match": "s3.", "first": 1},
                             {"kind": "expire", "match": "s5.", "first": 1},
                             {"kind": "400", "match": "s7."}])
    reqs = make_requests(12)
    caplog.set_level(logging.INFO)
    rep = Engine(tmp_path, config(server, use_batch=True, batch_poll_s=0.05, batch_max_requests=5)).run_sync(reqs)
    res = results(tmp_path)
    assert sorted(res) == [i for i in range(12) if i != 7]
    assert all(r["via"] == "batch" and r["status"] == "ok" for r in res.values())
    st = server.stats()
    counts = {r.sample_index: st["by_body"][body_hash(r.body())] for r in reqs}
    assert counts == {i: 2 if i in (3, 5) else 1 for i in range(12)}  # only the failures twice
    assert st["requests"]["/v1/batches"] == 4  # 3 in round 0, 1 resubmission
    r0 = res[0]
    u = r0["usage"]
    assert r0["cost_usd"] == pytest.approx((u["prompt_tokens"] * 2.0 + u["completion_tokens"] * 4.0) / 1e6 * 0.5)
    assert rep.n_failed == 1 and rep.by_status == {"ok": 11}
    assert_no_key_in(tmp_path, caplog.text)


def test_batch_budget_reserves_whole_batches(server, tmp_path):
    reqs = make_requests(12)
    worst = Engine(tmp_path, config(server)).worst_case(reqs[0], batch=True)[1]
    cfg = config(server, use_batch=True, batch_poll_s=0.05, budget_usd=5.5 * worst)
    rep = Engine(tmp_path, cfg).run_sync(reqs)
    assert rep.stopped == "budget" and len(results(tmp_path)) == 5  # 5 worst cases fitted in the batch
    assert 0 < rep.total_spent_usd <= 5.5 * worst
    assert server.stats()["requests"]["/v1/batches"] == 1


def test_batch_run_interrupted_after_submitting_is_adopted(server, tmp_path):
    server.configure(batch_delay_s=0.6)
    reqs = make_requests(6)
    cfg = config(server, use_batch=True, batch_poll_s=0.05)

    async def interrupted():
        task = asyncio.ensure_future(Engine(tmp_path, cfg).run(reqs))
        while server.stats()["requests"].get("/v1/batches", 0) < 1:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the batch id is recorded
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(interrupted())
    assert not results(tmp_path)
    # Simulate the worst moment: killed after the batch was created, before its id was saved.
    led = ledger_lib.Ledger(tmp_path / ledger_lib.LEDGER_FILE)
    (row,) = led.open_batches()
    led.batch_update(row["tag"], batch_id=None, state="uploaded")
    led.close()
    rep = Engine(tmp_path, cfg).run_sync(reqs)
    st = server.stats()
    assert st["n_batches"] == 1 and st["requests"]["/v1/files"] == 1  # found by its tag, not resubmitted
    assert all(st["by_body"][body_hash(r.body())] == 1 for r in reqs)
    assert rep.complete and sorted(results(tmp_path)) == list(range(6))


def test_rate_limiter_admits_at_the_configured_rate():
    async def admit(limiter, seconds, tokens, used):
        t0, n = time.monotonic(), 0
        while time.monotonic() - t0 < seconds:
            p = await limiter.acquire(tokens)
            limiter.release(p, used)
            n += 1
        return n, time.monotonic() - t0
    # 1200 rpm = 20/s with a 1 s bucket: 20 at once, then 20 per second.
    n, dt = asyncio.run(admit(RateLimiter(rpm=1200, burst_s=1.0), 1.5, 1, 1))
    assert abs(n - (20 + 20 * dt)) <= 2
    # 60k tpm = 1000 tokens/s; 500 reserved, 100 used: the refunds give 10 requests per second.
    n, dt = asyncio.run(admit(RateLimiter(tpm=60_000, burst_s=1.0), 1.5, 500, 100))
    assert abs(n * 100 - (1000 + 1000 * dt)) <= 2 * 500


def test_engine_stays_under_server_limits(server, tmp_path):
    # Server and client share the limits: the client must never be told 429, yet come close.
    server.configure(rpm=1200, tpm=30_000, burst_s=2.0, completion_tokens=(20, 40))
    reqs = make_requests(40, max_tokens=200)
    t0 = time.monotonic()
    rep = Engine(tmp_path, config(server, rpm=1200, tpm=30_000, concurrency=32)).run_sync(reqs)
    dt = time.monotonic() - t0
    st = server.stats()
    assert st["faults"].get("rate_limited", 0) == 0 and rep.complete
    tokens = rep.prompt_tokens + rep.completion_tokens
    # Within the limit: at most one bucket (1 s) beyond rate x time, for requests and tokens.
    assert 40 <= 20 * (dt + 1) + 1 and tokens <= 500 * (dt + 1) + 260
    assert tokens / dt >= 0.6 * 500  # and not far below it (startup included)


def test_redactor():
    r = Redactor([KEY])
    assert KEY not in r(f"Bearer {KEY} and sk-proj-abcdefghijklmnop")
    assert "sk-proj-abcdefghijklmnop" not in r("sk-proj-abcdefghijklmnop")
