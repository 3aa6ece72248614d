"""data_gen.stage: the one stage protocol (skip a complete output, temp dir, marker last, publish
whole) and the shared writers; that outputs written before it are still complete; and that
data_gen imports neither jax nor tensorflow, and has no import cycle."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_gen import dedup, ingest, stage

REPO = Path(__file__).resolve().parent.parent


def _run_stage(out: Path, fp: str, records: list[dict], force: bool = False) -> dict:
    """A minimal stage, written as every data_gen stage is."""
    st = stage.Stage(out, fp, "report.json", "test")
    if (stored := st.done(force)) is not None:
        return stored
    st.start()
    w = st.shard_writer("part", 2)
    w.write_all(records)
    report = {"fingerprint": fp, "shards": w.commit(), "n": w.n, "resumed": False}
    st.finish(report)
    return report


def _shards(out: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(x) for x in p.read_text().splitlines()] for p in sorted((out / "shards").iterdir())}


def test_complete_output_is_skipped(tmp_path):
    recs = [{"i": i} for i in range(5)]
    first = _run_stage(tmp_path, "fp1", recs)
    assert first == {"fingerprint": "fp1", "shards": ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"],
                     "n": 5, "resumed": False}
    assert (tmp_path / stage.MARKER_FILE).read_text() == "fp1\n"
    assert json.loads((tmp_path / "report.json").read_text()) == first
    assert (tmp_path / "report.json").read_bytes().endswith(b"}\n")
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    again = _run_stage(tmp_path, "fp1", [{"other": 1}])
    assert again == dict(first, resumed=True)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes  # nothing rewritten
    assert _run_stage(tmp_path, "fp1", recs, force=True)["resumed"] is False


def test_fingerprint_change_reruns_and_replaces_the_shards_whole(tmp_path):
    _run_stage(tmp_path, "fp1", [{"i": i} for i in range(5)])
    rep = _run_stage(tmp_path, "fp2", [{"j": 0}])
    assert rep["resumed"] is False and rep["shards"] == ["part-00000.jsonl"]
    assert _shards(tmp_path) == {"part-00000.jsonl": [{"j": 0}]}  # no shard of the first run left
    assert (tmp_path / stage.MARKER_FILE).read_text() == "fp2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stage.MARKER_FILE, "report.json", "shards"]


def test_fingerprint_covers_inputs_and_options(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("{}\n")
    fp = stage.fingerprint([f], {"opt": 1})
    assert len(fp) == 16 and fp == stage.fingerprint([f], {"opt": 1})
    assert fp != stage.fingerprint([f], {"opt": 2})
    os.utime(f, ns=(1, f.stat().st_mtime_ns + 1_000_000))
    assert fp != stage.fingerprint([f], {"opt": 1})


_KILLED_RUN = """
import os, signal, sys
from data_gen import stage
st = stage.Stage(sys.argv[1], "fp2", "report.json", "test")
assert st.done() is None
st.start()
w = st.shard_writer("part", 2)
w.write_all({"new": i} for i in range(5))
os.kill(os.getpid(), signal.SIGKILL)  # before commit and finish
"""


def test_killed_run_publishes_nothing_and_the_rerun_finishes(tmp_path):
    _run_stage(tmp_path, "fp1", [{"old": i} for i in range(3)])
    old = _shards(tmp_path)
    p = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    assert not (tmp_path / stage.MARKER_FILE).exists()  # neither the old nor the new output is complete
    assert _shards(tmp_path) == old  # the new shards were not published
    assert (tmp_path / ".shards.tmp").is_dir()
    rep = _run_stage(tmp_path, "fp2", [{"new": i} for i in range(5)])
    assert rep["resumed"] is False and [r["new"] for rs in _shards(tmp_path).values() for r in rs] == list(range(5))
    assert not (tmp_path / ".shards.tmp").exists()


def test_whole_directory_stage(tmp_path):
    final = tmp_path / "decontaminate"
    st = stage.Stage(final, "fp1", "stage.json", "test")
    assert st.done() is None
    tmp = st.begin_dir()
    assert tmp == tmp_path / ".decontaminate.tmp" and not list(tmp.iterdir())
    (tmp / "a.txt").write_text("a")
    st.publish_dir(tmp, {"n": 1})
    assert sorted(p.name for p in final.iterdir()) == [stage.MARKER_FILE, "a.txt", "stage.json"]
    assert not tmp.exists() and st.done() == {"n": 1, "resumed": True}
    # A second run killed before publishing leaves the first output as it was; the next one
    # replaces it whole.
    st2 = stage.Stage(final, "fp2", "stage.json", "test")
    (st2.begin_dir() / "b.txt").write_text("b")
    assert st.done() == {"n": 1, "resumed": True} and st2.done() is None
    tmp = st2.begin_dir()  # what the killed run left is cleared
    assert not list(tmp.iterdir())
    (tmp / "c.txt").write_text("c")
    st2.publish_dir(tmp, {"n": 2})
    assert sorted(p.name for p in final.iterdir()) == [stage.MARKER_FILE, "c.txt", "stage.json"]
    assert st2.done() == {"n": 2, "resumed": True} and st.done() is None


def test_unfinished_run_saves_its_report_without_a_marker(tmp_path):
    st = stage.Stage(tmp_path, "fp", "report.json")
    st.start()
    st.save_report({"pending": 3})
    assert json.loads((tmp_path / "report.json").read_text()) == {"pending": 3}
    assert st.done() is None


class _MemFiles:
    """Another storage behind the same stage protocol (what data_gen.beam_stages does for URLs)."""
    files: dict[str, bytes] = {}

    join = staticmethod(lambda root, *parts: "/".join((root, *parts)))
    exists = classmethod(lambda cls, p: p in cls.files)
    read_text = classmethod(lambda cls, p: cls.files[p].decode())
    delete = classmethod(lambda cls, p: cls.files.pop(p, None))
    makedirs = staticmethod(lambda p: None)

    @classmethod
    def write_bytes(cls, p, data):
        cls.files[p] = data


def test_stage_on_another_storage():
    _MemFiles.files = {}
    st = stage.Stage("mem://bucket/out", "fp", "r.json", "test", fs=_MemFiles)
    assert st.done() is None
    st.start()
    st.finish({"a": 1})
    assert _MemFiles.files == {"mem://bucket/out/r.json": b'{\n  "a": 1\n}\n', "mem://bucket/out/_COMPLETE": b"fp\n"}
    assert st.done() == {"a": 1, "resumed": True}
    st.start()
    assert "mem://bucket/out/_COMPLETE" not in _MemFiles.files


def test_shard_writer_names_and_counts(tmp_path):
    w = stage.ShardWriter(tmp_path, "ingest", 3)
    w.write_all({"i": i} for i in range(7))
    assert w.commit() == ["ingest-00000.jsonl", "ingest-00001.jsonl", "ingest-00002.jsonl"]
    assert [len(v) for v in _shards(tmp_path).values()] == [3, 3, 1]
    w = stage.ShardWriter(tmp_path, "ingest", 3)
    assert w.commit() == [] and not list((tmp_path / "shards").iterdir())  # streamed: no records, no shard
    # Counted up front (the generators): -of- names, at least one shard.
    assert stage.write_shards(tmp_path, "textbook", [{"t": "é"}] * 4, 2) == [
        "textbook-00000-of-00002.jsonl", "textbook-00001-of-00002.jsonl"]
    assert (tmp_path / "shards" / "textbook-00000-of-00002.jsonl").read_bytes() == '{"t": "é"}\n{"t": "é"}\n'.encode()
    assert stage.write_shards(tmp_path, "textbook", [], 2) == ["textbook-00000-of-00001.jsonl"]
    assert (tmp_path / "shards" / "textbook-00000-of-00001.jsonl").read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temp dir left
    w = stage.ShardWriter(tmp_path, "x", 2, n_records=3)
    w.write({"a": 1})
    with pytest.raises(ValueError, match="1 records written, 3 announced"):
        w.commit()
    with pytest.raises(ValueError, match="shard_size"):
        stage.ShardWriter(tmp_path, "x", 0)


def test_atomic_file(tmp_path):
    p = tmp_path / "sub" / "f.jsonl"
    with stage.AtomicFile(p) as f:
        f.write("a\n")
        assert not p.exists()  # in place only when complete
    assert p.read_text() == "a\n" and p.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError):
        with stage.AtomicFile(p, "wb") as f:
            f.write(b"b\n")
            raise RuntimeError("stopped")
    assert p.read_text() == "a\n" and sorted(x.name for x in p.parent.iterdir()) == ["f.jsonl"]


# --- outputs written before data_gen.stage --------------------------------------------------
def _fingerprint_9e15ddb(spec, files, cfg, extra=None) -> str:
    """data_gen/ingest.py's fingerprint at 9e15ddb, verbatim."""
    h = hashlib.sha256(json.dumps({"spec": spec, "cfg": dataclasses.asdict(cfg), **(extra or {})},
                                  sort_keys=True, default=str).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def test_outputs_written_before_are_still_complete(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": f"def f{i}():\n    return {i}\n"}) + "\n" for i in range(3)))
    cfg = dedup.DedupConfig()
    old_fp = _fingerprint_9e15ddb("dedup", [inp], ingest.IngestConfig(), {"dedup": dataclasses.asdict(cfg)})
    out = tmp_path / "dedup"
    (out / "shards").mkdir(parents=True)
    (out / dedup.REPORT_FILE).write_text(json.dumps({"kept": 3, "fingerprint": old_fp}, indent=2) + "\n")
    (out / "_COMPLETE").write_text(old_fp + "\n")
    assert dedup.run([str(inp)], out, cfg) == {"kept": 3, "fingerprint": old_fp, "resumed": True}
    ing_cfg = ingest.IngestConfig(limit=3)
    _, files = ingest.parse_source("stdlib")
    assert ingest.fingerprint("stdlib", files, ing_cfg, {"so_tag": "python"}) == _fingerprint_9e15ddb(
        "stdlib", files, ing_cfg, {"so_tag": "python"})


# --- imports ------------------------------------------------------------------------------------
def test_data_gen_imports_neither_jax_nor_tensorflow():
    code = textwrap.dedent("""
        import sys
        import data_gen.ingest, data_gen.dedup, data_gen.annotate, data_gen.filter, data_gen.quality_filter
        import data_gen.generator, data_gen.textbook, data_gen.exercises, data_gen.stage, data_gen.text_blocks
        import data_gen.decontaminate, data_gen.classifier
        heavy = [m for m in ("jax", "tensorflow") if m in sys.modules]
        assert not heavy, heavy
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def _top_level_imports(path: Path, mods: set[str]) -> set[str]:
    """The modules of ``mods`` that ``path`` imports when it is imported (imports inside functions
    run later: they are not edges)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                    for a in node.names}
    return out & mods


def test_data_gen_has_no_import_cycle():
    mods = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (REPO / "data_gen").rglob("*.py")}
    # A module's own packages are initialised before it: importing them is no edge.
    graph = {m: {d for d in _top_level_imports(p, set(mods)) if not (m == d or m.startswith(d + "."))}
             for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, " -> ".join(path + [m])
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert "data_gen.stage" in graph and graph["data_gen.stage"] == set()  # the bottom of data_gen
