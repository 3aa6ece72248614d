"""data_gen.textbook and data_gen.minhash: validation, recorded reproducible choices, MinHash
near-duplicates, and the CLI end to end against the loopback server, killed with SIGKILL
mid-run and resumed (no completed request sent twice, nothing lost, no torn lines)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import pytest

from data_gen import generator, minhash, textbook
from data_gen.llm import ledger as ledger_lib
from data_gen.llm.fake_server import FakeOpenAIServer

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-test-TEXTBOOKSECRET987654321"
GOOD = ("## Lists\n\n" + "Lists keep values in order and let you index them. " * 12 +
        "\n\n```python\nxs = [1, 2, 3]\nprint(xs[0])\n```\n\nThe output is 1.\n")


def cfg(**kw):
    c = textbook.TextbookConfig(min_chars=200)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("text,reason", [
    (GOOD, None),
    ("I'm sorry, but I can't write that. " * 10, "refusal"),
    ("As an AI language model, " + GOOD, "refusal"),
    ("Sure! Here is the section.\n\n" + GOOD, "boilerplate_opening"),
    ("Here's a textbook section.\n\n" + GOOD, "boilerplate_opening"),
    ("## Lists\n\nShort.\n\n```python\nx = 1\n```\n", "too_short"),
    (GOOD.replace("```python", "```text"), "no_code"),
    (GOOD.replace("print(xs[0])", "print(xs[0]"), "code_syntax_error"),
])
def test_validate_reasons(text, reason):
    got = textbook.validate(text, cfg())
    assert (got[0] if got else None) == reason


def test_choices_are_recorded_reproducible_and_prefix_stable():
    lists = generator.load_lists("gin/data/textbook_topics.json", {"topics": dict, "audiences": list, "styles": list})
    a = [textbook.choose(cfg(seed=3), lists, i) for i in range(50)]
    assert a == [textbook.choose(cfg(seed=3), lists, i) for i in range(50)]
    assert a != [textbook.choose(cfg(seed=4), lists, i) for i in range(50)]
    assert len({(c["topic"], c["subtopic"], c["audience"], c["style"]) for c in a}) > 40  # diverse
    for c in a:
        assert c["subtopic"] in lists["topics"][c["topic"]]
    small = textbook.build_requests(cfg(seed=3, n_samples=5), "m")
    big = textbook.build_requests(cfg(seed=3, n_samples=8), "m")
    assert [r.key for r in small] == [r.key for r in big[:5]]  # more samples extend, never change
    assert all(r.meta == dict(c, seed=3) for r, c in zip(small, a))
    assert a[0]["subtopic"] in small[0].messages[-1]["content"]


def test_bad_templates_and_lists_are_named(tmp_path):
    t = tmp_path / "t.txt"
    t.write_text("Write about {topic} for {reader}.")
    with pytest.raises(generator.GeneratorError, match=r"t.txt: unknown placeholder\(s\) \['reader'\]"):
        textbook.build_requests(cfg(prompt_template_file=str(t)), "m")
    lists = tmp_path / "l.json"
    lists.write_text(json.dumps({"topics": {"A": []}, "audiences": ["x"], "styles": ["y"]}))
    with pytest.raises(generator.GeneratorError, match="l.json: 'topics' entry 'A'"):
        textbook.build_requests(cfg(lists_file=str(lists)), "m")
    with pytest.raises(generator.GeneratorError, match="file not found: 'nope.json'"):
        textbook.build_requests(cfg(lists_file="nope.json"), "m")


def test_minhash_estimates_jaccard_and_finds_near_duplicates():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    hasher = minhash.MinHasher(256, seed=1)
    errs = []
    for _ in range(30):
        x = [rng.choice(words) for _ in range(120)]
        y = list(x)
        for _ in range(rng.randrange(60)):
            y[rng.randrange(120)] = rng.choice(words)
        a, b = " ".join(x), " ".join(y)
        exact = minhash.jaccard(minhash.shingles(a), minhash.shingles(b))
        errs.append(abs(exact - minhash.estimate_jaccard(hasher.signature(a), hasher.signature(b))))
    assert max(errs) < 0.12 and sum(errs) / len(errs) < 0.04
    base = " ".join(rng.choice(words) for _ in range(200))
    f = minhash.NearDupFilter(threshold=0.8, seed=0)
    assert f.add("a", base) is None
    assert f.add("b", " ".join(rng.choice(words) for _ in range(200))) is None
    assert f.add("c", base.replace(base.split()[100], "zzz", 1))[0] == "a"
    assert f.add("d", base.upper())[0] == "a"  # case-insensitive tokens
    assert len(f) == 2
    # Same seed, same decisions: signatures are stable across processes (no hash()).
    assert minhash.MinHasher(8, seed=5).signature("a b c d e f").tolist() == \
        minhash.MinHasher(8, seed=5).signature("a b c d e f").tolist()
    with pytest.raises(ValueError, match="threshold"):
        minhash.NearDupFilter(threshold=1.5)


def cli(out, server, n, extra=()):
    args = [sys.executable, "-m", "data_gen.textbook", "--gin_file=gin/data/textbook.gin", f"--out_dir={out}",
            f"--n_samples={n}", "--gin_param=data_gen.EngineConfig.model = 'fake-textbook'",
            "--gin_param=data_gen.EngineConfig.prices = {'fake-textbook': {'input': 0.5, 'output': 1.5}}",
            "--gin_param=data_gen.EngineConfig.concurrency = 4",
            "--gin_param=data_gen.EngineConfig.rpm = None", "--gin_param=data_gen.EngineConfig.tpm = None",
            "--gin_param=data_gen.TextbookConfig.min_chars = 400", *extra]
    env = dict(os.environ, OPENAI_API_KEY=KEY, OPENAI_BASE_URL=server.base_url, PYTHONUNBUFFERED="1")
    return args, env


@pytest.mark.slow
def test_cli_killed_mid_run_resumes_without_resending(tmp_path):
    n = 40
    out = tmp_path / "tb"
    responses = out / ledger_lib.RESPONSES_FILE
    with FakeOpenAIServer(latency=(0.05, 0.15)) as server:
        args, env = cli(out, server, n)
        with open(tmp_path / "log1", "wb") as log1:
            p = subprocess.Popen(args, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and p.poll() is None:
                if responses.exists() and responses.read_bytes().count(b"\n") >= 12:
                    break
                time.sleep(0.02)
            assert p.poll() is None, (tmp_path / "log1").read_text()
            p.send_signal(signal.SIGKILL)
            p.wait()
        done_at_kill = {r["response_id"].split("-")[1] for r in ledger_lib.iter_results(responses)}
        assert 12 <= len(done_at_kill) < n
        before = server.stats()["by_body"]

        r2 = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert r2.returncode == 0, r2.stderr[-3000:]
        after = server.stats()["by_body"]

    # Nothing completed was requested again; only what was in flight at the kill was resent.
    assert all(after[h] == before[h] for h in done_at_kill)
    assert len(after) == n and all(c <= 2 for c in after.values())
    # Nothing lost, nothing twice, no torn line; the ledger agrees with the output.
    lines = responses.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == n
    recs = [json.loads(x) for x in lines[:-1]]
    assert sorted(r["sample_index"] for r in recs) == list(range(n))
    led = ledger_lib.Ledger(out / ledger_lib.LEDGER_FILE)
    assert led.state_counts() == {"done": n}
    assert led.spent() == pytest.approx(sum(r["cost_usd"] for r in recs))
    led.close()

    # Validated shards + rejects with reasons; choices recorded per sample.
    stats = json.loads((out / generator.STATS_FILE).read_text())
    shard_recs = [json.loads(x) for p in sorted((out / "shards").glob("textbook-*.jsonl"))
                  for x in p.read_text().splitlines()]
    rejects = [json.loads(x) for x in (out / generator.REJECTS_FILE).read_text().splitlines()]
    assert len(shard_recs) == stats["n_accepted"] and len(shard_recs) + len(rejects) == n
    assert {"refusal", "code_syntax_error", "near_duplicate"} <= {r["reason"] for r in rejects}
    lists = generator.load_lists("gin/data/textbook_topics.json", {"topics": dict, "audiences": list, "styles": list})
    for rec in shard_recs:
        assert textbook.validate(rec["text"], cfg(min_chars=400)) is None
        want = textbook.choose(cfg(seed=0), lists, rec["sample_index"])
        assert {k: rec[k] for k in want} == want
    # The key is in no file and no log line.
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in (tmp_path / "log1").read_text() + r2.stdout + r2.stderr
    # Finalizing again gives byte-identical shards (deterministic in the results).
    first = (out / "shards" / "textbook-00000-of-00001.jsonl").read_bytes()
    try:
        assert textbook.main(["--gin_file=gin/data/textbook.gin", f"--out_dir={out}", f"--n_samples={n}",
                              "--gin_param=data_gen.EngineConfig.model = 'fake-textbook'",
                              "--gin_param=data_gen.TextbookConfig.min_chars = 400", "--finalize_only"]) == 0
    finally:
        gin.clear_config()  # unlock: later tests register configurables
    assert (out / "shards" / "textbook-00000-of-00001.jsonl").read_bytes() == first

    # The data layer's record check (what its TFDS textbook builder applies to each line) keeps every record.
    from phijax.data import records
    report = records.ReadReport()
    got = [r["text"] for p in sorted((out / "shards").glob("*.jsonl"))
           for r in records.iter_jsonl(p, report, required=("text",))]
    assert got == [r["text"] for r in shard_recs] and report.n_skipped == 0
