"""phijax.util.files: the one implementation of atomic file and directory writes."""
import json
import os
import subprocess
import sys

import pytest

from phijax.util import files


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path, monkeypatch):
    p = tmp_path / "a" / "x.json"
    files.save_json(p, {"v": 1})
    assert json.loads(p.read_text()) == {"v": 1}

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_text(p, "torn")
    assert json.loads(p.read_text()) == {"v": 1}
    assert os.listdir(p.parent) == ["x.json"]  # no temp file left behind


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    with files.staged_dir(final) as d:
        (d / "a").write_text("1")
        (d / "b").write_text("1")
    with pytest.raises(RuntimeError):
        with files.staged_dir(final) as d:
            (d / "a").write_text("2")
            raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(final)) == ["a", "b"] and (final / "a").read_text() == "1"
    with files.staged_dir(final, fsync=True) as d:
        (d / "c").write_text("3")
    assert os.listdir(final) == ["c"]  # replaced whole: no file of the previous run left
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_staged_dir_with_a_marker_lets_the_first_identical_build_win(tmp_path):
    final = tmp_path / "cache"
    with files.staged_dir(final, complete_marker="meta.json") as d:
        (d / "meta.json").write_text("first")
    with files.staged_dir(final, complete_marker="meta.json") as d:
        (d / "meta.json").write_text("second")  # a racing identical build: dropped
    assert (final / "meta.json").read_text() == "first" and sorted(os.listdir(tmp_path)) == ["cache"]
    half = tmp_path / "half"
    half.mkdir()
    (half / "junk").write_text("")  # not complete (no marker): publishing over it is an error
    with pytest.raises(OSError):
        with files.staged_dir(half, complete_marker="meta.json") as d:
            (d / "meta.json").write_text("x")


def test_the_neutral_layer_imports_neither_jax_nor_tensorflow():
    code = ("import sys, phijax.util.files, phijax.util.gin_config; "
            "bad = [m for m in ('jax', 'tensorflow', 'seqio') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
