"""data_gen.llm: the engine against a real loopback HTTP server through the real openai client.

Faults (429 + Retry-After, 5xx, timeouts, dropped connections, malformed JSON, cut-off
responses, 4xx), resume without re-sending completed work, the budget cap, the dry run, the
Batch API path (incl. a run interrupted after submitting), rate-limiter accuracy, and that the
API key never reaches logs or files. Then the hardening of issue 14: malformed answers asked
again, missing samples reported on every run, 401/403/404 and an unreachable endpoint stopping
the run, the output-directory lock, 429s that spend no attempts, default limits, and the CLI's
one-line errors and Ctrl-C.
"""
import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gin
import pytest

from data_gen import textbook
from data_gen.llm import ledger as ledger_lib
from data_gen.llm.engine import Engine, EngineConfig, EngineError, Redactor
from data_gen.llm.fake_server import FakeOpenAIServer, body_hash
from data_gen.llm.ratelimit import RateLimiter
from data_gen.llm.request import Request, TokenCounter, messages_from
from phijax.util import gin_config

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
        {"kind": "malformed", "match": "s6.", "first": 1},
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
    assert by_body == {0: 1, 1: 2, 2: 3, 3: 2, 4: 2, 5: 2, 6: 2, 7: 1, 8: 1, 9: 1, 10: 1}
    for i in (0, 1, 2, 3, 4, 5, 6, 8, 10):
        assert res[i]["status"] == "ok" and res[i]["finish_reason"] == "stop" and res[i]["text"]
        assert res[i]["response_id"].split("-")[1] == body_hash(reqs[i].body())
    assert res[1]["attempts"] == 2 and res[2]["attempts"] == 3
    # Retry-After honoured: the retry of s1 came at least 0.3 s after the 429.
    t = st["times_by_body"][body_hash(reqs[1].body())]
    assert t[1] - t[0] >= 0.3
    # A malformed answer is asked again; a cut-off one is recorded as such, not passed off as complete.
    assert res[6]["attempts"] == 2
    assert res[7]["status"] == "length" and res[7]["finish_reason"] == "length"
    # A 400 is not retried, and is not a result.
    assert 9 not in res
    led = ledger_lib.Ledger(tmp_path / ledger_lib.LEDGER_FILE)
    row = led.get(reqs[9].key)
    assert row["state"] == "failed" and row["retryable"] == 0 and row["status_code"] == 400
    assert "[REDACTED]" in row["error"]
    assert led.state_counts() == {"done": 10, "failed": 1}
    led.close()
    assert report.by_status == {"ok": 9, "length": 1} and report.n_failed == 1
    assert report.retries_by_reason == {"429": 1, "5xx": 3, "timeout": 1, "connection": 1, "malformed": 1}
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
                             {"kind": "no_choices", "match": "s9.", "first": 1},  # malformed: resubmitted
                             {"kind": "400", "match": "s7."}])
    reqs = make_requests(12)
    caplog.set_level(logging.INFO)
    rep = Engine(tmp_path, config(server, use_batch=True, batch_poll_s=0.05, batch_max_requests=5)).run_sync(reqs)
    res = results(tmp_path)
    assert sorted(res) == [i for i in range(12) if i != 7]
    assert all(r["via"] == "batch" and r["status"] == "ok" for r in res.values())
    st = server.stats()
    counts = {r.sample_index: st["by_body"][body_hash(r.body())] for r in reqs}
    assert counts == {i: 2 if i in (3, 5, 9) else 1 for i in range(12)}  # only the failures twice
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


# --- hardening (issue 14) ----------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_gin():
    yield
    gin.clear_config()


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def textbook_prompts(n):
    """The user prompt of each textbook sample the CLI builds (to aim faults at one sample)."""
    reqs = textbook.build_requests(textbook.TextbookConfig(n_samples=n), "fake-textbook")
    prompts = [r.messages[-1]["content"] for r in reqs]
    assert len(set(prompts)) == n
    return prompts, reqs


def textbook_argv(server_url, out, n, *extra):
    return ["--gin_file=gin/data/textbook.gin", f"--out_dir={out}", f"--n_samples={n}",
            "--gin_param=data_gen.EngineConfig.model = 'fake-textbook'",
            f"--gin_param=data_gen.EngineConfig.base_url = '{server_url}'",
            "--gin_param=data_gen.EngineConfig.progress = False",
            "--gin_param=data_gen.EngineConfig.concurrency = 4",
            "--gin_param=data_gen.EngineConfig.max_attempts = 2",
            "--gin_param=data_gen.EngineConfig.backoff_base_s = 0.01",
            "--gin_param=data_gen.EngineConfig.backoff_max_s = 0.05",
            "--gin_param=data_gen.TextbookConfig.min_chars = 400", *extra]


def body_count(server, req):
    return server.stats()["by_body"].get(body_hash(req.body()), 0)


def test_malformed_answers_are_asked_again_until_well_formed(server, tmp_path):
    server.configure(faults=[{"kind": "malformed", "match": "s0.", "first": 2},
                             {"kind": "no_choices", "match": "s1.", "first": 1}])
    reqs = make_requests(4)
    rep = Engine(tmp_path, config(server, max_attempts=3)).run_sync(reqs)
    res = results(tmp_path)
    assert rep.complete and rep.by_status == {"ok": 4} and rep.retries_by_reason == {"malformed": 3}
    assert all(r["status"] == "ok" and r["text"] for r in res.values())
    assert res[0]["attempts"] == 3 and res[1]["attempts"] == 2
    lines = (tmp_path / ledger_lib.RESPONSES_FILE).read_text().splitlines()
    assert len(lines) == 4  # only well-formed answers are results
    # A malformed answer stored as done by an older run is asked again, not reported as done.
    more = make_requests(6)
    old = {"key": more[4].key, "sample_index": 4, "status": "malformed", "text": None, "cost_usd": 0.01}
    with open(tmp_path / ledger_lib.RESPONSES_FILE, "a") as f:
        f.write(json.dumps(old) + "\n")
    rep2 = Engine(tmp_path, config(server)).run_sync(more)
    assert rep2.n_already_done == 4 and rep2.by_status == {"ok": 2} and results(tmp_path)[4]["status"] == "ok"


def test_missing_samples_exit_3_saying_how_many_and_why_on_every_run(server, tmp_path, capsys, clean_gin):
    n = 6
    prompts, reqs = textbook_prompts(n)
    faults = [{"kind": "malformed", "match": prompts[2]}, {"kind": "400", "match": prompts[4]}]
    server.configure(faults=faults)
    out = tmp_path / "tb"
    for run in range(2):  # the rerun must not report the missing samples as done
        before = body_count(server, reqs[2])
        assert textbook.main(textbook_argv(server.base_url, out, n)) == 3
        text = capsys.readouterr().out
        assert "2 of 6 samples have no answer" in text, text
        assert "malformed" in text and "HTTP 400" in text and "retry_failed" in text
        assert body_count(server, reqs[2]) == before + 2  # asked again (max_attempts = 2)
        assert body_count(server, reqs[4]) == 1  # a 400 is not resent by itself
    assert KEY not in text
    server.configure(faults=[])
    assert textbook.main(textbook_argv(server.base_url, out, n,
                                       "--gin_param=data_gen.EngineConfig.retry_failed = True")) == 0
    assert "no answer" not in capsys.readouterr().out


@pytest.mark.parametrize("fault", ["401", "403", "404"])
def test_auth_permission_and_model_errors_stop_the_run_and_record_nothing(server, tmp_path, monkeypatch, caplog,
                                                                         fault):
    wrong = "sk-wrong-0123456789abcdefghijkl"
    server.configure(api_key=KEY, models=["m"])
    reqs = make_requests(40)
    model = "m"
    if fault == "401":
        monkeypatch.setenv("OPENAI_API_KEY", wrong)
    elif fault == "403":
        server.configure(faults=[{"kind": "403"}])
    else:
        model = "no-such-model"
        reqs = make_requests(40, model=model)
    cfg = config(server, concurrency=4, model=model, prices={model: PRICES["m"]})
    with pytest.raises(EngineError) as err:
        Engine(tmp_path, cfg).run_sync(reqs)
    msg = str(err.value)
    want = {"401": ["HTTP 401", "OPENAI_API_KEY"], "403": ["HTTP 403", "Permission denied"],
            "404": ["HTTP 404", "no-such-model", "data_gen.EngineConfig.model"]}[fault]
    assert all(w in msg for w in want), msg
    assert wrong not in msg and wrong not in caplog.text and KEY not in msg
    assert server.stats()["total"] <= 4  # stopped at the first answer (at most what was in flight)
    led = ledger_lib.Ledger(tmp_path / ledger_lib.LEDGER_FILE)
    assert led.state_counts() == {} and led.spent() == 0  # nothing recorded against the samples
    led.close()
    # Fixed: the same output directory finishes every sample.
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server.configure(faults=[], models=None)
    rep = Engine(tmp_path, cfg).run_sync(reqs)
    assert rep.complete and rep.by_status == {"ok": 40} and rep.n_skipped_failed == 0
    assert_no_key_in(tmp_path)


def test_auth_failures_recorded_by_older_runs_do_not_poison_the_output(server, tmp_path):
    reqs = make_requests(3)
    led = ledger_lib.Ledger(tmp_path / ledger_lib.LEDGER_FILE)
    led.mark_failed(reqs[0].key, 0, 401, "HTTP 401: Incorrect API key provided", False)
    led.close()
    rep = Engine(tmp_path, config(server)).run_sync(reqs)
    assert rep.complete and rep.by_status == {"ok": 3}


def test_second_run_on_the_same_out_dir_is_refused_until_the_holder_dies(tmp_path, monkeypatch, capsys, clean_gin):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "tb"
    with FakeOpenAIServer(latency=(0.3, 0.3)) as server:
        argv = textbook_argv(server.base_url, out, 40, "--gin_param=data_gen.EngineConfig.concurrency = 1")
        holder = subprocess.Popen([sys.executable, "-m", "data_gen.textbook", *argv], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (out / ledger_lib.RESPONSES_FILE).exists() and time.monotonic() < deadline:
                assert holder.poll() is None, holder.stderr.read().decode()
                time.sleep(0.05)
            sent = server.stats()["total"]
            assert textbook.main(argv) == 2
            err = capsys.readouterr().err
            assert f"pid {holder.pid}" in err and socket.gethostname() in err and "started" in err, err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
            assert server.stats()["total"] <= sent + 1  # the second run sent nothing
            with pytest.raises(EngineError, match=f"pid {holder.pid}"):
                Engine(out, EngineConfig(model="fake-textbook", base_url=server.base_url, progress=False)).run_sync(
                    make_requests(2, model="fake-textbook"))
        finally:
            holder.send_signal(signal.SIGKILL)  # the lock of a dead process is released by the kernel
            holder.wait()
        assert textbook.main(argv) == 0
    assert len(results(out)) == 40


def test_unreachable_endpoint_fails_fast_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    for concurrency in (16, 1):
        cfg = EngineConfig(model="m", base_url=url, concurrency=concurrency, max_attempts=8, backoff_base_s=0.05,
                           backoff_max_s=0.2, progress=False)
        t0 = time.monotonic()
        with pytest.raises(EngineError, match="cannot reach") as err:
            Engine(tmp_path, cfg).run_sync(make_requests(200))
        assert time.monotonic() - t0 < 5
        assert url in str(err.value) and "base_url" in str(err.value)
        led = ledger_lib.Ledger(tmp_path / ledger_lib.LEDGER_FILE)
        assert led.state_counts() == {}
        led.close()


def test_retries_are_logged_at_the_default_level_rate_limited(server, tmp_path, caplog):
    server.configure(faults=[{"kind": "503", "first": 2}])
    caplog.set_level(logging.WARNING)
    rep = Engine(tmp_path, config(server, max_attempts=4)).run_sync(make_requests(40))
    assert rep.complete and rep.retries_by_reason == {"5xx": 80}
    lines = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert 1 <= len(lines) <= 3, lines  # at most one line per 10 s (the first at once)
    assert "5xx" in lines[0] and "HTTP 503" in lines[0]


def test_429s_do_not_spend_attempts_and_their_wait_is_capped(server, tmp_path):
    server.configure(faults=[{"kind": "429", "match": "s0.", "first": 6, "retry_after": 0.02},
                             {"kind": "429", "match": "s1.", "retry_after": 0.1}])
    reqs = make_requests(3)
    rep = Engine(tmp_path, config(server, max_attempts=2, rate_limit_max_wait_s=0.6)).run_sync(reqs)
    res = results(tmp_path)
    assert res[0]["status"] == "ok" and res[0]["attempts"] == 7 and res[2]["status"] == "ok"
    assert 1 not in res and rep.n_failed == 1
    assert 4 <= body_count(server, reqs[1]) <= 9  # about 0.6 s / 0.1 s of Retry-After
    led = ledger_lib.Ledger(tmp_path / ledger_lib.LEDGER_FILE)
    row = led.get(reqs[1].key)
    assert row["state"] == "failed" and row["retryable"] == 1 and "rate limited" in row["error"]
    led.close()


def test_default_limits_use_the_promised_concurrency_and_say_what_binds(server, tmp_path, caplog, clean_gin):
    gin_config.parse(["gin/data/engine.gin"], [])
    cfg = EngineConfig()
    cfg.base_url, cfg.model, cfg.progress, cfg.prices = server.base_url, "m", False, PRICES
    server.configure(latency=(0.5, 0.6))
    caplog.set_level(logging.INFO)
    n = cfg.concurrency
    Engine(tmp_path, cfg).run_sync(make_requests(n, max_tokens=1500))  # textbook.gin's max_tokens
    assert server.stats()["max_in_flight"] >= 0.75 * n
    line = next(r.getMessage() for r in caplog.records if "in flight" in r.getMessage())
    assert f"{n} requests in flight" in line and "concurrency" in line, line
    # A limit that binds is named.
    caplog.clear()
    cfg.tpm = 30_000
    Engine(tmp_path / "b", cfg).run_sync(make_requests(2, max_tokens=1500))
    line = next(r.getMessage() for r in caplog.records if "in flight" in r.getMessage())
    assert "tpm binds" in line, line


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_dir_that_is_a_file_is_one_line_exit_2(server, tmp_path, capsys, clean_gin, where):
    f = tmp_path / "f.txt"
    f.write_text("x")
    out = f if where == "file" else f / "sub" / "dir"
    assert textbook.main(textbook_argv(server.base_url, out, 2)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "is a file" in err and str(f) in err, err
    assert server.stats()["total"] == 0 and f.read_text() == "x"


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_dry_run_on_an_out_dir_that_is_a_file_is_one_line_exit_2(server, tmp_path, capsys, clean_gin, where):
    f = tmp_path / "f.txt"
    f.write_text("x")
    out = f if where == "file" else f / "sub"
    assert textbook.main(textbook_argv(server.base_url, out, 2, "--dry_run")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "is a file" in err and str(f) in err, err
    assert server.stats()["total"] == 0 and f.read_text() == "x"
    assert textbook.main(textbook_argv(server.base_url, tmp_path / "new", 2, "--dry_run")) == 0  # need not exist
    assert not (tmp_path / "new").exists()


def test_why_missing_is_one_query(tmp_path):
    led = ledger_lib.Ledger(tmp_path / ledger_lib.LEDGER_FILE)
    led.mark_failed("k5xx", 1, 503, "unavailable", retryable=True, reason="5xx")
    led.mark_failed("k400", 2, 400, "bad request", retryable=False)
    led.mark_failed("kmal", 3, 200, "no choices", retryable=True, reason="malformed")
    led.batch_begin("b1", [("kbat", 4)], 0, 0.0)
    led.mark_done("kdone", 5, "malformed", None, None, 0.0, "sync")
    led.start_attempt("kfly", 6)
    statements = []
    led.db.set_trace_callback(statements.append)
    why = led.why_missing(["k5xx", "k400", "kmal", "kbat", "kdone", "kfly", "unknown", "k400"])
    led.close()
    assert len(statements) == 1, statements
    assert why == {"HTTP 503 (retries used up; the next run asks again)": 1,
                   "HTTP 400 (not resent: data_gen.EngineConfig.retry_failed = True resends)": 2,
                   "malformed answers (retries used up; the next run asks again)": 1,
                   "in a batch not collected yet": 1, "malformed answers (the next run asks again)": 1,
                   "not sent yet (budget cap, or the run was stopped)": 2}


def test_finalize_reads_the_responses_once(server, tmp_path, capsys, clean_gin, monkeypatch):
    out = tmp_path / "tb"
    prompts, _ = textbook_prompts(4)
    server.configure(faults=[{"kind": "400", "match": prompts[1]}])
    assert textbook.main(textbook_argv(server.base_url, out, 4)) == 3  # one sample without an answer
    reads = []
    iter_answers = ledger_lib.iter_answers
    monkeypatch.setattr(ledger_lib, "iter_answers", lambda path: reads.append(path) or iter_answers(path))
    assert textbook.main(textbook_argv(server.base_url, out, 4, "--finalize_only")) == 3
    assert "1 of 4 samples have no answer: 1 HTTP 400" in capsys.readouterr().out
    assert reads == [out / ledger_lib.RESPONSES_FILE]


def test_finalize_only_on_a_missing_out_dir_exits_2_and_creates_nothing(server, tmp_path, capsys, clean_gin):
    out = tmp_path / "typo"
    assert textbook.main(textbook_argv(server.base_url, out, 2, "--finalize_only")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and not out.exists()


def test_ctrl_c_says_how_to_resume_in_one_line(tmp_path, monkeypatch, clean_gin):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "tb"
    with FakeOpenAIServer(latency=(0.2, 0.3)) as server:
        argv = textbook_argv(server.base_url, out, 30)
        p = subprocess.Popen([sys.executable, "-m", "data_gen.textbook", *argv], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(results(out)) < 4 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 130, stderr
        assert "Traceback" not in stderr, stderr
        lines = [ln for ln in stderr.strip().splitlines() if not ln[:4].isdigit()]  # not a log line
        assert len(lines) == 1 and "interrupted" in lines[0] and "rerun" in lines[0] and str(out) in lines[0], stderr
        assert textbook.main(argv) == 0
        st = server.stats()
        assert st["total"] <= 30 + 4 and max(st["by_body"].values()) <= 2  # answers are not asked for again
    assert len(results(out)) == 30
