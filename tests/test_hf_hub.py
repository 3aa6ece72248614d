"""Hugging Face hub ids (`owner/name[@revision]`) wherever phijax takes a PhiForCausalLM directory:
convert.read_hf/load_hf and its CLI, decode.load_for_inference, evaluate.model_path and
train.init_params_from, all through convert.resolve_model_dir. Nothing is downloaded: a hub cache
is laid out here the way huggingface_hub writes one (models--owner--name/refs/main holding the
commit hash, snapshots/<hash>/<files>) around a tiny PhiForCausalLM saved by transformers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phijax import convert

REPO = Path(__file__).resolve().parent.parent
HUB_ID = "owner/tiny-phi"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VOCAB = 512
# The tiny HF model's shape as phijax gin (models/nano.gin has the rest: d_model 64, 2 layers, 4x16 heads).
NANO = ["--gin_file=models/nano.gin", f"--gin_param=phijax.PhiConfig.vocab_size = {VOCAB}",
        "--gin_param=phijax.PhiConfig.max_len = 512"]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(cache dir, snapshot dir): a hub cache holding HUB_ID at COMMIT (refs/main), a random
    PhiForCausalLM of nano's shape saved by transformers with a BPE tokenizer.json."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from phijax.data import vocab
    from phijax.evaluate import problems

    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    torch.manual_seed(0)
    cfg = transformers.PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=512, initializer_range=0.1,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5})
    transformers.PhiForCausalLM(cfg).eval().save_pretrained(snap)
    texts = [p.prompt + p.canonical_solution for p in problems.load_problems("humaneval", limit=40)]
    vocab.train_bpe(texts, VOCAB, snap / "tokenizer.json")
    return cache, snap


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    """HF_HUB_CACHE and HF_HUB_OFFLINE=1 for this process (huggingface_hub reads them at import,
    so its constants are set too) and for subprocesses."""
    import huggingface_hub.constants as constants
    cache, snap = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, snap


def _env(cache):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("HF_HOME", None)
    return env


def test_resolve_model_dir(offline_cache, tmp_path, monkeypatch):
    cache, snap = offline_cache
    assert convert.resolve_model_dir(HUB_ID) == str(snap)
    assert convert.resolve_model_dir(f"{HUB_ID}@main") == str(snap)
    assert convert.resolve_model_dir(f"{HUB_ID}@{COMMIT}") == str(snap)
    # paths are never taken for hub ids: an existing owner/name directory, absolute and gs:// paths
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "tiny-phi").mkdir(parents=True)
    assert convert.resolve_model_dir(HUB_ID) == HUB_ID
    for p in ("/nonexistent/phi-1", "gs://bucket/phi-1", "./x/y", "a/b/c"):
        assert convert.resolve_model_dir(p) == p
    for bad in ("owner/unknown", f"{HUB_ID}@v9"):
        with pytest.raises(ValueError) as e:
            convert.resolve_model_dir(bad)
        msg = str(e.value)
        assert msg.startswith(repr(bad)) and "not in the local hub cache" in msg and str(cache) in msg, msg
        assert "HF_HUB_OFFLINE is set" in msg and "hf download owner/" in msg and "HF_HUB_CACHE" in msg


def test_load_hf_from_a_hub_id_equals_the_directory(offline_cache):
    import jax
    _, snap = offline_cache
    cfg_id, params_id, meta_id = convert.read_hf(HUB_ID)
    cfg_dir, params_dir, meta_dir = convert.read_hf(str(snap))
    assert cfg_id == cfg_dir and meta_id == meta_dir
    assert jax.tree.all(jax.tree.map(np.array_equal, params_id, params_dir))
    from phijax import model as model_lib
    _, a, _ = model_lib.split(convert.load_hf(HUB_ID))
    _, b, _ = model_lib.split(convert.load_hf(str(snap)))
    assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


def test_convert_cli_takes_a_hub_id(offline_cache, tmp_path, capsys):
    from phijax import checkpoint as ckpt_lib
    out = tmp_path / "export"
    assert convert.main(["hf-to-orbax", "--hf_dir", HUB_ID, "--out_dir", str(out)]) == 0
    assert ckpt_lib.read_export_info(str(out))["config"]["vocab_size"] == VOCAB
    capsys.readouterr()
    assert convert.main(["hf-to-orbax", "--hf_dir", "owner/unknown", "--out_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'owner/unknown' is not a local directory" in err and "hf download owner/unknown" in err


def test_load_for_inference_finds_the_hub_tokenizer(offline_cache):
    from phijax import decode
    _, snap = offline_cache
    m = decode.load_for_inference(HUB_ID)
    assert m.tokenizer is not None and m.tokenizer.vocab_size == VOCAB and m.cfg.vocab_size == VOCAB
    ref = decode.load_for_inference(str(snap))
    assert m.tokenizer.encode("def f(x):") == ref.tokenizer.encode("def f(x):")


@pytest.mark.slow
def test_evaluate_cli_with_a_hub_id(offline_cache, tmp_path):
    cache, _ = offline_cache
    out = tmp_path / "eval"
    args = ["--gin_file=gin/eval/humaneval.gin", "--gin_param=evaluate.limit = 1",
            "--gin_param=evaluate.max_new_tokens = 4", "--gin_param=evaluate.checkpoint_step = None",
            f"--gin_param=evaluate.output_dir = '{out}'"]

    def evaluate(model_path):
        return subprocess.run([sys.executable, "-m", "phijax.evaluate", *args,
                               f"--gin_param=evaluate.model_path = '{model_path}'"],
                              cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=300)
    p = evaluate(HUB_ID)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 1 and summary["source"] == HUB_ID
    p = evaluate("owner/unknown")
    assert p.returncode == 2 and "evaluate.model_path='owner/unknown' is not a local directory" in p.stderr, p.stderr


def _train(model_dir, cache, *extra):
    cmd = [sys.executable, "-m", "phijax.train", *NANO, "--gin_file=runs/pretrain.gin",
           "--gin_param=DATA_SOURCE = 'synthetic'", "--gin_param=SEQ_LEN = 32", "--gin_param=BATCH_SIZE = 2",
           "--gin_param=TRAIN_STEPS = 1", "--gin_param=train.log_every = 1", "--gin_param=train.export_dtype = None",
           "--gin_param=phijax.optim.warmup_linear_decay.warmup_steps = 1",
           f"--gin_param=MODEL_DIR = '{model_dir}'", *extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(cache), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_starts_from_a_hub_id_and_an_unknown_one_fails_fast(offline_cache, tmp_path):
    cache, snap = offline_cache
    p = _train(tmp_path / "bad", cache, "--gin_param=train.init_params_from = 'owner/unknown'")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "train.init_params_from = 'owner/unknown' is not a local directory" in p.stderr
    assert "not in the local hub cache" in p.stderr and not (tmp_path / "bad").exists()

    run = tmp_path / "run"
    p = _train(run, cache, f"--gin_param=train.init_params_from = '{HUB_ID}'",
               "--gin_param=phijax.optim.warmup_linear_decay.peak_lr = 0.0")  # step 1 leaves the params as loaded
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"initialised parameters from {HUB_ID}" in p.stderr
    # lr 0: the saved step-1 parameters are the hub model's, exactly
    import jax
    _, want, _ = convert.read_hf(str(snap))
    _, got, _ = convert.load_orbax(str(run))
    assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x, np.float32), y), got, want))


def test_serve_takes_a_hub_id(offline_cache):
    """phijax.serve --model owner/name: weights and tokenizer from the hub cache."""
    from phijax.serve import server as serve_lib
    args = serve_lib.build_parser().parse_args(["--model", HUB_ID, "--max_len", "256", "--prefill_chunk", "64"])
    srv, engine = serve_lib.build(args)
    assert srv.model_name == HUB_ID and engine.model.cfg.vocab_size == VOCAB
    assert engine.model.tokenizer.encode("def f():") == srv.tok.encode("def f():") != []
