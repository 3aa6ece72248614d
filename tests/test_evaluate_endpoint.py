"""`evaluate.endpoint`: HumanEval / MBPP completions from an OpenAI-compatible endpoint (the loopback
fake server over real HTTP, the real `openai` client), scored in the same sandbox."""
import json
import socket
import time

import pytest

from data_gen.llm.fake_server import FakeOpenAIServer, body_hash
from phijax.evaluate import problems, run

KEY = "sk-endpoint-test-secret-4711"


def _canonical_replies(probs):
    """Fake-server rules: each problem's prompt answered with its canonical solution."""
    return [{"kind": "reply", "match": f"def {p.entry_point}(", "text": p.canonical_solution} for p in probs]


def _args(server_url, out, *extra):
    return ["--gin_file=gin/eval/humaneval.gin", f"--gin_param=evaluate.endpoint = '{server_url}'",
            "--gin_param=evaluate.endpoint_model = 'phi-1'", "--gin_param=evaluate.limit = 3",
            f"--gin_param=evaluate.output_dir = '{out}'", "--gin_param=evaluate.timeout_s = 5.0",
            *[f"--gin_param={p}" for p in extra]]


def _outputs(out):
    return "".join(p.read_text() for p in out.iterdir() if p.suffix in (".json", ".jsonl", ".md"))


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAIServer(api_key=KEY, models=["phi-1"]) as s:
        yield s


def test_canonical_answers_score_100_and_the_settings_are_sent(server, tmp_path, capsys):
    probs = problems.load_problems("humaneval", limit=3)
    server.configure(faults=_canonical_replies(probs))
    out = tmp_path / "out"
    rc = run.main(_args(server.base_url, out, "evaluate.endpoint_concurrency = 2", "evaluate.seed = 5"))
    std = capsys.readouterr()
    assert rc == 0, std.err[-2000:]
    assert "pass@1 = 100.00%" in std.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@1"] == 1.0 and summary["problems"] == 3
    assert summary["endpoint"] == server.base_url and summary["endpoint_model"] == "phi-1"
    assert summary["source"] == f"phi-1 at {server.base_url}" and summary["endpoint_api"].startswith("completions")
    # every request carried the prompt as is, the HumanEval stop sequences, the sampling settings and a seed
    for p in probs:
        body = {"model": "phi-1", "prompt": p.prompt, "max_tokens": 512, "temperature": 0.0, "top_p": 1.0,
                "seed": 5, "stop": list(problems.HUMANEVAL_STOP)}
        assert server.stats()["ok_by_body"].get(body_hash(body)) == 1, p.task_id
    md = (out / "report.md").read_text()
    assert "prompt format: humaneval" in md and "| endpoint API | completions: the prompt as is" in md
    assert KEY not in _outputs(out) + std.out + std.err


def test_garbage_answers_score_0_and_stops_are_cut_client_side(server, tmp_path, capsys):
    probs = problems.load_problems("humaneval", limit=3)
    # a server that ignores `stop`: the client cuts at "\ndef" (what follows would not even parse)
    server.configure(faults=[{"kind": "reply", "text": "    return None\ndef broken(:\n"}])
    out = tmp_path / "out"
    assert run.main(_args(server.base_url, out, "evaluate.num_samples = 2", "evaluate.ks = [1, 2]")) == 0
    assert "pass@1 = 0.00%" in capsys.readouterr().out
    samples = [json.loads(line) for line in open(out / "humaneval_humaneval_samples.jsonl")]
    assert len(samples) == 6 and {s["completion"] for s in samples} == {"    return None"}
    # sample j of each problem is requested with seed + j
    for p in probs:
        for j in range(2):
            body = {"model": "phi-1", "prompt": p.prompt, "max_tokens": 512, "temperature": 0.0, "top_p": 1.0,
                    "seed": j, "stop": list(problems.HUMANEVAL_STOP)}
            assert body_hash(body) in server.stats()["ok_by_body"]


def test_chat_api(server, tmp_path, capsys):
    probs = problems.load_problems("humaneval", limit=3)
    server.configure(faults=_canonical_replies(probs))
    out = tmp_path / "out"
    assert run.main(_args(server.base_url, out, "evaluate.endpoint_api = 'chat'")) == 0
    assert "pass@1 = 100.00%" in capsys.readouterr().out
    assert server.stats()["requests"].get("/v1/chat/completions") == 4  # the probe + 3 problems
    assert "/v1/completions" not in server.stats()["requests"]
    body = {"model": "phi-1", "messages": [{"role": "user", "content": probs[0].prompt}], "max_tokens": 512,
            "temperature": 0.0, "top_p": 1.0, "seed": 0, "stop": list(problems.HUMANEVAL_STOP)}
    assert body_hash(body) in server.stats()["ok_by_body"]
    md = (out / "report.md").read_text()
    assert "| endpoint API | chat: the prompt as one user message" in md and "prompt format: humaneval" in md


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_exits_2_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    t0 = time.monotonic()
    rc = run.main(_args(f"http://127.0.0.1:{_closed_port()}/v1", tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2 and time.monotonic() - t0 < 20
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "is unreachable" in lines[0], err
    assert KEY not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("params,match", [
    (["evaluate.endpoint_model = 'nope'"], "has no model 'nope'"),
    (["evaluate.endpoint_api = 'responses'"], "endpoint_api='responses' must be one of"),
    (["evaluate.endpoint_concurrency = 0"], "endpoint_concurrency=0"),
    (["evaluate.samples = '/tmp/x.jsonl'"], "evaluate.samples and evaluate.endpoint are exclusive"),
    (["evaluate.model_path = '/tmp'"], "evaluate.model_path and evaluate.endpoint are exclusive"),
    (["evaluate.endpoint_model = None"], "endpoint_model=None"),
])
def test_bad_endpoint_settings_exit_2(server, tmp_path, capsys, params, match):
    rc = run.main(_args(server.base_url, tmp_path / "out", *params))
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    assert server.stats()["requests"].get("/v1/completions", 0) <= 1  # at most the probe
    assert not (tmp_path / "out").exists()


def test_a_rejected_key_is_redacted(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-0815")  # the server's 401 echoes the key it got
    assert run.main(_args(server.base_url, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "rejected the API key" in err and "sk-wrong-key-0815" not in err
