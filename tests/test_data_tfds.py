"""phijax.data.tfds_builders: each builder from small fixtures with bad records
(counted with a reason, reported in metadata.json, never a crash), deterministic
builds, recorded versions, no silent reuse of a dataset built from other sources."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from phijax.data import benchmarks, packing, testing
from phijax.data import corpus as corpus_lib
from phijax.data import tfds_builders as tb

tfds.display_progress_bar(False)
LIMIT = 4096  # max_record_bytes in these fixtures


def examples(builder, split="train"):
    return [{k: (v.decode() if isinstance(v, bytes) else v.tolist() if hasattr(v, "tolist") else v)
             for k, v in ex.items()}
            for ex in builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()]


@pytest.fixture(scope="module")
def code_sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("code")
    corpus = testing.make_tiny_corpus(d / "repo")
    rows = [
        {"content": "def a():\n    return 1\n", "max_stars_repo_path": "a.py", "max_stars_repo_name": "o/r",
         "max_stars_repo_licenses": ["MIT"], "size": 22, "score": 0.9},
        {"content": "", "max_stars_repo_path": "empty.py", "score": 0.9},                      # empty
        {"content": None, "max_stars_repo_path": "none.py", "score": 0.9},                    # missing
        {"content": "x = '" + "y" * LIMIT + "'\n", "max_stars_repo_path": "big.py", "score": 0.9},  # too large
        {"content": "def low():\n    pass\n", "max_stars_repo_path": "low.py", "score": 0.1},  # filtered
        {"content": "class B:\n\tpass\r\n", "max_stars_repo_path": "b.py", "max_stars_repo_name": "o/s",
         "max_stars_repo_licenses": ["Apache-2.0", "MIT"], "size": 17, "score": 0.5},
    ]
    pq.write_table(pa.Table.from_pylist(rows), d / "stack-00000.parquet")
    # Binary content column: one row is not UTF-8.
    pq.write_table(pa.table({"content": pa.array([b"def c():\n    return 'c'\n", b"s = '\xe9'\n"], pa.binary()),
                             "path": ["c.py", "latin.py"], "repo": ["o/t", "o/t"], "license": ["BSD", "BSD"],
                             "score": [0.8, 0.8]}), d / "stack-00001.parquet")
    (d / "stack-00002.parquet").write_bytes(b"PAR1 this is not a parquet file")  # corrupt shard
    lines = [json.dumps({"content": "print('jsonl')\n", "path": "j.py", "repo": "o/j", "license": "MIT",
                         "score": 1.0}).encode(),
             b'{"content": "broken', b"\xff\xfe not utf8",
             json.dumps({"path": "nocontent.py", "score": 1.0}).encode()]
    with gzip.open(d / "stack-00003.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    shards = [d / "stack-00000.parquet", d / "stack-00001.parquet", d / "stack-00002.parquet",
              d / "stack-00003.jsonl.gz"]
    return corpus, shards


def test_code_corpus_from_directory(code_sources, tmp_path):
    corpus, _ = code_sources
    b = tb.prepare(tb.CodeCorpus, tmp_path, sources=[corpus], dataset_name="dir", max_record_bytes=LIMIT * 64)
    assert str(b.version) == "1.0.0" and b.data_dir.endswith("phijax_code/dir/1.0.0")
    got = examples(b)
    want = [(r, t) for r, t in corpus_lib.iter_documents(corpus) if t]
    assert [(e["path"], e["content"]) for e in got] == want  # sorted order, exact text (CRLF kept)
    rep = tb.build_report(b)
    assert rep["version"] == "1.0.0"
    assert rep["read_report"]["train"]["skipped"] == {"empty_content": 1, "non_utf8": 1}
    assert {s[0] for s in rep["skipped_samples"]["train"]} == {"nasty/empty.py", "nasty/latin1.py"}
    assert json.loads((tmp_path / "phijax_code/dir/1.0.0/metadata.json").read_text())["read_report"] == \
        rep["read_report"]  # the report is a file in the dataset directory


def test_code_corpus_from_shards_bad_records_and_quality(code_sources, tmp_path, caplog):
    _, shards = code_sources
    with caplog.at_level("WARNING", logger="phijax.data.tfds_builders"):
        b = tb.prepare(tb.CodeCorpus, tmp_path, sources=shards, dataset_name="stack", max_record_bytes=LIMIT,
                       quality_field="score", min_quality=0.5)
    got = examples(b)
    assert [e["path"] for e in got] == ["a.py", "b.py", "c.py", "j.py"]
    a, bb = got[0], got[1]
    assert (a["repo"], a["license"], a["source"]) == ("o/r", "MIT", "stack-00000.parquet")
    assert bb["license"] == "Apache-2.0,MIT" and bb["content"] == "class B:\n\tpass\r\n"
    meta = json.loads(a["metadata"])
    assert meta["size"] == 22 and meta["score"] == 0.9 and "content" not in meta
    rep = tb.build_report(b)["read_report"]["train"]
    assert rep["skipped"] == {"empty_content": 1, "missing_content": 2, "too_large": 1, "below_min_quality": 1,
                              "non_utf8": 2, "invalid_json": 1, "unreadable_shard": 1}
    assert rep["n_ok"] == 4
    assert "skipped 9 of" in caplog.text  # never silent
    with pytest.raises(ValueError, match="quality_field and min_quality"):
        tb.CodeCorpus(data_dir=tmp_path, sources=shards, quality_field="score")


def test_builds_are_deterministic_and_not_silently_reused(code_sources, tmp_path):
    corpus, shards = code_sources
    b1 = tb.prepare(tb.CodeCorpus, tmp_path / "one", sources=[corpus, *shards[:2]], dataset_name="mix")
    b2 = tb.prepare(tb.CodeCorpus, tmp_path / "two", sources=[corpus, *shards[:2]], dataset_name="mix")
    assert examples(b1) == examples(b2)
    assert tb.build_report(b1)["source_fingerprint"] == tb.build_report(b2)["source_fingerprint"]
    # Reading back with no sources needs nothing but the data_dir.
    assert examples(tb.prepare(tb.CodeCorpus, tmp_path / "one", dataset_name="mix")) == examples(b1)
    with pytest.raises(ValueError, match="other sources"):
        tb.prepare(tb.CodeCorpus, tmp_path / "one", sources=[corpus], dataset_name="mix")
    with pytest.raises(ValueError, match="no sources"):
        tb.prepare(tb.CodeCorpus, tmp_path / "three", dataset_name="mix")
    with pytest.raises(ValueError, match="neither a file nor a directory"):
        tb.prepare(tb.CodeCorpus, tmp_path / "three", sources=[tmp_path / "nope"])
    with pytest.raises(ValueError, match="dataset_name"):
        tb.CodeCorpus(data_dir=tmp_path, sources=[corpus], dataset_name="../x")
    assert not (tmp_path / "three").exists()  # bad arguments fail before TFDS writes anything


def test_textbook_and_exercises(tmp_path):
    tb_dir = tmp_path / "textbook"
    tb_dir.mkdir()
    (tb_dir / "part-0.jsonl").write_text(
        json.dumps({"text": "# Loops\nA for loop repeats.\n", "topic": "loops", "model": "m"}) + "\n"
        + json.dumps({"text": "  "}) + "\n" + json.dumps({"topic": "no text"}) + "\n")
    (tb_dir / "part-1.jsonl").write_text(json.dumps({"text": "Ünïcode ✓\r\n", "topic": "strings"}) + "\n")
    b = tb.prepare(tb.Textbook, tmp_path / "tfds", sources=[tb_dir], dataset_name="tb")
    got = examples(b)
    assert [(e["text"], e["source"], e["line"]) for e in got] == [
        ("# Loops\nA for loop repeats.\n", "part-0.jsonl", 1), ("Ünïcode ✓\r\n", "part-1.jsonl", 1)]
    assert json.loads(got[0]["metadata"]) == {"topic": "loops", "model": "m"}
    assert tb.build_report(b)["read_report"]["train"]["skipped"] == {"empty_text": 1, "missing_text": 1}

    ex = tmp_path / "ex.jsonl"
    recs = [{"prompt": f"def f{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n", "solution": f"    return x + {i}\n",
             "topic": "math"} for i in range(5)]
    packing.write_exercises(ex, recs)
    with open(ex, "ab") as f:
        f.write(b'{"prompt": "p"}\n\xff\n[1, 2]\n')
    e = tb.prepare(tb.CodeExercises, tmp_path / "tfds", sources=[ex], dataset_name="ex")
    got = examples(e)
    kept, report = packing.read_exercises(ex)  # the packer's reading: the same records
    assert [(g["prompt"], g["solution"], g["line"]) for g in got] == \
        [(r["prompt"], r["solution"], r["_line"]) for r in kept]
    assert tb.build_report(e)["read_report"]["train"]["skipped"] == dict(report.skipped) == \
        {"missing_solution": 1, "non_utf8": 1, "not_an_object": 1}
    all_bad = tmp_path / "bad.jsonl"
    all_bad.write_bytes(b"\xff\n{}\n")
    with pytest.raises(ValueError, match="no valid records"):
        tb.prepare(tb.CodeExercises, tmp_path / "tfds", sources=[all_bad], dataset_name="bad")


def test_eval_sets(tmp_path):
    h = tb.prepare(tb.HumanEval, tmp_path)
    he = examples(h, "test")
    ref = benchmarks.load_humaneval()
    assert len(he) == 164 and [e["task_id"] for e in he] == [r["task_id"] for r in ref]
    assert he[0]["prompt"] == ref[0]["prompt"] and he[0]["test"] == ref[0]["test"]
    m = tb.prepare(tb.MBPP, tmp_path)
    assert {s: m.info.splits[s].num_examples for s in m.info.splits} == benchmarks.MBPP_SPLIT_SIZES
    for split in ("prompt", "validation"):
        got = examples(m, split)
        want = benchmarks.load_mbpp(split)
        assert [g["task_id"] for g in got] == [w["task_id"] for w in want]
        assert got[0]["code"] == want[0]["code"] and [t.decode() for t in got[0]["test_list"]] == want[0]["test_list"]
    assert str(m.version) == "1.0.0"


def test_prepared_dataset_loads_with_plain_tfds(code_sources, tmp_path):
    _, shards = code_sources
    b = tb.prepare(tb.CodeCorpus, tmp_path, sources=shards[:1], dataset_name="stack0")
    ds = tfds.load("phijax_code/stack0", data_dir=str(tmp_path), split="train", shuffle_files=False)
    assert [ex["path"].decode() for ex in ds.as_numpy_iterator()] == [e["path"] for e in examples(b)]
