"""data_gen.beam_stages: the dedup, classifier-scoring and decontamination Beam pipelines
(DirectRunner) write what the in-process stages write, on Stack-style and StackOverflow-style
fixtures and a stdlib subset; decontamination with phijax model embeddings; resume after a kill."""
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

import numpy as np
import pytest

from data_gen import beam_stages as bs
from data_gen import classifier as cls
from data_gen import decontaminate as D
from data_gen import dedup, heuristic_annotator, ingest
from phijax.data import corpus

import test_decontaminate as planted  # the planted HumanEval variants and the common-idiom docs
from test_ingest_dedup import POSTS_XML, _stack_rows

REPO = Path(__file__).resolve().parent.parent
BEAM = ["--runner=DirectRunner", "--direct_num_workers=1"]


def _jsonl(path: Path, recs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def _files(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes)."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _chain_docs(seed: int, n: int) -> list[dict]:
    """Word soup where most documents mutate an earlier one: near-duplicate chains (A~B, B~C,
    not A~C), exact copies of removed documents, records without an id."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)]
    docs: list[dict] = []
    for i in range(n):
        if docs and rng.random() < 0.6:
            toks = rng.choice(docs)["text"].split()
            for _ in range(rng.randint(0, 6)):
                toks[rng.randrange(len(toks))] = rng.choice(words)
            text = " ".join(toks)
        else:
            text = " ".join(rng.choice(words) for _ in range(30))
        docs.append({"id": f"w{i}" if rng.random() < 0.9 else "", "text": text})
    return docs


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Ingested Stack-style (gz JSONL, forks and near-forks of stdlib files) and StackOverflow
    shards, a stdlib shard and a near-duplicate-chain shard, each under its own file name."""
    root = tmp_path_factory.mktemp("fx")
    stdlib = list(corpus.iter_stdlib_documents())[::25][:60]
    rows = _stack_rows()
    for k, (rel, text) in enumerate(stdlib[:24]):
        rows.append({"content": text, "max_stars_repo_path": rel, "max_stars_repo_name": f"org/r{k}",
                     "max_stars_repo_licenses": ["MIT"]})
        if k % 4 == 0:  # a fork: the same file in another repo, with CRLF line ends
            rows.append({"content": text.replace("\n", "\r\n"), "max_stars_repo_path": rel,
                         "max_stars_repo_name": f"fork/r{k}", "max_stars_repo_licenses": ["MIT"]})
        if k % 4 == 1:  # a near-fork: two lines edited
            lines = text.split("\n")
            rows.append({"content": "\n".join(["# vendored copy", *lines[1:-2]]), "max_stars_repo_path": rel,
                         "max_stars_repo_name": f"vendor/r{k}", "max_stars_repo_licenses": ["apache-2.0"]})
    raw = root / "raw" / "stack-000.jsonl.gz"
    raw.parent.mkdir()
    with gzip.open(raw, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (root / "raw" / "Posts.xml").write_text(POSTS_XML, encoding="utf-8")
    ingest.run(f"jsonl:{raw}", root / "stack_ing", ingest.IngestConfig(max_bytes=1 << 20))
    ingest.run(f"stackoverflow:{root / 'raw' / 'Posts.xml'}", root / "so_ing")
    out = {"stack": root / "stack.jsonl", "so": root / "so.jsonl"}
    out["stack"].write_bytes((root / "stack_ing" / "shards" / "ingest-00000.jsonl").read_bytes())
    out["so"].write_bytes((root / "so_ing" / "shards" / "ingest-00000.jsonl").read_bytes())
    out["stdlib"] = _jsonl(root / "stdlib.jsonl", [{"id": r, "text": t} for r, t in stdlib[20:]])
    chains = root / "chains.jsonl"
    _jsonl(chains, _chain_docs(3, 200))
    with open(chains, "a") as f:
        f.write("not json\n" + json.dumps({"id": "x", "text": "   "}) + "\n")  # counted as unreadable
    out["chains"] = chains
    out["empty"] = _jsonl(root / "empty.jsonl", [])
    return out


def test_resolve_near_and_plan_shards_units():
    # A~B and B~C but not A~C: B goes (A is kept), so C stays, as the sequential filter decides.
    edges = [((0, 1), (0, 2), 0.9, "A", "B", 0), ((0, 2), (0, 3), 0.85, "B", "C", 1),
             ((0, 1), (0, 4), 0.8, "A", "D", 2), ((0, 3), (0, 4), 0.8, "C", "D", 0)]
    got = dict(bs.resolve_near(edges))
    assert sorted(got) == [(0, 2), (0, 4)]
    assert bs.best_kept(got[(0, 4)][1], (0, 4)) == ("C", 0.8)  # a tie: C meets D in an earlier band
    assert bs.best_kept(got[(0, 2)][1], (0, 9)) == ("A", 0.9)  # a later copy of B sees C too, A is closer
    assert bs.plan_shards({0: 3, 2: 4}, 3, 2) == [[(0, 0, 2)], [(0, 2, 3), (2, 0, 1)], [(2, 1, 3)], [(2, 3, 4)]]
    assert bs.plan_shards({}, 2, 5) == []


def test_dedup_equals_sequential(fixtures, tmp_path):
    inputs = [str(fixtures[k]) for k in ("stack", "so", "chains", "empty", "stdlib")]
    cfg = dedup.DedupConfig(threshold=0.7, num_perm=64, ngram=3, shard_size=7)
    seq = dedup.run(inputs, tmp_path / "seq", cfg)
    beam = bs.run_dedup(inputs, tmp_path / "beam", cfg, BEAM)
    assert beam.pop("runner") == "DirectRunner" and beam.pop("seconds") > 0
    assert beam == seq  # kept/removed counts, the removed -> kept samples, unreadable lines, fingerprint
    assert seq["exact_removed"] >= 10 and seq["near_removed"] >= 10 and len(seq["pairs_sample"]) == 50
    assert seq["unreadable"]["skipped"]["invalid_json"] == 1 and seq["unreadable"]["skipped"]["empty_text"] >= 1
    assert _files(tmp_path / "beam" / "shards") == _files(tmp_path / "seq" / "shards")
    assert len(seq["shards"]) > 10  # output shards cross input-file boundaries
    assert sorted(p.name for p in (tmp_path / "beam").iterdir()) == ["_COMPLETE", "dedup_report.json", "shards"]
    # Resumable: same inputs and options -> the stored report; the fingerprint is the in-process
    # stage's, so a complete in-process output is not redone either.
    assert bs.run_dedup(inputs, tmp_path / "beam", cfg, BEAM)["resumed"] is True
    assert bs.run_dedup(inputs, tmp_path / "seq", cfg, BEAM)["resumed"] is True


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A random nano phijax model with a BPE tokenizer, exported. Parameters are drawn with numpy
    into ``model.abstract``'s shapes (seconds faster than an eager ``model.init``)."""
    import jax

    from phijax import checkpoint, config
    from phijax import model as model_lib
    from phijax.data import vocab

    d = tmp_path_factory.mktemp("tiny")
    vocab.train_bpe([Path(json.__file__).read_text(), Path(os.__file__).read_text()], 512, d / "tokenizer.json")
    cfg = config.preset("nano", vocab_size=512, max_len=128)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        return (rng.standard_normal(leaf.shape) * 0.02).astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, model_lib.abstract(cfg)[1])
    checkpoint.export_params(params, str(d / "export"), config=cfg.to_dict(), tokenizer_path=str(d / "tokenizer.json"))
    return d / "export"


@pytest.fixture(scope="module")
def text_classifier(fixtures, tmp_path_factory):
    recs = cls.read_records([fixtures["stdlib"]])
    texts = [r["text"] for r in recs]
    out = tmp_path_factory.mktemp("clf")
    cls.train(texts, [heuristic_annotator.heuristic_score(t) for t in texts], dict(cls.DEFAULT_TEXT_SETTINGS),
              out, annotator="heuristic", n_estimators=20, test_fraction=0.3)
    return out


def test_score_equals_score_files(fixtures, text_classifier, tmp_path):
    inputs = [fixtures[k] for k in ("stack", "so", "stdlib")]
    seq = cls.score_files(text_classifier, inputs, tmp_path / "seq")
    beam = bs.run_score(text_classifier, [str(p) for p in inputs], tmp_path / "beam", batch=(3, 8),
                        pipeline_args=BEAM)
    assert beam.pop("resumed") is False and beam == seq
    want = _files(tmp_path / "seq")
    got = _files(tmp_path / "beam")
    assert got.pop("_COMPLETE") and got == want  # scored shards, histogram PNG and summary, byte for byte
    assert seq["documents"] == sum(len(p.read_text().splitlines()) for p in inputs) > 50
    assert bs.run_score(text_classifier, [str(p) for p in inputs], tmp_path / "beam")["resumed"] is True


def test_decontaminate_equals_run(fixtures, tmp_path):
    docs = [planted.RENAMED, planted.IDIOMS, planted.REFORMATTED, planted.IDIOMS2, planted.PARAPHRASED]
    ex = _jsonl(tmp_path / "in" / "exercises.jsonl", [{"id": i, "text": t} for i, t in enumerate(docs)])
    # Stack-style: the small documents only (AST matching of whole stdlib files is the slow part).
    stack = _jsonl(tmp_path / "in" / "stack.jsonl", [r for r in map(json.loads, fixtures["stack"].open())
                                                      if len(r["text"]) < 3000][:6])
    # Deep nesting (analysed; beyond the parser: counted, still n-gram checked) and bad lines (skipped, counted).
    deep = _jsonl(tmp_path / "in" / "deep.jsonl", [{"text": t} for t in [
        *planted.DEEP.values(), planted.TOO_DEEP["parentheses"] + planted.HE0]])
    with open(deep, "a") as f:
        f.write("\nnot json\n")
    inputs = [str(ex), str(stack), str(fixtures["so"]), str(fixtures["empty"]), str(deep)]
    kw = dict(mbpp_split="prompt", taus=[0.95, 0.9, 0.85, 0.8])
    seq = D.run(inputs, "text", tmp_path / "seq", **kw)
    beam = bs.run_decontaminate(inputs, "text", tmp_path / "beam", **kw, batch=(2, 5), pipeline_args=BEAM)
    assert beam.pop("seconds") >= 0 and seq.pop("seconds") >= 0
    assert beam.pop("runner") == "DirectRunner" and beam.pop("resumed") is False and beam.pop("fingerprint")
    assert beam == seq  # per-τ counts, n-gram counts, per-shard counts, options, embedding
    n_stack = len(stack.read_text().splitlines())
    assert n_stack == 6 and seq["docs"] == len(docs) + n_stack + 2 + 3
    assert seq["shards"][str(ex)] == {"docs": 5, "kept": 2, "removed": 3, "skipped_lines": {}}
    assert seq["shards"][str(deep)] == {"docs": 3, "kept": 2, "removed": 1,
                                        "skipped_lines": {"blank_line": 1, "invalid_json": 1}}
    assert seq["ast_unanalysed"] == {"parser_nesting_limit": 1}
    assert [json.loads(l)["id"] for l in (tmp_path / "beam" / "clean" / "exercises.jsonl").open()] == [1, 3]
    want, got = _files(tmp_path / "seq"), _files(tmp_path / "beam")
    for f in ("report.json", "_COMPLETE"):
        got.pop(f)
        want.pop(f, None)
    assert got == want  # clean shards (the empty one too), flagged.jsonl, report.md
    assert bs.run_decontaminate(inputs, "text", tmp_path / "beam", **kw)["resumed"] is True
    assert bs.run_decontaminate(inputs, "text", tmp_path / "beam", **{**kw, "remove_tau": 0.95},
                                pipeline_args=BEAM)["resumed"] is False  # other options: redone


def test_model_embeddings_in_decontamination(tiny_export, tmp_path):  # noqa: F811
    he = planted.HE
    bench = _jsonl(tmp_path / "bench.jsonl", [{"task_id": r["task_id"], "code": r["prompt"] + r["canonical_solution"]}
                                              for r in he[:6]])
    items = D.load_bench_items(False, None, [bench])
    spec = f"model:{tiny_export}"
    settings = D.embed_settings(spec, max_len=64, batch_size=8)
    dec = D.Decontaminator(items, embed=D.make_embed(settings))
    pairs = {dec.items[p.item].task_id: p for p in dec.score(planted.HE0)}
    assert pairs["HumanEval/0"].embed_l2 == pytest.approx(0.0, abs=1e-3)  # the solution itself
    texts = [planted.HE0, planted.RENAMED, planted.IDIOMS, ""]
    d1 = D.embedding_distances(texts, [it.code for it in items], D.make_embed(settings))
    d2 = D.embedding_distances(texts, [it.code for it in items], dec.embed)  # another load: same numbers
    np.testing.assert_array_equal(d1, d2)
    assert np.all(np.isfinite(d1)) and d1.shape == (4, 6) and d1[0, 0] < 1e-3
    assert d1[2].min() > 10 * d1[0, 0] and np.all(d1 <= 2.0 + 1e-9)
    assert d1[1, 0] < d1[2, 0]  # the renamed solution sits closer to it than unrelated code

    # The CLI names the model in the report; the Beam workers build the same embedding.
    shard = _jsonl(tmp_path / "in" / "docs.jsonl", [{"text": t} for t in texts[:3]])
    out = tmp_path / "seq"
    assert D.main(["--inputs", str(shard), "--out_dir", str(out), "--no_humaneval", "--mbpp_split", "none",
                   "--extra_bench", str(bench), "--embed", spec, "--embed_max_len", "64",
                   "--embed_batch_size", "8"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["embedding"] == f"model:{tiny_export.resolve()}"
    assert rep["embedding_settings"]["kind"] == "model" and rep["embedding_settings"]["max_len"] == 64
    assert f"model:{tiny_export.resolve()}" in (out / "report.md").read_text()
    beam = bs.run_decontaminate([str(shard)], "text", tmp_path / "beam", humaneval=False, mbpp_split=None,
                                extra_bench=[str(bench)], embed=settings, pipeline_args=BEAM)
    assert beam["embedding"] == rep["embedding"] and beam["embedding_settings"] == rep["embedding_settings"]
    f_seq = [json.loads(l) for l in (out / "flagged.jsonl").read_text().splitlines()]
    f_beam = [json.loads(l) for l in (tmp_path / "beam" / "flagged.jsonl").read_text().splitlines()]
    assert [{**r, "embed_l2": None} for r in f_beam] == [{**r, "embed_l2": None} for r in f_seq]
    np.testing.assert_allclose([r["embed_l2"] for r in f_beam], [r["embed_l2"] for r in f_seq], atol=2e-4)
    he0 = [r for r in f_seq if r["line"] == 1 and r["task_id"] == "HumanEval/0"]
    assert len(he0) == 1 and he0[0]["embed_l2"] < 1e-3 and he0[0]["removed"]


def test_score_with_model_features(fixtures, tiny_export, tmp_path):  # noqa: F811
    """The scoring DoFn with phijax-embedding features (batched, jit-compiled in the worker)."""
    recs = cls.read_records([fixtures["stdlib"]])
    texts = [r["text"] for r in recs]
    settings = cls.parse_features(f"model:{tiny_export}", max_len=64, batch_size=8)
    cls.train(texts, [heuristic_annotator.heuristic_score(t) for t in texts], settings, tmp_path / "clf",
              annotator="heuristic", n_estimators=10, test_fraction=0.4)
    inputs = [fixtures["so"], fixtures["stdlib"]]
    seq = cls.score_files(tmp_path / "clf", inputs, tmp_path / "seq")
    beam = bs.run_score(tmp_path / "clf", [str(p) for p in inputs], tmp_path / "beam", batch=(5, 8),
                        pipeline_args=BEAM)
    assert beam["documents"] == seq["documents"] == len(recs) + 2
    for p in inputs:  # batches differ from score_files' chunks: the same scores up to float noise
        a = [json.loads(l) for l in (tmp_path / "seq" / p.name).read_text().splitlines()]
        b = [json.loads(l) for l in (tmp_path / "beam" / p.name).read_text().splitlines()]
        assert [r["id"] for r in b] == [r["id"] for r in a]
        np.testing.assert_allclose([r["quality_score"] for r in b], [r["quality_score"] for r in a], atol=1e-3)


def test_bad_input_exits_2_before_work(fixtures, tmp_path, capsys):
    o = tmp_path / "o"
    cases = [
        (["dedup", "--inputs", str(tmp_path / "none*.jsonl"), "--out_dir", str(o)], "matches no JSONL files"),
        (["dedup", "--inputs", str(fixtures["so"]), "--out_dir", str(o), "--threshold", "1.5"], "threshold"),
        (["score", "--model", str(tmp_path), "--inputs", str(fixtures["so"]), "--out_dir", str(o)],
         "not a trained classifier"),
        (["decontaminate", "--inputs", str(fixtures["chains"]), "--out_dir", str(o), "--strict"], "invalid_json"),
        (["decontaminate", "--inputs", str(fixtures["so"]), "--out_dir", str(o), "--embed", "bert"], "--embed"),
        (["decontaminate", "--inputs", str(fixtures["so"]), "--out_dir", str(o), "--embed",
          f"model:{tmp_path / 'nomodel'}"], "not a model directory"),
        (["decontaminate", "--inputs", str(fixtures["so"]), "--out_dir", str(o), "--tau", "0.9,1.5"], "taus"),
    ]
    for argv, msg in cases:
        assert bs.main(argv + ["--", *BEAM]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert not o.exists()


@pytest.mark.slow
def test_cli_killed_run_resumes(fixtures, tmp_path, capsys):
    """SIGKILL of the CLI in mid-pipeline leaves no _COMPLETE; the rerun redoes the stage (its
    temp dir cleaned) and writes what an uninterrupted run writes."""
    inputs = [str(fixtures[k]) for k in ("stack", "chains")]
    cfg = dedup.DedupConfig(shard_size=20)
    ref = dedup.run(inputs, tmp_path / "ref", cfg)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "data_gen.beam_stages", "dedup", "--inputs", *inputs, "--out_dir", str(out),
            "--shard_size", "20", "--", *BEAM]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob(bs.TMP_PREFIX + "*")) and proc.poll() is None:
        time.sleep(0.02)  # the pipeline has written its first output file
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / ingest.MARKER_FILE).exists() and not (out / "shards").exists()
    assert bs.main(argv[3:]) == 0  # the same command, in this process
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["resumed"] is False and res["kept"] == ref["kept"] and res["near_removed"] == ref["near_removed"]
    assert _files(out / "shards") == _files(tmp_path / "ref" / "shards")
    assert not list(out.glob(bs.TMP_PREFIX + "*"))
    assert bs.run_dedup(inputs, out, cfg, BEAM)["resumed"] is True


@pytest.mark.slow
def test_stdlib_subset_dedup_and_decontaminate_equal(tmp_path):
    """Ingest a stdlib subset, then dedup -> decontaminate, each in-process and on DirectRunner:
    the same outputs (scoring a stdlib shard: test_score_equals_score_files)."""
    ing = ingest.run("stdlib", tmp_path / "ing", ingest.IngestConfig(limit=300, shard_size=120))
    shards = [str(tmp_path / "ing" / "shards" / s) for s in ing["shards"]]
    cfg = dedup.DedupConfig(shard_size=100)
    seq, beam = dedup.run(shards, tmp_path / "dd_seq", cfg), bs.run_dedup(shards, tmp_path / "dd_beam", cfg, BEAM)
    assert {k: beam[k] for k in seq} == seq and seq["exact_removed"] + seq["near_removed"] >= 2
    assert _files(tmp_path / "dd_beam" / "shards") == _files(tmp_path / "dd_seq" / "shards")
    # Decontamination is the slow stage: the first 20 kept documents.
    head = tmp_path / "dc_in" / "head.jsonl"
    head.parent.mkdir()
    head.write_text("".join((tmp_path / "dd_seq" / "shards" / "dedup-00000.jsonl").open().readlines()[:20]))
    heads = [str(head)]
    seq = D.run(heads, "text", tmp_path / "dc_seq", mbpp_split="prompt")
    beam = bs.run_decontaminate(heads, "text", tmp_path / "dc_beam", mbpp_split="prompt", pipeline_args=BEAM)
    assert {k: beam[k] for k in seq if k != "seconds"} == {k: v for k, v in seq.items() if k != "seconds"}
    for f in ("flagged.jsonl", "report.md", "clean/head.jsonl"):
        assert (tmp_path / "dc_beam" / f).read_bytes() == (tmp_path / "dc_seq" / f).read_bytes(), f
