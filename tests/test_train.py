"""The training CLI end to end: loss falls, checkpoints and metrics land, resume is exact, NaN stops,
bad input fails fast with a message that names the problem."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from phijax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small phi on the stdlib SeqIO task (tokenizer and window cache are built once and cached).
SMALL = [
    "--gin_file=models/tiny.gin", "--gin_file=runs/pretrain.gin",
    "--gin_param=phijax.PhiConfig.d_model = 64", "--gin_param=phijax.PhiConfig.n_layers = 2",
    "--gin_param=phijax.PhiConfig.n_heads = 4", "--gin_param=phijax.PhiConfig.head_dim = 16",
    "--gin_param=phijax.PhiConfig.rotary_dim = 8", "--gin_param=phijax.PhiConfig.d_mlp = 128",
    "--gin_param=DATA_SOURCE = 'stdlib'", "--gin_param=SEQ_LEN = 64", "--gin_param=BATCH_SIZE = 8",
    "--gin_param=phijax.optim.warmup_linear_decay.peak_lr = 3e-3",
    "--gin_param=phijax.optim.warmup_linear_decay.warmup_steps = 2",
    "--gin_param=train.export_dtype = None",
]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cmd(model_dir, *extra):
    return [sys.executable, "-m", "phijax.train", *SMALL, f"--gin_param=MODEL_DIR = '{model_dir}'", *extra]


def _run(model_dir, *extra, check=True):
    p = subprocess.run(_cmd(model_dir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
    return p


def _losses(model_dir):
    out = {}
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


@pytest.mark.slow
def test_train_cli_trains_checkpoints_and_resumes_exactly_after_sigkill(tmp_path):
    common = ["--gin_param=TRAIN_STEPS = 12", "--gin_param=train.log_every = 1",
              "--gin_param=train.checkpoint_every = 4"]
    ref_dir = tmp_path / "ref"
    p = _run(ref_dir, *common)
    ref = _losses(ref_dir)
    assert sorted(ref) == list(range(1, 13))
    assert ref[12] < ref[1] - 0.5, ref  # loss falls visibly
    rec = json.loads(open(ref_dir / "metrics.jsonl").readline())
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "mfu"} <= set(rec)
    assert sorted(os.listdir(ref_dir / "checkpoints"))[-3:] == ["12", "4", "8"] or \
        {"4", "8", "12"} <= set(os.listdir(ref_dir / "checkpoints"))
    assert (ref_dir / "operative_config.gin").read_text().count("train.batch_size") == 1
    assert os.listdir(ref_dir / "tb")
    assert "checkpoints:" in p.stdout

    # Kill -9 once step 8's checkpoint is committed and training has moved past it.
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(run_dir, *common), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if (run_dir / "checkpoints" / "8").is_dir() and os.path.exists(run_dir / "metrics.jsonl") and \
                    max(_losses(run_dir), default=0) >= 9:
                break
            if proc.poll() is not None:
                pytest.fail("training finished before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("step 8 checkpoint never appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    p = _run(run_dir, *common)
    assert "resumed from step" in p.stderr
    assert _losses(run_dir) == ref  # bit-identical per-step losses


@pytest.mark.slow
def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    _run(tmp_path, "--gin_param=TRAIN_STEPS = 4", "--gin_param=train.checkpoint_every = 2")
    # Resume with an absurd learning rate: the parameters blow up within a few steps.
    p = _run(tmp_path, "--gin_param=TRAIN_STEPS = 12", "--gin_param=train.checkpoint_every = 1",
             "--gin_param=phijax.optim.warmup_linear_decay.peak_lr = 1e30", check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "non-finite loss at step" in p.stderr
    from phijax.checkpoint import Checkpointer
    ckpts = Checkpointer(str(tmp_path / "checkpoints"), save_interval_steps=1)
    last = ckpts.latest_step()
    losses = _losses(tmp_path)
    assert all(v == v and abs(v) != float("inf") for s, v in losses.items() if s <= last)
    ckpts.close()


def _main_err(capsys, *args):
    rc = train.main(list(args))
    return rc, capsys.readouterr().err


def test_unknown_gin_file_binding_and_missing_macro(capsys, tmp_path):
    rc, err = _main_err(capsys, "--gin_file=gin/models/nope.gin")
    assert rc == 2 and "gin file not found: 'gin/models/nope.gin'" in err
    rc, err = _main_err(capsys, *SMALL, f"--gin_param=MODEL_DIR='{tmp_path}'", "--gin_param=train.no_such_arg = 1")
    assert rc == 2 and "no_such_arg" in err
    rc, err = _main_err(capsys, *SMALL, f"--gin_param=MODEL_DIR='{tmp_path}'", "--gin_param=UNDEFINED_MACRO_X = %NOPE")
    assert rc == 2 and "NOPE" in err
    rc, err = _main_err(capsys, *SMALL)  # MODEL_DIR is %gin.REQUIRED
    assert rc == 2 and "model_dir" in err.lower()


def test_bad_mesh_and_batch_fail_fast(capsys, tmp_path):
    rc, err = _main_err(capsys, *SMALL, f"--gin_param=MODEL_DIR='{tmp_path}'", "--gin_param=TRAIN_STEPS = 2",
                        "--gin_param=train.mesh_shape = (3, 1, 1)")
    assert rc == 2 and "needs 3 devices but 8 are available" in err
    rc, err = _main_err(capsys, *SMALL, f"--gin_param=MODEL_DIR='{tmp_path}'", "--gin_param=TRAIN_STEPS = 2",
                        "--gin_param=BATCH_SIZE = 12")
    assert rc == 2 and "not divisible by the data-parallel size 8" in err
    rc, err = _main_err(capsys, *SMALL, f"--gin_param=MODEL_DIR='{tmp_path}'", "--gin_param=TRAIN_STEPS = 2",
                        "--gin_param=MICROBATCHES = 3")
    assert rc == 2 and "not divisible by microbatches=3" in err
    assert not os.listdir(tmp_path)  # nothing was started


@pytest.mark.slow
def test_model_dir_with_other_model_shape_is_refused(capsys, tmp_path):
    _run(tmp_path, "--gin_param=TRAIN_STEPS = 2")
    p = _run(tmp_path, "--gin_param=TRAIN_STEPS = 4", "--gin_param=phijax.PhiConfig.d_mlp = 256", check=False)
    assert p.returncode == 2
    assert "different model shape (d_mlp: checkpoint 128 vs config 256)" in p.stderr


def test_gin_includes_resolve_with_same_named_dirs_in_cwd(tmp_path, monkeypatch):
    # A MODEL_DIR like ./runs/x used to make gin treat 'runs/...' includes as a Python package.
    (tmp_path / "runs" / "cpu_demo").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    from phijax.util import gin_config
    import gin
    gin_config.parse([os.path.join(REPO, "gin/experiments/cpu_demo.gin")], [])
    assert gin.query_parameter("%TRAIN_STEPS") > 0


@pytest.mark.slow
def test_finetune_on_packed_exercises_from_an_init_checkpoint(tmp_path):
    # Pretrain briefly, then fine-tune from its export on a CodeExercises JSONL: packed rows with
    # segment ids, per-example positions and loss on the solutions flow through the trainer.
    pre = tmp_path / "pre"
    _run(pre, "--gin_param=TRAIN_STEPS = 2", "--gin_param=train.export_dtype = 'float32'")
    data = tmp_path / "ex.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"def add_{i}(a, b):\n    \"\"\"Return a + b + {i}.\"\"\"\n",
                                "solution": f"    return a + b + {i}\n"}) + "\n")
    ft = tmp_path / "ft"
    p = _run(ft, "--gin_param=TRAIN_STEPS = 6", "--gin_param=train.log_every = 1",
             "--gin_param=DATA_SOURCE = 'exercises'", f"--gin_param=data_source.data_path = '{data}'",
             f"--gin_param=train.init_params_from = '{pre / 'export'}'")
    assert "initialised parameters from" in p.stderr
    losses = _losses(ft)
    assert sorted(losses) == list(range(1, 7))
    assert losses[6] < losses[1]
    # Started from the pretrained weights, not from the seed's fresh init: step 1 differs.
    _run(tmp_path / "fresh", "--gin_param=TRAIN_STEPS = 1", "--gin_param=DATA_SOURCE = 'exercises'",
         f"--gin_param=data_source.data_path = '{data}'")
    assert abs(losses[1] - _losses(tmp_path / "fresh")[1]) > 1e-4


@pytest.mark.slow
def test_periodic_humaneval_logs_pass_at_1_reports_and_keeps_the_best_export(tmp_path):
    from phijax import decode

    steps = ["--gin_param=TRAIN_STEPS = 4", "--gin_param=train.log_every = 1", "--gin_param=train.checkpoint_every = 2"]
    evals = ["--gin_param=PeriodicEval.every_steps = 2", "--gin_param=PeriodicEval.limit = 3",
             "--gin_param=PeriodicEval.max_new_tokens = 12", "--gin_param=PeriodicEval.batch_size = 4",
             "--gin_param=PeriodicEval.timeout_s = 5.0"]
    _run(tmp_path / "plain", *steps)
    run_dir = tmp_path / "eval"
    _run(run_dir, *steps, *evals)

    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    scores = {r["step"]: r["eval/humaneval/pass@1"] for r in records if "eval/humaneval/pass@1" in r}
    assert sorted(scores) == [2, 4]
    # Evaluation reads the live parameters but must not perturb training.
    assert _losses(tmp_path / "plain") == {r["step"]: r["loss"] for r in records if "loss" in r}

    # The logged score is the one the sandbox results give for those 3 problems.
    history = [json.loads(line) for line in open(run_dir / "eval" / "evals.jsonl")]
    assert [(h["step"], h["problems"], h["pass@1"]) for h in history] == [(s, 3, scores[s]) for s in (2, 4)]
    results = [json.loads(line) for line in open(run_dir / "eval" / "humaneval_humaneval_samples.jsonl_results.jsonl")]
    assert len(results) == 3 and sum(r["passed"] for r in results) / 3 == scores[4]
    assert (run_dir / "eval" / "report.md").read_text().count("humaneval") >= 1
    assert (run_dir / "eval" / "pass_at_1.png").stat().st_size > 1000

    # best.json marks the best step (ties keep the earlier one) and names a loadable export.
    best = json.loads((run_dir / "best.json").read_text())
    expect = max(sorted(scores), key=lambda s: (scores[s], -s))
    assert (best["step"], best["pass@1"]) == (expect, scores[expect])
    model = decode.load_for_inference(best["export"])
    assert model.tokenizer is not None and model.cfg.d_model == 64


def test_periodic_eval_fails_fast_on_bad_settings(capsys, tmp_path):
    base = [*SMALL, "--gin_param=TRAIN_STEPS = 2", f"--gin_param=MODEL_DIR = '{tmp_path}'",
            "--gin_param=PeriodicEval.every_steps = 1"]
    assert train.main([*base, "--gin_param=PeriodicEval.benchmark = 'apps'"]) == 2
    assert "apps" in capsys.readouterr().err
    assert train.main([*base, "--gin_param=PeriodicEval.tokenizer_path = '/nonexistent/tok.json'"]) == 2
    assert "/nonexistent/tok.json" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def _unwritable_parent(tmp_path):
    """A directory in which MODEL_DIR cannot be created (root ignores permission bits: sysfs then)."""
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    if not os.access(ro, os.W_OK):
        return str(ro)
    if os.path.isdir("/sys/kernel"):
        return "/sys"
    pytest.skip("running as root without a read-only directory to test with")


@pytest.mark.parametrize("case, params, named", [
    ("quoted_train_steps", ["TRAIN_STEPS = '4'"], "TRAIN_STEPS = '4' must be an integer"),
    ("zero_train_steps", ["TRAIN_STEPS = 0"], "TRAIN_STEPS = 0 must be an integer >= 1"),
    ("macro_typo", ["TRAIN_STEP = 2"], "gin macro TRAIN_STEP is set but nothing uses it (did you mean TRAIN_STEPS?)"),
    ("log_every_zero", ["TRAIN_STEPS = 2", "train.log_every = 0"], "train.log_every = 0 must be an integer >= 1"),
    ("missing_init_params", ["TRAIN_STEPS = 2", "train.init_params_from = '/nonexistent/export'"],
     "train.init_params_from = '/nonexistent/export' does not exist"),
    ("model_dir_under_a_file", ["TRAIN_STEPS = 2"], "cannot be created: Not a directory"),
    ("model_dir_read_only", ["TRAIN_STEPS = 2"], "cannot be created"),
])
def test_bad_settings_fail_fast_with_one_line_naming_the_setting(capsys, tmp_path, monkeypatch, case, params, named):
    from phijax import sharding

    def no_compute(*a, **k):
        raise AssertionError("training started despite a bad setting")

    monkeypatch.setattr(sharding, "make_mesh", no_compute)  # the first thing train() does
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "checkpoints").mkdir()
    (model_dir / "config.gin").write_text("# an earlier run\n")
    before = sorted(os.walk(model_dir))
    if case == "model_dir_under_a_file":
        (tmp_path / "a_file").write_text("")
        model_dir = tmp_path / "a_file" / "run"
    elif case == "model_dir_read_only":
        model_dir = os.path.join(_unwritable_parent(tmp_path), "phijax-run")
    t0 = time.time()
    rc = train.main([*SMALL, f"--gin_param=MODEL_DIR = '{model_dir}'", *[f"--gin_param={p}" for p in params]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err
    if case.startswith("model_dir"):
        assert "MODEL_DIR = " in err and not os.path.exists(model_dir)
    else:
        assert sorted(os.walk(model_dir)) == before  # an existing MODEL_DIR is left as it was
    assert time.time() - t0 < 30


def test_only_process_0_logs_progress(monkeypatch, capsys):
    # Checkpoint progress (phijax.checkpoint) included, not only the step lines (phijax.train).
    import logging
    import jax
    names = ["phijax", "phijax.train", "phijax.checkpoint"]
    try:
        for index, enabled in ((1, False), (0, True)):
            monkeypatch.setattr(jax, "process_index", lambda: index)
            assert train.main(["--gin_file=no/such.gin"]) == 2  # logging is set up before the gin files
            for name in names:
                assert logging.getLogger(name).isEnabledFor(logging.INFO) is enabled, (index, name)
            for name in names:
                logging.getLogger(name).setLevel(logging.NOTSET)
    finally:
        for name in names:
            logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.slow
def test_rerun_after_a_kill_before_the_export_and_damaged_meta(tmp_path):
    fast = ["--gin_param=DATA_SOURCE = 'synthetic'", "--gin_param=train.checkpoint_every = 1",
            "--gin_param=train.export_dtype = 'bfloat16'"]
    run = tmp_path / "run"
    _run(run, *fast, "--gin_param=TRAIN_STEPS = 2")
    # Killed after the final checkpoint committed, before the export: the rerun writes it.
    shutil.rmtree(run / "export")
    p = _run(run, *fast, "--gin_param=TRAIN_STEPS = 2")
    assert "None" not in p.stdout and "done: nothing left to train: the latest checkpoint is step 2" in p.stdout
    assert (run / "export" / "export_info.json").is_file() and "inference params:" in p.stdout

    # A missing meta/metadata is damage like a missing array file: resume from the previous step.
    # init_params_from only initialises a new run: a resumed run says it ignores it.
    (run / "checkpoints" / "2" / "meta" / "metadata").unlink()
    p = _run(run, *fast, "--gin_param=TRAIN_STEPS = 3", f"--gin_param=train.init_params_from = '{run / 'export'}'")
    warns = [line for line in p.stderr.splitlines() if "WARNING" in line]
    assert "resumed from step 1" in p.stderr and "init_params_from is ignored" in p.stderr
    assert "Checkpoint step 2" in warns[0] and "meta/metadata" in warns[0] and "Traceback" not in p.stderr
    assert sorted(_losses(run)) == [1, 2, 3]

    # The model-shape check reads the meta of the checkpoint that would be restored.
    (run / "checkpoints" / "3" / "meta" / "metadata").write_text('{"model": {')
    p = _run(run, *fast, "--gin_param=TRAIN_STEPS = 4", "--gin_param=phijax.PhiConfig.d_mlp = 256", check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "holds a checkpoint (step 2) of a different model shape (d_mlp: checkpoint 128 vs config 256)" in p.stderr
