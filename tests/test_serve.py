"""phijax.serve: the real openai client (sync, async, streaming) against the real server on
loopback, on test_decode's small random PhiForCausalLM (fp32, 256-token context).

One engine (4 slots, prefill chunks of at most 64 tokens: buckets 16, 32, 64) is shared by the
module, so the file compiles four programs for it; greedy parity is checked against
phijax.decode and transformers.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx  # what the openai client is built on
import jax
import numpy as np
import openai
import pytest
import torch
import transformers

from phijax import checkpoint as ckpt_lib
from phijax import decode, sharding
from phijax.serve import server as serve_lib
from phijax.serve.engine import Engine, SamplingParams
from phijax.serve.text import StopScanner
from test_decode import EOS, _ascii_pair, hf_dir  # noqa: F401  (hf_dir: a fixture)

NAME = "tiny-phi"


@pytest.fixture(scope="module")
def model(hf_dir):  # noqa: F811
    return decode.load_for_inference(hf_dir)


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, slots=4, max_len=256, prefill_chunk=64, max_queued=16, max_logprobs=5, layers="scan")
    eng.compile()
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    srv = serve_lib.Server(engine, model_name=NAME, chat_template=serve_lib.ChatTemplate())
    with serve_lib.running(srv) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def sampler(model):
    return decode.Sampler(model, batch_size=4, chunk_size=8, min_prompt_bucket=32)


def _prompt_ids(n, seed):
    return np.random.default_rng(seed).integers(2, 300, n).tolist()


PROMPTS = {"short": _prompt_ids(5, 1), "mid": _prompt_ids(40, 2), "long": _prompt_ids(150, 3)}  # long: 3 chunks


def _hf_greedy_text(hf_model, tok, ids, n_new):
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                                eos_token_id=EOS, pad_token_id=0)
    new = [t for t in out[0, len(ids):].tolist() if t != EOS]
    return tok.decode(new, skip_special_tokens=True)


def test_greedy_matches_decode_and_transformers(client, model, sampler, hf_dir):  # noqa: F811
    hf_model = transformers.PhiForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    for name, ids in PROMPTS.items():
        r = client.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0)
        text = r.choices[0].text
        tokens = sampler.generate_tokens([ids], 24)[0][0]
        assert text == model.tokenizer.decode(tokens, skip_special_tokens=True), name
        assert text == _hf_greedy_text(hf_model, model.tokenizer, ids, 24), name
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(tokens), name
        assert r.choices[0].finish_reason == ("stop" if tokens[-1] == EOS else "length")


def test_string_prompts_stream_and_stop_like_sampler_complete(client, sampler, model):
    prompt = "def fibonacci(n):\n"
    full = sampler.complete([prompt], 40)[0][0]
    stop = _ascii_pair(full[3:])
    want = sampler.complete([prompt], 40, stop=(stop,))[0][0]
    assert want == full[:full.find(stop)]
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=stop)
    assert plain.choices[0].text == want and plain.choices[0].finish_reason == "stop"
    pieces, usage = [], None
    for chunk in client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=[stop],
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == want and len(pieces) > 2  # streamed in pieces, none past the stop
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == len(model.tokenizer.encode(prompt))


def test_seeded_sampling_is_reproducible_and_matches_the_sampler(client, sampler):
    ids = PROMPTS["mid"]
    kw = dict(model=NAME, prompt=ids, max_tokens=20, temperature=0.9, top_p=0.9, seed=1234, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # choices have their own keys
    tok = sampler.model.tokenizer
    want = sampler.generate_tokens([ids], 20, temperature=0.9, top_p=0.9, num_samples=2, seed=1234)[0]
    assert [c.text for c in a.choices] == [tok.decode(w, skip_special_tokens=True) for w in want]


def test_batch_neighbours_do_not_change_a_request(url, client):
    """Greedy and seeded requests give the same tokens alone and amid other traffic; short
    requests finish while long ones still run (continuous batching)."""
    alone = client.completions.create(model=NAME, prompt=PROMPTS["mid"], max_tokens=30, temperature=0).choices[0]
    seeded = dict(model=NAME, prompt=PROMPTS["short"], max_tokens=30, temperature=1.0, seed=7)
    seeded_alone = client.completions.create(**seeded).choices[0].text

    async def traffic():
        ac = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
        done = {}

        async def one(key, **kw):
            r = await ac.completions.create(model=NAME, **kw)
            done[key] = (time.perf_counter(), r)

        longs = [one(f"long{i}", prompt=PROMPTS["long"], max_tokens=100, temperature=0.5, seed=i,
                     extra_body={"ignore_eos": True}) for i in range(2)]
        shorts = [one(f"short{i}", prompt=_prompt_ids(8 + i, 10 + i), max_tokens=4, temperature=0) for i in range(5)]
        await asyncio.gather(*longs, *shorts, one("mid", prompt=PROMPTS["mid"], max_tokens=30, temperature=0),
                             one("seeded", **{k: v for k, v in seeded.items() if k != "model"}))
        await ac.close()
        return done

    done = asyncio.run(traffic())
    assert done["mid"][1].choices[0].text == alone.text
    assert done["seeded"][1].choices[0].text == seeded_alone
    last_short = max(done[f"short{i}"][0] for i in range(5))
    assert all(done[f"long{i}"][1].usage.completion_tokens == 100 for i in range(2))  # ignore_eos: all 100
    assert last_short < min(done[f"long{i}"][0] for i in range(2))  # shorts did not wait for the longs


def test_logprobs_and_echo_match_transformers(client, hf_dir):  # noqa: F811
    hf_model = transformers.PhiForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = PROMPTS["mid"]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    with torch.no_grad():
        gen = hf_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
        logp = torch.log_softmax(hf_model(gen).logits[0].double(), -1)
    seq = gen[0].tolist()
    want = [None] + [float(logp[i - 1, seq[i]]) for i in range(1, len(seq))]
    assert len(lp.token_logprobs) == len(seq)
    assert lp.token_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], want[1:], atol=2e-4)
    assert all(len(t) == 3 for t in lp.top_logprobs[1:])
    best = [max(t.values()) for t in lp.top_logprobs[len(ids):]]  # greedy: the chosen token is the best
    np.testing.assert_allclose(best, lp.token_logprobs[len(ids):], atol=1e-6)
    assert lp.text_offset[0] == 0 and r.choices[0].text.startswith(lp.tokens[0])


def test_chat_plain_template_streams_and_continues_the_messages(client):
    msgs = [{"role": "system", "content": "# Utilities"}, {"role": "user", "content": "def add(a, b):"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=2)
    same = client.completions.create(model=NAME, prompt="# Utilities\n\ndef add(a, b):", max_tokens=12,
                                     temperature=0)
    assert r.choices[0].message.content == same.choices[0].text
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content
    # No max_tokens: chat generates what fits beside the prompt.
    assert client.chat.completions.create(model=NAME, messages=msgs, temperature=0, seed=1).usage.total_tokens <= 256


def test_models_and_health(url, client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    h = httpx.get(url.replace("/v1", "/health")).json()
    assert h["status"] == "ok" and h["slots"] == 4


def _error(fn):
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value.status_code, e.value.body


def test_bad_input_gets_the_openai_error_shape(client, url):
    create = client.completions.create
    status, body = _error(lambda: create(model=NAME, prompt=PROMPTS["long"], max_tokens=200))
    assert status == 400 and body["code"] == "context_length_exceeded"
    assert "256" in body["message"] and "150" in body["message"] and "200" in body["message"]
    status, body = _error(lambda: create(model=NAME, prompt="x", extra_body={"best_of": 3}))
    assert status == 400 and body["param"] == "best_of"
    status, body = _error(lambda: create(model=NAME, prompt="x", extra_body={"top_k": 3}))
    assert status == 400 and body["code"] == "unknown_parameter" and "top_k" in body["message"]
    status, body = _error(lambda: create(model=NAME, prompt="x", temperature="hot"))
    assert status == 400 and body["param"] == "temperature"
    status, body = _error(lambda: create(model=NAME, prompt="x", max_tokens=0))
    assert status == 400 and body["param"] == "max_tokens"
    status, body = _error(lambda: create(model=NAME, prompt=[], max_tokens=3))
    assert status == 400 and body["param"] == "prompt"
    status, body = _error(lambda: create(model="gpt-4", prompt="x"))
    assert status == 404 and body["code"] == "model_not_found" and NAME in body["message"]
    status, body = _error(lambda: create(model=NAME, prompt=[5, 999999]))
    assert status == 400 and "999999" in body["message"]
    r = httpx.post(url + "/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/completions", content=b" " * (17 << 20), timeout=30)  # past the 16 MiB limit
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert httpx.get(url + "/nothing").status_code == 404


def _wait(cond, timeout=10.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            return False
        time.sleep(0.02)
    return True


def test_full_queue_gets_429_with_retry_after(url, engine):
    """4 slots busy, 1 request waiting (the limit is set to 1 here): the next one is a 429."""
    engine.max_queued, old = 1, engine.max_queued
    try:
        async def run():
            ac = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0)
            busy = [asyncio.ensure_future(ac.completions.create(model=NAME, prompt=PROMPTS["short"], max_tokens=200,
                                                                temperature=1.0, seed=i,
                                                                extra_body={"ignore_eos": True})) for i in range(5)]
            deadline = time.time() + 30
            while engine.running < 4 or engine.queued < 1:
                assert time.time() < deadline, (engine.running, engine.queued)
                await asyncio.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                await ac.completions.create(model=NAME, prompt="x", max_tokens=2)
            for b in busy:
                b.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
            await ac.close()
            return e.value

        err = asyncio.run(run())
        assert err.response.headers["retry-after"] == "1" and err.body["code"] == "queue_full"
    finally:
        engine.max_queued = old
    assert _wait(lambda: engine.running == 0 and engine.queued == 0)  # the cancelled clients freed their slots


def test_a_client_that_disconnects_frees_its_slot(url, engine, monkeypatch):
    body = {"model": NAME, "prompt": PROMPTS["short"], "max_tokens": 240, "temperature": 1.0, "seed": 3,
            "stream": True, "ignore_eos": True}
    cancelled = engine.stats["cancelled"]
    # The tiny model could finish 240 tokens before this thread reads the first chunk: the engine's
    # second decode call waits until it has, and every call takes 20 ms more, so that the rest
    # takes over a second.
    collect, seen, calls = engine._collect, threading.Event(), []

    def slow_collect(*a):
        if calls:
            seen.wait(10)
        calls.append(1)
        time.sleep(0.02)
        return collect(*a)
    monkeypatch.setattr(engine, "_collect", slow_collect)
    with httpx.stream("POST", url + "/completions", json=body, timeout=30) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data:"))
        assert engine.running == 1
        seen.set()
    # The stream is closed mid-way: the slot is free within a few steps, long before 240 tokens.
    assert _wait(lambda: engine.running == 0, 5) and engine.stats["cancelled"] == cancelled + 1
    with pytest.raises(httpx.ReadTimeout):  # the same for a plain request whose client gives up
        httpx.post(url + "/completions", json=dict(body, stream=False), timeout=0.05)
    assert _wait(lambda: engine.running == 0 and engine.stats["cancelled"] == cancelled + 2, 5)


def test_stop_scanner_pieces_equal_the_whole_text(model):
    """Random tokens (lone UTF-8 bytes included) and stop sequences: streamed pieces + flush are
    the whole decoded text cut before the first stop, and no piece reaches into a stop."""
    tok = model.tokenizer
    rng = np.random.default_rng(0)
    for trial in range(40):
        ids = rng.integers(2, 300, 60).tolist()
        text = tok.decode(ids, skip_special_tokens=True)
        stops = [text[i:i + k] for i, k in zip(rng.integers(5, len(text) - 4, 2), (2, 4))] if trial % 2 else []
        sc, pieces = StopScanner(tok, stops), []
        for t in ids:
            piece, stopped = sc.add(t)
            pieces.append(piece)
            if stopped:
                break
        got = "".join(pieces) + sc.flush()
        want, _ = decode.cut_at_stop(tok.decode(ids, skip_special_tokens=True), stops)
        assert got == want, trial


@contextlib.contextmanager
def _serving(eng):
    """An openai client of `eng` served on loopback (started here, shut down after)."""
    eng.start()
    try:
        srv = serve_lib.Server(eng, model_name=NAME, chat_template=serve_lib.ChatTemplate())
        with serve_lib.running(srv) as base:
            yield openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    finally:
        eng.shutdown()


def test_sharded_engine_matches_single_device(model, client):
    mesh = sharding.make_mesh((2, 1, 2), devices=jax.devices()[:4])
    eng = Engine(model, slots=4, max_len=256, prefill_chunk=64, mesh=mesh)
    assert "tensor" in str(eng.params["layers"]["mlp"]["fc1"]["kernel"].sharding.spec)
    with _serving(eng) as c:
        for ids in PROMPTS.values():
            kw = dict(model=NAME, prompt=ids, max_tokens=12, temperature=0)
            assert c.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_unrolled_layers_windows_and_multi_step_calls_give_the_same_tokens(model, client):
    """layers='unrolled' (per-layer weights and cache buffers), attention windows and 3 tokens per
    decode call: the same greedy text (and usage) as the module's engine (layer scan, whole cache,
    one token per call)."""
    eng = Engine(model, slots=4, max_len=256, prefill_chunk=64, layers="unrolled", batch_invariant=False,
                 decode_steps=3)
    assert eng.windows == [128, 256] and len(eng.cache_struct_leaves()) == 2 * model.cfg.n_layers
    with _serving(eng) as c:
        for ids in PROMPTS.values():
            for kw in (dict(model=NAME, prompt=ids, max_tokens=40, temperature=0),
                       dict(model=NAME, prompt=ids, max_tokens=20, temperature=0.8, seed=5, stop=["e"])):
                got, want = c.completions.create(**kw), client.completions.create(**kw)
                assert got.choices[0].text == want.choices[0].text
                assert got.usage.completion_tokens == want.usage.completion_tokens
    assert eng.stats["decode_steps"] > 0


def test_prefill_updates_the_cache_in_place(model):
    """A prefill call writes its chunk into the cache buffers in place: no copy of a whole
    per-layer buffer (which cost 41 instead of 9 ms per call with 64 slots on the CPU demo model)."""
    for layers in ("unrolled", "scan"):
        eng = Engine(model, slots=8, max_len=256, prefill_chunk=64, layers=layers)
        hlo = eng._program("prefill", 64).as_text()
        cache_shapes = {f"[{','.join(map(str, c.shape))}]" for c in eng.cache_struct_leaves()}
        copies = [line for line in hlo.splitlines() if " copy(" in line and any(s in line for s in cache_shapes)]
        assert not copies, (layers, copies[:2])


def _run_alone(engine, ids, params):
    done, out = threading.Event(), []

    def on_event(seq, event):
        out.extend(event.tokens)
        if event.finish_reason:
            done.set()

    engine.submit([ids], params, 1, on_event)
    assert done.wait(60)
    return out


def test_slots_freed_and_refilled_while_a_call_is_in_flight(model, engine):
    """Decode calls are pipelined: a slot whose sequence ends is refilled while the next call (which
    still ran the ended sequence) is in flight. With 2 slots and 9 sequences of 1-9 tokens (one
    cancelled in the middle) joining and leaving at every call, each sequence's tokens equal its
    tokens alone, and the ended sequences' extra tokens reach nobody."""
    eng = Engine(model, slots=2, max_len=256, prefill_chunk=64, layers="scan")
    eng.start()
    try:
        events: dict[int, list] = collections.defaultdict(list)
        finished = threading.Event()
        params = [SamplingParams(max_tokens=1 + i, temperature=0, stop_at_eos=False) for i in range(9)]
        prompts = [_prompt_ids(6 + 3 * i, 40 + i) for i in range(9)]

        def on_event(seq, event):
            events[id(seq)].append(event)
            if sum(any(e.finish_reason for e in evs) for evs in events.values()) == 9:
                finished.set()

        seqs = [eng.submit([p], sp, 1, on_event)[0] for p, sp in zip(prompts, params)]
        eng.cancel([seqs[7]])
        assert finished.wait(120)
        for i, (s, p, sp) in enumerate(zip(seqs, prompts, params)):
            evs = events[id(s)]
            assert sum(e.finish_reason is not None for e in evs) == 1
            toks = [t for e in evs for t in e.tokens]
            if i == 7:
                assert evs[-1].finish_reason == "cancelled"
                continue
            assert evs[-1].finish_reason == "length" and toks == s.generated
            assert toks == _run_alone(engine, p, sp), i
        assert eng.running == 0 and eng.queued == 0
    finally:
        eng.shutdown()


@pytest.mark.slow
def test_command_serves_an_export_and_drains_on_ctrl_c(model, hf_dir, tmp_path):  # noqa: F811
    """`python -m phijax.serve --model <export>` answers the openai client; Ctrl-C lets the
    running request finish, then the process exits 130 (phijax's Ctrl-C code)."""
    export = str(tmp_path / "export")
    ckpt_lib.export_params(model.params, export, config=model.cfg.to_dict(),
                           tokenizer_path=os.path.join(hf_dir, "tokenizer.json"))
    key = "sk-test-" + "9" * 16
    env = dict(os.environ, SERVE_KEY=key, XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-m", "phijax.serve", "--model", export, "--port", "0", "--slots", "2",
                             "--max_len", "256", "--prefill_chunk", "32", "--api_key_env", "SERVE_KEY",
                             "--model_name", NAME], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "ready on" in line, proc.stderr.read()
        base = line.split("ready on ")[1].strip()
        c = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
        assert c.completions.create(model=NAME, prompt="import os\n", max_tokens=5).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        stream = c.completions.create(model=NAME, prompt="import os\n", max_tokens=150, temperature=1.0, seed=5,
                                      stream=True, stream_options={"include_usage": True},
                                      extra_body={"ignore_eos": True})
        first = next(stream)
        proc.send_signal(signal.SIGINT)
        chunks = [first] + list(stream)  # drained: the request runs to its end
        assert chunks[-1].usage.completion_tokens == 150
        assert proc.wait(60) == 130
        err = proc.stderr.read()
        assert key not in err and "Traceback" not in err
    finally:
        proc.kill()
        proc.wait()


def test_model_dir_best_and_latest(model, hf_dir, tmp_path):  # noqa: F811
    """--model MODEL_DIR --checkpoint best serves MODEL_DIR/best (tokenizer found there); a step
    that is not a training checkpoint is an error naming it."""
    md = tmp_path / "run"
    ckpt_lib.export_params(model.params, str(md / "best"), config=model.cfg.to_dict(),
                           tokenizer_path=os.path.join(hf_dir, "tokenizer.json"))
    parse = serve_lib.build_parser().parse_args
    srv, eng = serve_lib.build(parse(["--model", str(md), "--checkpoint", "best", "--max_len", "256",
                                      "--prefill_chunk", "64"]))
    assert eng.model.tokenizer is not None and eng.model.cfg == model.cfg
    with pytest.raises(FileNotFoundError, match="best"):
        serve_lib.build(parse(["--model", str(tmp_path / "empty"), "--checkpoint", "best"]))
    with pytest.raises(ValueError, match="'latest', 'best' or a step"):
        serve_lib.build(parse(["--model", str(md), "--checkpoint", "newest"]))


def test_command_rejects_bad_flags(tmp_path):
    r = subprocess.run([sys.executable, "-m", "phijax.serve", "--model", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nothing" in r.stderr
