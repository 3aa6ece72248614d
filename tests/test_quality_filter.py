"""data_gen.filter and the whole quality-filter chain (data_gen.quality_filter): the filter keeps exactly
score >= threshold with exact token counts, stages resume, a chain SIGKILLed mid-stage finishes with
identical shards, bad input exits 2 before any work, and (slow) the stdlib chain's output trains
through the SeqIO CodeTextbook task."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gin
from data_gen import classifier as cls
from data_gen import dedup, ingest
from data_gen import filter as flt
from data_gen import heuristic_annotator as ha
from data_gen import quality_filter as qf
from phijax.data import benchmarks
from phijax.data import vocab as vocab_lib

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("apple river stone cloud number letter window garden market signal bridge engine planet forest circle "
         "square triangle vector matrix record ledger basket ticket sensor charge orbit harbor lantern meadow "
         "pencil rocket saddle thunder velvet walnut yellow zebra anchor bucket candle dragon falcon").split()


def _sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


_STATEMENTS = (  # bodies are random mixes of these: nothing like a benchmark solution's shape
    '{v} = {a}.get("{w}", {n})',
    "{v} = [{w}_x * {n} for {w}_x in {a} if {w}_x]",
    "while {v} > {n}:\n        {v} -= {n}",
    "try:\n        {v} = int({a})\n    except ValueError:\n        {v} = {n}",
    '{v} = "{w} {w2}".split()',
    'print(f"{w}: {{{v}}}")',
    "{v} = sorted({a}, key=len, reverse={b})",
    "with open({a}) as {w}_file:\n        {v} = {w}_file.read().strip()",
)


def _body(rng, names, n_statements, comments):
    lines = []
    for _ in range(n_statements):
        if comments:
            lines.append(f"    # {_sentence(rng, 6)}")
        v, a, w, w2 = (rng.choice(names) for _ in range(4))
        lines.append("    " + rng.choice(_STATEMENTS).format(v=v, a=a, w=w, w2=w2, n=rng.randint(2, 99),
                                                               b=rng.choice(["True", "False"])))
    return "\n".join(lines) + f"\n    return {rng.choice(names)}\n"


def _good(rng, i):  # documented functions, readable names: the heuristic scores ~0.9
    parts = [f'"""{_sentence(rng)}\n\n{_sentence(rng, 12)}\n"""\n']
    for k in range(rng.randint(3, 5)):
        a, b, c = rng.sample(WORDS, 3)
        parts.append(f'\n\ndef {a}_{b}_{i}_{k}({c}_values, {b}_limit):\n    """{_sentence(rng)}\n\n'
                     f'    {_sentence(rng, 10)}\n    """\n'
                     + _body(rng, [f"{w}_{c}" for w in rng.sample(WORDS, 4)], rng.randint(6, 9), True))
    return "".join(parts)


def _bad(rng, i):  # a data table and terse code: ~0.05
    rows = [", ".join(str(rng.randint(0, 99999)) for _ in range(10)) for _ in range(rng.randint(8, 20))]
    return f"T{i} = [\n    " + ",\n    ".join(rows) + f"]\nx{i} = T{i}[0]\ny = [q for q in T{i} if q % {i + 2}]\n"


def _mixed(rng, i):  # in between: some docstrings and comments, terse names, maybe a table
    parts = []
    for k in range(rng.randint(1, 4)):
        doc = f'    """{_sentence(rng)}"""\n' if rng.random() < 0.5 else ""
        name = f"{rng.choice(WORDS)}_{k}" if rng.random() < 0.5 else f"f{k}"
        parts.append(f"def {name}_{i}(x, n):\n{doc}" + _body(rng, ["x", "n", "t", "v"], rng.randint(6, 8),
                                                               rng.random() < 0.4) + "\n\n")
    if rng.random() < 0.5:
        parts.append(f"D{i} = [" + ", ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(10, 60))) + "]\n")
    return "".join(parts)


def make_source(root: Path, seed: int = 0) -> Path:
    """61 small Python files of graded quality, one an exact duplicate."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for kind, fn, n in (("good", _good, 20), ("bad", _bad, 16), ("mid", _mixed, 24)):
        for i in range(n):
            (root / f"{kind}_{i:03d}.py").write_text(fn(rng, i))
    (root / "zz_dup.py").write_text((root / "good_000.py").read_text())
    return root


def _read_shards(d: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(d.glob("*.jsonl")) for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A dir source, a small BPE (fast to train) for token counts, extra textbook / exercises shards
    (the exercises one plants HumanEval/0), and ingest -> dedup -> classifier outputs for the filter."""
    d = tmp_path_factory.mktemp("qf")
    src = make_source(d / "src")
    texts = [p.read_text() for p in sorted(src.iterdir())]
    tok = vocab_lib.train_bpe(texts, 512, d / "tokenizer.json")
    he0 = benchmarks.load_humaneval()[0]
    (d / "exercises.jsonl").write_text(
        json.dumps({"prompt": he0["prompt"], "solution": he0["canonical_solution"]}) + "\n"
        + json.dumps({"prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n", "solution": "    return a + b\n"})
        + "\n")
    (d / "book").mkdir()
    # Five lessons, then (decontamination must neither crash nor reject the file): a lesson whose function
    # chains 900 `+` terms, one whose code nests past the parser's limit, and a blank line.
    deep = [" + ".join(["x"] * 900), "(" * 300 + "x" + ")" * 300]
    (d / "book" / "textbook-00000.jsonl").write_text("".join(
        json.dumps({"text": f"# Lesson {i}\n\nA loop visits each item of a list in turn ({WORDS[i]}).\n"}) + "\n"
        for i in range(5)) + "".join(json.dumps({"text": f"# Deep\n\n```python\ndef f(x):\n    return {e}\n```\n"})
                                     + "\n" for e in deep) + "\n")
    ingest.run(f"dir:{src}", d / "ingest")
    dedup.run([str(d / "ingest" / "shards")], d / "dedup")
    recs = _read_shards(d / "dedup" / "shards")
    cls.train([r["text"] for r in recs], [ha.heuristic_score(r["text"]) for r in recs], dict(cls.DEFAULT_TEXT_SETTINGS),
              d / "classifier", annotator="heuristic", n_estimators=25)
    return {"dir": d, "src": src, "tok": str(tok), "dedup": d / "dedup" / "shards", "clf": d / "classifier",
            "records": recs}


# --- filter -----------------------------------------------------------------------------------
def test_filter_keeps_exactly_score_ge_threshold_with_exact_token_counts(env, tmp_path):
    recs, tok = env["records"], vocab_lib.BPETokenizer(env["tok"])
    qc = cls.QualityClassifier(env["clf"])
    scores = qc.score([r["text"] for r in recs]).tolist()  # one batch; the filter scores chunks of 7
    cfg = flt.FilterConfig(chunk=7, shard_size=16, tokenizer=env["tok"])
    for thr, out in ((None, tmp_path / "a"), (0.9, tmp_path / "b")):
        t = qc.threshold if thr is None else thr
        r = flt.run([str(env["dedup"])], out, env["clf"], dataclasses.replace(cfg, threshold=thr))
        got = _read_shards(out / "shards")
        want = [(rec, s) for rec, s in zip(recs, scores) if s >= t]
        assert 0 < len(want) < len(recs), "the fixture must have documents on both sides"
        assert [{k: v for k, v in g.items() if k != "quality_score"} for g in got] == [w for w, _ in want]
        assert [g["quality_score"] for g in got] == [s for _, s in want]  # exact: the stored score decides
        assert len(list((out / "shards").glob("filtered-*.jsonl"))) == math.ceil(len(want) / 16)
        assert (r["docs_in"], r["docs_out"], r["threshold"]) == (len(recs), len(want), t)
        assert r["tokens_in"] == sum(len(tok.encode(x["text"])) for x in recs)
        assert r["tokens_out"] == sum(len(tok.encode(w["text"])) for w, _ in want)
        assert sum(r["histogram"]["counts"]) == len(recs) and r["tokenizer"]["fingerprint"] == tok.fingerprint
        assert (out / flt.HISTOGRAM_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["threshold_source"] == "given"
    # Resume: same inputs and options -> skipped, shards untouched; another threshold -> redone.
    mtime = (tmp_path / "a" / "shards" / "filtered-00000.jsonl").stat().st_mtime_ns
    again = flt.run([str(env["dedup"])], tmp_path / "a", env["clf"], cfg)
    assert again["resumed"] and (tmp_path / "a" / "shards" / "filtered-00000.jsonl").stat().st_mtime_ns == mtime
    assert not flt.run([str(env["dedup"])], tmp_path / "a", env["clf"],
                       dataclasses.replace(cfg, threshold=0.5))["resumed"]


def test_filter_cli_bad_input_exits_2_before_writing(env, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--inputs", str(env["dedup"]), "--out_dir", str(out), "--tokenizer", env["tok"]]
    cases = [
        (["--classifier", str(tmp_path / "nope"), *base], "classifier dir"),
        (["--classifier", str(env["dedup"]), *base], "not a trained classifier"),
        (["--classifier", str(env["clf"]), "--inputs", str(tmp_path / "none.jsonl"), "--out_dir", str(out)],
         "matches no JSONL"),
        (["--classifier", str(env["clf"]), *base, "--threshold", "1.5"], "threshold must be in [0, 1]"),
        (["--classifier", str(env["clf"]), *base, "--tokenizer", str(tmp_path / "t.json")], "tokenizer"),
        (["--classifier", str(env["clf"]), *base, "--gin_param", "data_gen.FilterConfig.no_such = 1"], "no_such"),
    ]
    try:
        for argv, msg in cases:
            assert flt.main(argv) == 2, argv
            assert msg in capsys.readouterr().err, argv
            assert not out.exists()
    finally:
        gin.clear_config()
    try:  # a binding on top of gin/data/filter.gin
        assert flt.main(["--classifier", str(env["clf"]), *base, "--gin_param", "data_gen.FilterConfig.shard_size = 5"]) == 0
    finally:
        gin.clear_config()
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["docs_in"] == len(env["records"])
    assert len(list((out / "shards").glob("*.jsonl"))) == math.ceil(res["docs_out"] / 5)


# --- the chain -------------------------------------------------------------------------------
def _chain_args(env, out: Path) -> list[str]:
    return ["--source", f"dir:{env['src']}", "--out_dir", str(out), "--tokenizer", env["tok"],
            "--extra_shards", str(env["dir"] / "book"), str(env["dir"] / "exercises.jsonl"),
            "--gin_param", "data_gen.ClassifierStage.n_estimators = 25", "--gin_param", "data_gen.FilterConfig.chunk = 4"]


def _subprocess(args, **kw):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):  # the offline default: the heuristic annotator
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "data_gen.quality_filter", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _outputs(out: Path) -> dict[str, bytes]:
    """Every shard the chain wrote (all stages), relative path -> bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jsonl"))
            if "shards" in p.parts or "clean" in p.parts}


@pytest.fixture(scope="module")
def chain_ref(env, tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("chain") / "ref"
    try:
        assert qf.main(_chain_args(env, out)) == 0
    finally:
        gin.clear_config()
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        mp.delenv(k, raising=False)
    yield mp
    mp.undo()


def test_chain_report_and_resume_skip(env, chain_ref, capsys):
    r = json.loads((chain_ref / qf.REPORT_JSON).read_text())
    rows = {row["stage"]: row for row in r["stages"]}
    assert list(rows) == list(qf.STAGES)
    # Documents flow stage to stage; the annotated sample is the classifier's input.
    assert rows["dedup"]["docs_in"] == rows["ingest"]["docs_out"] == 61
    assert rows["dedup"]["docs_out"] == r["dedup"]["kept"] == 60
    assert rows["annotate"]["docs_in"] == rows["filter"]["docs_in"] == rows["dedup"]["docs_out"]
    assert rows["classifier"]["docs_in"] == rows["annotate"]["docs_out"]
    assert rows["decontaminate"]["docs_in"] == rows["filter"]["docs_out"]
    dup_tokens = len(vocab_lib.BPETokenizer(env["tok"]).encode((env["src"] / "zz_dup.py").read_text()))
    assert (r["dedup"]["exact_removed"], r["dedup"]["near_removed"]) == (1, 0)  # zz_dup.py
    assert rows["dedup"]["tokens_in"] == rows["ingest"]["tokens_out"] == rows["filter"]["tokens_in"] + dup_tokens
    final = _read_shards(chain_ref / "decontaminate" / "clean")
    assert len(final) == rows["decontaminate"]["docs_out"] == r["dataset"]["docs"]
    assert all(x["quality_score"] >= r["filter"]["threshold"] for x in final)
    for row in r["stages"]:
        assert row["seconds"] >= 0 and not row["resumed"]
    assert r["annotate"]["annotator"] == "heuristic" and r["annotate"]["heuristic"]
    assert 0 < r["classifier"]["f1"] <= 1 and r["classifier"]["threshold"] == r["filter"]["threshold"]
    assert set(r["decontaminate"]["filtered_code"]["ast"]) == {"0.95", "0.9", "0.85", "0.8"}
    ex = r["decontaminate"]["extra"]
    assert list(ex) == ["0-book", "1-exercises"]
    assert ex["1-exercises"]["text_field"] == "prompt+solution"
    assert (ex["1-exercises"]["docs_in"], ex["1-exercises"]["removed"], ex["1-exercises"]["docs_out"]) == (2, 1, 1)
    assert (ex["0-book"]["docs_in"], ex["0-book"]["removed"]) == (7, 0)
    assert ex["0-book"]["skipped_lines"] == {"blank_line": 1}
    assert ex["0-book"]["ast_unanalysed"] == {"parser_nesting_limit": 1}
    assert ex["1-exercises"]["ast"]["0.95"]["docs"] == 1
    tok = vocab_lib.BPETokenizer(env["tok"])
    ex_docs = [json.loads(x) for x in (env["dir"] / "exercises.jsonl").read_text().splitlines()]
    assert ex["1-exercises"]["tokens_in"] == sum(len(tok.encode(d["prompt"] + d["solution"])) for d in ex_docs)
    assert ex["1-exercises"]["tokens_out"] == len(tok.encode(ex_docs[1]["prompt"] + ex_docs[1]["solution"]))
    md = (chain_ref / qf.REPORT_MD).read_text()
    assert "HEURISTIC" in md and "| decontaminate |" in md and "score_histogram.png" in md
    # A rerun skips every stage and says so; the shards are untouched.
    before = {p: p.stat().st_mtime_ns for p in chain_ref.rglob("*.jsonl")}
    try:
        assert qf.main(_chain_args(env, chain_ref)) == 0
    finally:
        gin.clear_config()
    assert capsys.readouterr().out.count("skipped (complete)") == len(qf.STAGES)
    assert all(row["resumed"] for row in json.loads((chain_ref / qf.REPORT_JSON).read_text())["stages"])
    assert before == {p: p.stat().st_mtime_ns for p in chain_ref.rglob("*.jsonl")}


def _stack_and_so_sources(src: Path, d: Path) -> dict[str, str]:
    """The same documents as a Stack-style JSONL shard (plus one GPL file) and as a StackOverflow
    Posts.xml (each one the accepted answer of a python question)."""
    from xml.sax.saxutils import quoteattr
    files = sorted(src.iterdir())
    rows = [{"content": p.read_text(), "max_stars_repo_path": p.name, "max_stars_repo_licenses": ["MIT"]}
            for p in files] + [{"content": "def gpl():\n    return 1\n", "path": "g.py", "license": "GPL-3.0"}]
    (d / "stack").mkdir()
    (d / "stack" / "stack-000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    posts = ['<?xml version="1.0" encoding="utf-8"?>', "<posts>"]
    for i, p in enumerate(files):
        q, a = 2 * i + 1, 2 * i + 2
        code = p.read_text().replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        posts += [f'<row Id="{q}" PostTypeId="1" AcceptedAnswerId="{a}" Score="1" Title={quoteattr(p.stem)} '
                  f'Body={quoteattr("<p>How?</p>")} Tags={quoteattr("<python>")} />',
                  f'<row Id="{a}" PostTypeId="2" ParentId="{q}" Score="1" '
                  f'Body={quoteattr("<pre><code>" + code + "</code></pre>")} />']
    (d / "Posts.xml").write_text("\n".join(posts + ["</posts>"]) + "\n", encoding="utf-8")
    return {"stack": f"jsonl:{d / 'stack'}/*.jsonl", "stackoverflow": f"stackoverflow:{d / 'Posts.xml'}"}


@pytest.mark.parametrize("kind", ["stack", "stackoverflow"])
def test_chain_runs_on_stack_and_stackoverflow_fixtures(env, tmp_path, kind):
    source = _stack_and_so_sources(env["src"], tmp_path)[kind]
    args = _chain_args(env, tmp_path / "qf")
    args[args.index("--source") + 1] = source
    try:
        assert qf.main(args) == 0
    finally:
        gin.clear_config()
    r = json.loads((tmp_path / "qf" / qf.REPORT_JSON).read_text())
    rows = {row["stage"]: row for row in r["stages"]}
    ing = json.loads((tmp_path / "qf" / "ingest" / "ingest_report.json").read_text())
    assert rows["ingest"]["docs_out"] == 61 and ing["skipped"] == ({"license_not_allowed": 1} if kind == "stack" else {})
    # zz_dup.py: an exact copy as a file; as a post its title (the file name) differs: a near copy
    assert (r["dedup"]["exact_removed"], r["dedup"]["near_removed"]) == ((1, 0) if kind == "stack" else (0, 1))
    final = _read_shards(tmp_path / "qf" / "decontaminate" / "clean")
    assert 0 < len(final) == r["dataset"]["docs"] < 60
    assert {x["source"] for x in final} == {"jsonl" if kind == "stack" else "stackoverflow"}


def test_chain_sigkilled_mid_stage_resumes_to_identical_shards(env, chain_ref, tmp_path):
    out = tmp_path / "killed"
    p = _subprocess(_chain_args(env, out))
    tmp = out / ".decontaminate.tmp"  # exists only while decontamination runs
    deadline = time.time() + 120
    while not tmp.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert tmp.exists() and not (out / "decontaminate" / ingest.MARKER_FILE).exists(), "not killed mid-stage"
    assert (out / "filter" / ingest.MARKER_FILE).exists()
    p = _subprocess(_chain_args(env, out))
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    assert stdout.count("skipped (complete)") == len(qf.STAGES) - 1 and "decontaminate: ran" in stdout
    assert not tmp.exists()
    assert _outputs(out) == _outputs(chain_ref)


def test_chain_bad_input_exits_2_before_any_stage(env, tmp_path, capsys):
    out = tmp_path / "out"
    ok = ["--source", f"dir:{env['src']}", "--out_dir", str(out), "--tokenizer", env["tok"]]
    cases = [
        (["--source", f"dir:{tmp_path / 'nope'}", "--out_dir", str(out)], "is not a directory"),
        ([*ok, "--threshold", "-0.1"], "threshold must be in [0, 1]"),
        ([*ok, "--gin_param", "data_gen.ClassifierStage.no_such_option = 3"], "no_such_option"),
        ([*ok, "--gin_param", "data_gen.DecontamStage.taus = [1.5]"], "taus"),
        ([*ok, "--gin_param", "data_gen.DecontamStage.embed = 'bert'"], "DecontamStage.embed"),
        ([*ok, "--features", f"model:{tmp_path / 'nope'}"], "not a model directory"),
        ([*ok, "--annotator", "gpt5"], "annotator must be one of"),
        ([*ok, "--extra_shards", str(tmp_path / "missing.jsonl")], "matches no JSONL"),
        (["--source", "stdlib"], "OUT_DIR"),
        ([*ok, "--gin_file", str(tmp_path / "nope.gin")], "gin file not found"),
    ]
    try:
        for argv, msg in cases:
            assert qf.main(argv) == 2, argv
            assert msg in capsys.readouterr().err, argv
            assert not out.exists(), argv
    finally:
        gin.clear_config()


# --- offline default: the stdlib chain trains through SeqIO -----------------------------------
@pytest.mark.slow
def test_stdlib_chain_output_trains_through_the_codetextbook_task(tmp_path, monkeypatch):
    import seqio

    import phijax.tasks
    from phijax.data import seqio_tasks as data_tasks

    for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):  # the offline default: no endpoint
        monkeypatch.delenv(k, raising=False)
    out, cache = tmp_path / "qf", tmp_path / "cache"
    try:
        assert qf.main(["--source", "stdlib", "--out_dir", str(out), "--limit", "100"]) == 0
    finally:
        gin.clear_config()
    r = json.loads((out / qf.REPORT_JSON).read_text())
    final = out / "decontaminate" / "clean"
    docs, tokens = r["dataset"]["docs"], r["dataset"]["tokens"]
    assert docs == len(_read_shards(final)) and 0 < docs < 100
    assert r["annotate"]["annotator"] == "heuristic" and r["classifier"]["features"] == "text"
    tok = r["filter"]["tokenizer"]["path"]  # the stdlib BPE the counts used (cached; not retrained here)
    train = subprocess.run(
        [sys.executable, "-m", "phijax.train", "--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin",
         "--gin_file=gin/data/codetextbook.gin", *[f"--gin_param={b}" for b in (
             "phijax.PhiConfig.d_model = 64", "phijax.PhiConfig.n_layers = 2", "phijax.PhiConfig.n_heads = 4",
             "phijax.PhiConfig.head_dim = 16", "phijax.PhiConfig.rotary_dim = 8", "phijax.PhiConfig.d_mlp = 128",
             "SEQ_LEN = 64", "BATCH_SIZE = 8", "TRAIN_STEPS = 3", "train.log_every = 1",
             "train.export_dtype = None", f"MODEL_DIR = '{tmp_path / 'model'}'",
             f"CODE_SOURCES = ['{final}']", "TEXTBOOK_SOURCES = None", f"TOKENIZER = '{tok}'",
             "phijax.tasks.register_codetextbook.content_field = 'text'",
             "phijax.tasks.register_codetextbook.name = 'qf_test'",
             f"phijax.tasks.register_codetextbook.cache_dir = '{cache}'", f"data_source.cache_dir = '{cache}'")]],
        cwd=ROOT, env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
        capture_output=True, text=True, timeout=600, check=False)
    assert train.returncode == 0, train.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    # The task the trainer read holds exactly the kept documents and their tokens (+ one EOS each).
    try:
        name = phijax.tasks.register_codetextbook("qf_test", code=[str(final)], content_field="text",
                                                  tokenizer_path=tok, cache_dir=str(cache))
        task = f"{name}_code"
        n = sum(1 for _ in seqio.get_mixture_or_task(task).source.get_dataset("train", shuffle=False))
        assert n == docs
        assert data_tasks.task_token_count(task, cache) == tokens + docs
    finally:
        for t in [t for t in seqio.TaskRegistry.names() if t.startswith("qf_test")]:
            seqio.TaskRegistry.remove(t)
            data_tasks.TASK_INFO.pop(t, None)
        if "qf_test" in seqio.MixtureRegistry.names():
            seqio.MixtureRegistry.remove("qf_test")
