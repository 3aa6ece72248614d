"""python -m phijax.recipe: the nano recipe end to end (teacher trained and served by phijax.serve,
quality filter, textbooks, exercises, mining, decontamination, pretraining, fine-tuning,
evaluation, report), a SIGKILL in the middle of a stage and a rerun that ends with the same
report, reruns that follow changed settings downstream only, the dry run's estimates, and bad
settings refused before any stage runs. Real children, real servers, nothing mocked.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phijax.recipe import runner

NANO = "gin/recipes/nano.gin"
STAGES = ["teacher", "quality_filter", "textbooks", "exercises", "mined_exercises", "decontaminate", "pretrain",
          "finetune", "evaluate", "pruned", "report"]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the children train and serve on one CPU device, as a user's would
    return env


def _recipe(out, *extra, **kw):
    return subprocess.run([sys.executable, "-m", "phijax.recipe", f"--gin_file={NANO}", f"--out_dir={out}", "--quiet",
                           *extra], env=_env(), capture_output=True, text=True, timeout=900, **kw)


def _dry_run_states(out, *extra) -> dict:
    r = _recipe(out, "--dry_run", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    states = {}
    for line in r.stdout.split("generation (nothing is sent):")[0].splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] in STAGES and line.startswith("  "):
            states[parts[0]] = parts[1]
    return states, r.stdout


def _report(out) -> dict:
    r = json.loads((Path(out) / "report" / "report.json").read_text())
    r.pop("timings")
    return r


def _alive(pattern: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if pattern in cmd and "pytest" not in cmd:
                pids.append(int(p.name))
    return pids


@pytest.mark.slow
def test_nano_recipe_end_to_end_kill_and_reruns(tmp_path):
    a = tmp_path / "a"
    r = _recipe(a)
    assert r.returncode == 0, r.stderr[-4000:]
    for s in STAGES:
        m = runner.read_marker(a / s)
        assert m["complete"] is True and m["attempts"] == 1, (s, m)
    rep = _report(a)
    # the funnel: the quality filter's six stages, then what was generated, mined and cleaned
    stages = [f["stage"] for f in rep["funnel"]]
    assert stages[:6] == [f"quality_filter/{s}" for s in ("ingest", "dedup", "annotate", "classifier", "filter",
                                                          "decontaminate")]
    assert {"textbooks", "exercises", "mined_exercises", "decontaminate/mined_exercises"} <= set(stages)
    assert rep["funnel"][0]["docs_in"] == 120 and 0 < rep["funnel"][5]["docs_out"] < 120
    for name in ("textbooks", "exercises"):  # every sample accounted for: accepted + rejected = asked
        g = rep["generation"][name]
        assert g["requests"] == 4 and g["accepted"] + sum(g["rejects"].values()) == 4
        assert g["model"].startswith("teacher-") and g["prompt_tokens"] > 0 and g["completion_tokens"] > 0
    assert rep["generation"]["textbooks"]["accepted"] == 4  # cut-off sections kept (keep_cut_off)
    ex = rep["exercises"]
    assert ex["total"] > 0 and sum(ex["by_source"].values()) == ex["total"]
    fine_tuning_set = [json.loads(x) for x in (a / "decontaminate" / "exercises.jsonl").read_text().splitlines()]
    assert len(fine_tuning_set) == ex["total"] and all(r["source"] for r in fine_tuning_set)
    assert rep["training"]["pretrain"]["steps"] == 20 and rep["training"]["finetune"]["steps"] == 4
    assert [s for s, _ in rep["finetune_pass_at_1"]["by_step"]] == [2, 4]
    assert [(e["model"], e["benchmark"], e["kind"], e["problems"], e["samples_per_problem"])
            for e in rep["evaluation"]] == [("finetuned", "humaneval", "greedy", 3, 1),
                                            ("finetuned", "humaneval", "sampled", 3, 2)]
    assert {"pass@1", "pass@2"} <= set(rep["evaluation"][1])
    sl = rep["solution_loss"]["humaneval"]
    assert sl["problems"] > 100 and sl["tokens"] > 1000 and 0 < sl["finetuned"] < 20 and 0 < sl["pretrained"] < 20
    # the pruned-data experiment at τ = 0.8 against the main run: what was pruned, retrained, scored
    base, pruned = rep["pruned"]
    assert base["run"].startswith("unpruned") and base["humaneval"] == rep["pass_at_1"]["finetuned/humaneval"]
    assert pruned["tau"] == 0.8 and set(pruned["kept"]) >= {"code", "mined_exercises"}
    assert pruned["humaneval"] is not None and 0 < pruned["solution_loss_humaneval"] < 20
    code_kept = sum(1 for x in (a / "pruned" / "tau_0.8" / "data" / "code").glob("*.jsonl")
                    for line in x.read_text().splitlines() if line.strip())
    assert code_kept == pruned["kept"]["code"] == rep["funnel"][5]["docs_out"] - pruned["pruned"]["code"]
    md = (a / "report" / "report.md").read_text()
    assert "Plumbing, not quality" in md and "50.6%" in md and "Held-out loss" in md and "Pruned-data" in md
    for png in ("loss.png", "finetune_pass_at_1.png", "funnel.png"):
        assert (a / "report" / png).stat().st_size > 1000
    assert (a / "recipe.gin").is_file()
    assert not _alive(str(a))  # the served teacher was stopped

    # A rerun does nothing; the dry run says every stage is complete and estimates the generation.
    states, text = _dry_run_states(a)
    assert states == {s: "complete" for s in STAGES}
    assert "textbooks  teacher-" in text and "4 requests (0 to send)" in text and "free: phijax.serve" in text

    # Changed settings rerun that stage and what reads it, never what comes before.
    states, _ = _dry_run_states(a, "--gin_param=phijax.recipe.Recipe.eval_checkpoint = 'best'")
    assert [s for s in STAGES if states[s] != "complete"] == ["evaluate", "report"]
    states, _ = _dry_run_states(a, "--gin_param=textbooks/phijax.recipe.StageConfig.enabled = False")
    assert states["textbooks"] == "disabled"
    assert [s for s in STAGES if states[s] not in ("complete", "disabled")] == [
        "decontaminate", "pretrain", "finetune", "evaluate", "pruned", "report"]

    # SIGKILL in the middle of pretraining (after its first checkpoint), then a rerun: the same report.
    b = tmp_path / "b"
    shutil.copytree(a, b, symlinks=True)
    for s in ("pretrain", "finetune", "evaluate", "pruned", "report"):
        shutil.rmtree(b / s)
    proc = subprocess.Popen([sys.executable, "-m", "phijax.recipe", f"--gin_file={NANO}", f"--out_dir={b}", "--quiet"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = b / "pretrain" / "checkpoints"
    t0 = time.monotonic()
    while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert proc.poll() is None and time.monotonic() - t0 < 600, "the recipe ended before the first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert runner.read_marker(b / "pretrain")["complete"] is False  # killed mid-stage
    for _ in range(100):  # the training child dies with the recipe (PDEATHSIG)
        if not _alive(str(b)):
            break
        time.sleep(0.1)
    assert not _alive(str(b))
    r = _recipe(b)
    assert r.returncode == 0, r.stderr[-4000:]
    assert runner.read_marker(b / "pretrain")["attempts"] == 2
    assert _report(b) == _report(a)


def test_bad_settings_are_refused_before_any_stage(tmp_path):
    out = tmp_path / "r"
    cases = [
        (["--gin_param=SOURCE = 'ftp://x'"], "Recipe.source"),
        (["--gin_param=phijax.recipe.Recipe.teacher = 'gpt'"], "Recipe.teacher"),
        (["--gin_param=phijax.recipe.Recipe.benchmarks = ['apps']"], "'apps'"),
        (["--gin_param=pretrain/phijax.recipe.StageConfig.gin_files = ['experiments/nope.gin']"], "nope.gin"),
        (["--gin_param=SOURCES = 'stdlib'"], "SOURCES"),  # a typo in a macro
    ]
    for extra, needle in cases:
        r = _recipe(out, *extra)
        assert r.returncode == 2, (extra, r.stderr[-2000:])
        assert needle in r.stderr and "error:" in r.stderr, (extra, r.stderr[-2000:])
    # a dry run on a fresh directory: every stage to run, the served teacher free, nothing written
    states, text = _dry_run_states(out)
    assert states == {s: "to run" for s in STAGES}, text
    assert "4 requests (4 to send)" in text and "free: phijax.serve" in text
    r = subprocess.run([sys.executable, "-m", "phijax.recipe", "--gin_file=gin/recipes/base.gin", f"--out_dir={out}"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "SOURCE" in r.stderr, r.stderr[-2000:]
    assert not out.exists()  # nothing was started


def test_fingerprints_follow_the_text_children_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inc.gin").write_text("X = 1\n")
    (tmp_path / "prompt.txt").write_text("hello {topic}\n")
    (tmp_path / "top.gin").write_text("include 'inc.gin'\na.template = 'prompt.txt'\n")
    d0 = runner.gin_digest(["top.gin"])
    assert runner.gin_digest(["top.gin"]) == d0
    (tmp_path / "inc.gin").write_text("X = 2\n")  # an included file changed
    d1 = runner.gin_digest(["top.gin"])
    (tmp_path / "prompt.txt").write_text("bye {topic}\n")  # a file a binding names changed
    d2 = runner.gin_digest(["top.gin"])
    assert len({d0, d1, d2}) == 3
    assert runner.gin_digest(["top.gin"], ["Y = 3"]) == d2  # bindings are hashed by the caller
    with pytest.raises(ValueError, match="missing.gin"):
        runner.gin_digest(["missing.gin"])
