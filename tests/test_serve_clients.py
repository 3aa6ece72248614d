"""phijax.serve's real clients, end to end over loopback (uvicorn, the `openai` client, no mocks):

* data_gen's textbook and exercises CLIs and the LLM annotator, pointed at phijax.serve unchanged,
  get an HTTP 200 for every request (no failures, no retries), record the server's exact token
  usage, and account for every sample (accepted + rejected = asked for; the tiny random model
  writes garbage, so most are rejected);
* `phijax.evaluate`'s endpoint mode scores HumanEval problems with phijax.serve's completions,
  and the samples file holds exactly what the server answers.

The fixture model's config says 256 positions, but the shipped prompt templates are 470-800
tokens with its 300-token BPE: it is rotary, so it is served with max_len 1024.
"""
import json
import os

import gin
import pytest

from data_gen import annotate, exercises, generator, textbook
from data_gen.llm import engine as engine_lib
from data_gen.llm import ledger as ledger_lib
from phijax import decode
from phijax.data import vocab
from phijax.evaluate import problems, run as eval_run
from phijax.serve import server as serve_lib
from phijax.serve.engine import Engine
from test_decode import hf_dir  # noqa: F401 (module-scoped fixture)

KEY = "sk-test-SERVECLIENTS0123456789"
MODEL = "tiny-phi"
MAX_TOKENS = 48
MAX_LEN = 1024


@pytest.fixture(scope="module")
def served(hf_dir):  # noqa: F811
    """(base_url, tokenizer) of phijax.serve over the tiny model; it takes only KEY."""
    model = decode.load_for_inference(hf_dir, max_len=MAX_LEN)
    engine = Engine(model, slots=4, max_len=MAX_LEN, prefill_chunk=128)
    engine.start()
    srv = serve_lib.Server(engine, model_name=MODEL, chat_template=serve_lib.ChatTemplate(), api_key=KEY)
    try:
        with serve_lib.running(srv) as url:
            yield url, vocab.BPETokenizer(os.path.join(hf_dir, "tokenizer.json"))
    finally:
        engine.shutdown()


def _chat_tokens(tok, req) -> int:
    """What the server should count: the plain template's rendering, encoded."""
    return len(tok.encode(serve_lib.ChatTemplate().render(list(req.messages))))


def _check_answers(out, requests, tok):
    """Every request answered once with HTTP 200, the server's usage recorded as reported."""
    by_key = {r.key: r for r in requests}
    recs = list(ledger_lib.iter_results(out / ledger_lib.RESPONSES_FILE))
    assert sorted(r["key"] for r in recs) == sorted(by_key)
    for r in recs:
        u = r["usage"]
        assert r["status"] in ("ok", "length") and r["attempts"] == 1 and "error" not in r, r
        assert u["reported"] is True and u["prompt_tokens"] == _chat_tokens(tok, by_key[r["key"]])
        assert (u["completion_tokens"] == MAX_TOKENS) if r["finish_reason"] == "length" else \
            (1 <= u["completion_tokens"] <= MAX_TOKENS and r["finish_reason"] == "stop")
        assert r["response_id"].startswith("chatcmpl-")
    led = ledger_lib.Ledger(out / ledger_lib.LEDGER_FILE)
    assert led.state_counts() == {"done": len(by_key)}
    led.close()
    return recs


@pytest.mark.parametrize("mod,name,n", [(textbook, "textbook", 3), (exercises, "exercises", 3)])
def test_data_gen_generators(served, tmp_path, monkeypatch, mod, name, n):
    url, tok = served
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / name
    cfg_name = f"data_gen.{'Textbook' if name == 'textbook' else 'Exercises'}Config"
    try:
        rc = mod.main([f"--gin_file=gin/data/{name}.gin", f"--out_dir={out}", f"--n_samples={n}",
                       f"--gin_param=data_gen.EngineConfig.model = '{MODEL}'",
                       "--gin_param=data_gen.EngineConfig.concurrency = 4",
                       "--gin_param=data_gen.EngineConfig.progress = False",
                       f"--gin_param={cfg_name}.max_tokens = {MAX_TOKENS}",
                       *([f"--gin_param={cfg_name}.sandbox_workers = 1"] if name == "exercises" else [])])
    finally:
        gin.clear_config()
    assert rc == 0
    cfg = mod.TextbookConfig(n_samples=n, max_tokens=MAX_TOKENS) if name == "textbook" else \
        mod.ExercisesConfig(n_samples=n, max_tokens=MAX_TOKENS)
    recs = _check_answers(out, mod.build_requests(cfg, MODEL), tok)
    stats = json.loads((out / generator.STATS_FILE).read_text())
    eng = stats["engine"]
    assert eng["n_sent"] == eng["n_http_attempts"] == n and eng["n_failed"] == 0 and eng["retries_by_reason"] == {}
    assert eng["complete"] and sum(eng["by_status"].values()) == n
    assert eng["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in recs)
    assert eng["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in recs)
    rejects = [json.loads(x) for x in (out / generator.REJECTS_FILE).read_text().splitlines()]
    shard_recs = [x for p in (out / "shards").glob(f"{name}-*.jsonl") for x in p.read_text().splitlines()]
    assert stats["n_missing"] == 0 and stats["n_accepted"] == len(shard_recs)
    assert len(shard_recs) + len(rejects) == n
    # a cut-off answer is never passed off as complete
    assert all(r["reason"] == "not_served_ok:length" for r in rejects if r["status"] == "length")


def test_data_gen_annotate(served, tmp_path, monkeypatch):
    url, tok = served
    monkeypatch.setenv("SERVE_CLIENTS_KEY", KEY)
    docs = [{"id": f"doc{i}", "text": f"def scale_{i}(xs):\n    return [x * {i} for x in xs]\n"} for i in range(2)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    # json_mode (the default) sends response_format json_object: phijax.serve takes it as a hint
    cfg = annotate.AnnotateConfig(max_tokens=MAX_TOKENS, json_mode=True, max_parse_retries=1)
    ecfg = engine_lib.EngineConfig(model=MODEL, base_url=url, api_key_env="SERVE_CLIENTS_KEY", concurrency=4,
                                   progress=False)
    out = tmp_path / "ann"
    rep = annotate.run([str(inp)], out, n_samples=2, annotator="llm", config=cfg, engine_config=ecfg)
    assert rep["annotator"] == f"llm:{MODEL}" and rep["sampled"] == 2 and rep["complete"] is True
    assert rep["annotated"] + rep["rejected"] == 2 and rep["pending"] == 0
    assert "request_failed" not in rep["rejects_by_reason"]
    eng = rep["engine"]
    n_req = 2 + rep["parse_retries"]
    assert eng["n_sent"] == eng["n_http_attempts"] == n_req and eng["n_failed"] == 0
    assert eng["retries_by_reason"] == {} and sum(eng["by_status"].values()) == n_req
    prompter = annotate.Prompter(cfg, MODEL)
    reqs = [prompter.request(d["text"], a) for d in docs for a in range(2)]
    answered = {r["key"] for r in ledger_lib.iter_results(out / ledger_lib.RESPONSES_FILE)}
    recs = _check_answers(out, [r for r in reqs if r.key in answered], tok)
    assert len(recs) == n_req and eng["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in recs)
    assert (out / "_COMPLETE").is_file() and (out / annotate.REPORT_FILE).is_file()


def test_evaluate_endpoint(served, tmp_path, monkeypatch):
    import openai

    url, tok = served
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "eval"
    summary = eval_run.evaluate(benchmark="humaneval", endpoint=url, endpoint_model=MODEL,
                                endpoint_api="completions", limit=3, max_new_tokens=MAX_TOKENS, timeout_s=5.0,
                                workers=2, output_dir=str(out))
    probs = problems.load_problems("humaneval", limit=3)
    assert summary["problems"] == 3 and summary["pass@1"] == 0.0 and summary["endpoint"] == url
    assert summary["endpoint_model"] == MODEL and summary["endpoint_api"].startswith("completions")
    assert (out / "report.md").is_file() and (out / "summary.json").is_file()
    samples = [json.loads(x) for x in open(out / "humaneval_humaneval_samples.jsonl")]
    assert [s["task_id"] for s in samples] == [p.task_id for p in probs]
    results = [json.loads(x) for x in open(summary["results_path"])]
    assert sorted(r["task_id"] for r in results) == sorted(p.task_id for p in probs)
    assert all(r["passed"] is False for r in results)
    # the samples are the server's greedy completions (asked again: the same), cut at the stops
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    for p, s in zip(probs, samples):
        r = client.completions.create(model=MODEL, prompt=p.prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                      top_p=1.0, seed=0, stop=list(p.stop))
        assert decode.cut_at_stop(r.choices[0].text, p.stop)[0] == s["completion"]
        assert r.usage.prompt_tokens == len(tok.encode(p.prompt))
        assert r.usage.completion_tokens <= MAX_TOKENS


def test_evaluate_endpoint_fits_max_new_tokens_to_the_context(served, tmp_path, monkeypatch, caplog):
    """max_new_tokens beyond the context for every prompt (the server answers 400): each generates
    what fits beside it, as model mode does, learning the context from /v1/models."""
    import openai

    url, tok = served
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    probs = problems.load_problems("humaneval", limit=2)
    lengths = [len(tok.encode(p.prompt)) for p in probs]
    want_new = MAX_LEN - min(lengths) + 8  # too many beside every prompt
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=probs[0].prompt, max_tokens=want_new)
    with caplog.at_level("INFO", logger="phijax.evaluate"):
        summary = eval_run.evaluate(benchmark="humaneval", endpoint=url, endpoint_model=MODEL,
                                    endpoint_api="completions", limit=2, max_new_tokens=want_new, timeout_s=5.0,
                                    workers=2, output_dir=str(tmp_path / "eval"))
    assert summary["problems"] == 2
    assert f"does not fit beside 2 of 2 prompts in the endpoint's context (max_model_len={MAX_LEN})" in caplog.text
    samples = [json.loads(x) for x in open(tmp_path / "eval" / "humaneval_humaneval_samples.jsonl")]
    for p, n, s in zip(probs, lengths, samples):  # the server's greedy text with the tokens that fit
        r = client.completions.create(model=MODEL, prompt=p.prompt, max_tokens=MAX_LEN - n, temperature=0.0,
                                      top_p=1.0, seed=0, stop=list(p.stop))
        assert decode.cut_at_stop(r.choices[0].text, p.stop)[0] == s["completion"]
