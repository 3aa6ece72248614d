"""phijax.convert against the real transformers PhiForCausalLM (small random models, CPU, fp32).

Parity: logits of load_hf(HF dir) vs transformers' eager forward, max |diff| <= 1e-4.
Round trips: HF -> phijax -> HF bit-identical (tensors, dtypes, logits); phijax init -> HF;
HF -> orbax export -> HF through the CLI; training checkpoints -> HF. Errors name the culprit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import torch
import transformers

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from phijax import convert  # noqa: E402
from phijax import model as model_lib  # noqa: E402
from phijax.config import PhiConfig, preset  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            initializer_range=0.1)
# name -> (HF PhiConfig kwargs, token batch shape)
CONFIGS = {
    "prf0.5_qkln": (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                         qk_layernorm=True, num_hidden_layers=3), (2, 17)),
    "prf0.4_gqa2_theta500": (dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                   "partial_rotary_factor": 0.4}, num_key_value_heads=2), (2, 33)),
    "prf1.0_eps1e-6": (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
                            layer_norm_eps=1e-6), (2, 24)),
}


def _hf_model(seed: int, **kw):
    torch.manual_seed(seed)
    cfg = transformers.PhiConfig(**{**BASE, **kw})
    cfg._attn_implementation = "eager"
    m = transformers.PhiForCausalLM(cfg).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): move them so their mapping is tested
        for name, p in m.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


def _random_params(cfg: PhiConfig, seed: int, std: float = 0.1) -> dict:
    """Random params of cfg's structure without model_lib.init (which compiles every initializer)."""
    _, abstract, _ = model_lib.abstract(cfg)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = std * rng.standard_normal(leaf.shape)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            x += 1.0
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _hf_logits(m, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _tokens(shape, vocab, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _read_dir_tensors(path: str) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="np") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, (k, a[k].dtype, b[k].dtype)
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k  # bitwise


def _load_hf_torch(path):
    return transformers.PhiForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    kw, shape = CONFIGS[name]
    hf = _hf_model(len(name), **kw)
    # One config goes through a sharded checkpoint (model.safetensors.index.json).
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if "gqa" in name else "2GB")
    if "gqa" in name:
        assert os.path.exists(tmp_path / convert.WEIGHTS_INDEX_FILE)
    model = convert.load_hf(str(tmp_path))
    assert model.cfg.rotary_dim == int(model.cfg.head_dim * kw["rope_parameters"]["partial_rotary_factor"])
    tokens = _tokens(shape, BASE["vocab_size"])
    ref = _hf_logits(hf, tokens)
    out = np.asarray(model(jnp.asarray(tokens)))
    assert out.shape == ref.shape
    diff = float(np.abs(out - ref).max())
    print(f"\n[{name}] max |logit diff| phijax vs transformers = {diff:.3g} (max |logit| {np.abs(ref).max():.3g})")
    assert diff <= TOL


# --------------------------------------------------------------------------- round trips


def test_hf_phijax_hf_bit_identical(tmp_path):
    kw, shape = CONFIGS["prf0.5_qkln"]
    hf = _hf_model(1, **kw)
    src, dst = tmp_path / "src", tmp_path / "dst"
    hf.save_pretrained(src)
    model = convert.load_hf(str(src))
    convert.save_hf(model, str(dst))
    _assert_same_tensors(_read_dir_tensors(str(src)), _read_dir_tensors(str(dst)))
    back = _load_hf_torch(dst)
    assert back.config.rope_parameters["partial_rotary_factor"] == 0.5
    assert back.config.qk_layernorm and back.config.hidden_act == "gelu_new"
    tokens = _tokens(shape, BASE["vocab_size"], seed=3)
    with torch.no_grad():
        a = hf(torch.as_tensor(tokens, dtype=torch.long)).logits
        b = back(torch.as_tensor(tokens, dtype=torch.long)).logits
    assert torch.equal(a, b)
    # Saving again (overwrite an existing model dir) is allowed; the result is unchanged.
    convert.save_hf(model, str(dst))
    _assert_same_tensors(_read_dir_tensors(str(src)), _read_dir_tensors(str(dst)))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_file_round_trip(tmp_path, dtype):
    """An fp16/bf16 file loads exactly into fp32 params and is written back in its own dtype."""
    cfg = preset("nano")
    params = _random_params(cfg, seed=2)
    src, dst = tmp_path / "src", tmp_path / "dst"
    convert.save_hf((cfg, params), str(src), dtype=dtype)
    original = _read_dir_tensors(str(src))
    assert {t.dtype.name for t in original.values()} == {dtype}
    model = convert.load_hf(str(src))
    _, loaded, _ = model_lib.split(model)
    assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype("float32")}
    assert convert.hf_meta_of(model).dtype == dtype
    # The upcast is exact: fp32 params cast back equal the file.
    assert np.array_equal(np.asarray(loaded["embed_tokens"]).astype(original["model.embed_tokens.weight"].dtype),
                          original["model.embed_tokens.weight"])
    convert.save_hf(model, str(dst))  # dtype=None: the remembered source dtype
    # The compute dtype is separate from the (exact, fp32) parameters.
    bf = convert.load_hf(str(src), dtype="bfloat16", attention="xla")
    assert (bf.cfg.dtype, bf.cfg.param_dtype) == ("bfloat16", "float32")
    assert bf.embed_tokens[...].dtype == jnp.float32
    _assert_same_tensors(original, _read_dir_tensors(str(dst)))
    with open(dst / "config.json") as f:
        assert json.load(f)["dtype"] == dtype


def test_phijax_init_to_transformers(tmp_path):
    # head_dim 44 with rotary_dim 30: 30/44 * 44 truncates to 29 in floating point, so the
    # written partial_rotary_factor must be nudged for transformers to rotate 30 features.
    cfg = PhiConfig(vocab_size=257, d_model=88, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=44, d_mlp=176,
                    max_len=64, rotary_dim=30, rope_base=1000.0, qk_layernorm=True, init_std=0.1)
    graphdef, params, _ = model_lib.split(model_lib.init(cfg, seed=5))
    # Move every weight off its init (LayerNorms at 1/0, zero biases) so each mapping is exercised.
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), params)
    model = model_lib.merge(graphdef, params)
    convert.save_hf(model, str(tmp_path / "hf"), max_shard_size=40_000)  # several shards + index
    assert os.path.exists(tmp_path / "hf" / convert.WEIGHTS_INDEX_FILE)
    hf = _load_hf_torch(tmp_path / "hf")
    assert hf.model.layers[0].self_attn.rotary_ndims == 30
    assert hf.config.num_key_value_heads == 1
    tokens = _tokens((2, 29), cfg.vocab_size, seed=7)
    ref = _hf_logits(hf, tokens)
    out = np.asarray(model(jnp.asarray(tokens)))
    diff = float(np.abs(out - ref).max())
    print(f"\n[phijax init -> HF] max |logit diff| = {diff:.3g} (max |logit| {np.abs(ref).max():.3g})")
    assert diff <= TOL
    # And back: phijax -> HF -> phijax is exact.
    cfg2, params2, _ = convert.read_hf(str(tmp_path / "hf"))
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert np.array_equal(np.asarray(a), b)


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    return env


def test_cli_round_trip_through_orbax_export(tmp_path):
    hf = _hf_model(4, **CONFIGS["prf0.4_gqa2_theta500"][0], bos_token_id=7, eos_token_id=8)
    src, exp, dst = tmp_path / "src", tmp_path / "export", tmp_path / "dst"
    hf.save_pretrained(src)
    # The real command line once (a subprocess costs a fresh jax/orbax import), then in process.
    r = subprocess.run([sys.executable, "-m", "phijax.convert", "hf-to-orbax", "--hf_dir", str(src), "--out", str(exp)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert convert.main(["orbax-to-hf", "--ckpt", str(exp), "--out", str(dst)]) == 0
    from phijax import checkpoint as ckpt_lib

    info = ckpt_lib.read_export_info(str(exp))
    assert PhiConfig.from_dict(info["config"]) == convert.load_hf(str(src)).cfg
    _assert_same_tensors(_read_dir_tensors(str(src)), _read_dir_tensors(str(dst)))
    with open(dst / "config.json") as f:
        out_cfg = json.load(f)
    assert (out_cfg["bos_token_id"], out_cfg["eos_token_id"]) == (7, 8)
    tokens = _tokens((2, 19), BASE["vocab_size"], seed=9)
    assert np.array_equal(_hf_logits(hf, tokens), _hf_logits(_load_hf_torch(dst), tokens))

    # A bfloat16 export (in process) converts back to a bf16 HF checkpoint that rounds the source.
    bf_exp, bf_dst = tmp_path / "export_bf16", tmp_path / "dst_bf16"
    assert convert.main(["hf-to-orbax", "--hf_dir", str(src), "--out", str(bf_exp), "--dtype", "bfloat16"]) == 0
    assert ckpt_lib.read_export_info(str(bf_exp))["dtype"] == "bfloat16"
    assert convert.main(["orbax-to-hf", "--ckpt", str(bf_exp), "--out", str(bf_dst)]) == 0
    a, b = _read_dir_tensors(str(src)), _read_dir_tensors(str(bf_dst))
    assert {t.dtype.name for t in b.values()} == {"bfloat16"}
    for k in a:
        assert np.array_equal(a[k].astype(b[k].dtype), b[k]), k


def test_training_checkpoint_to_hf(tmp_path):
    from phijax import checkpoint as ckpt_lib

    cfg = preset("nano", qk_layernorm=True)
    ckdir = tmp_path / "model_dir" / "checkpoints"
    steps = {}
    with ckpt_lib.Checkpointer(str(ckdir), save_interval_steps=1, async_save=False) as ck:
        for step, seed in ((10, 1), (20, 2)):
            params = _random_params(cfg, seed=seed)
            state = {"params": params, "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)},
                     "step": jnp.int32(step)}
            ck.save(step, state, data_state={"step": step}, meta={"model": cfg.to_dict()}, force=True)
            steps[step] = params
        ck.wait_until_finished()
    # MODEL_DIR/checkpoints (newest step), a given --step, and MODEL_DIR itself.
    for ckpt, extra, step in ((ckdir, [], 20), (ckdir, ["--step", "10"], 10), (ckdir.parent, [], 20)):
        out = tmp_path / f"hf{step}_{len(extra)}_{ckpt.name}"
        assert convert.main(["orbax-to-hf", "--ckpt", str(ckpt), "--out", str(out), *extra]) == 0
        got_cfg, got, _ = convert.read_hf(str(out))
        assert got_cfg == cfg
        for a, b in zip(jax.tree.leaves(steps[step]), jax.tree.leaves(got)):
            assert np.array_equal(np.asarray(a), b)
    assert convert.main(["orbax-to-hf", "--ckpt", str(ckdir), "--out", str(tmp_path / "x"), "--step", "5"]) == 2
    assert convert.main(["orbax-to-hf", "--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2


# --------------------------------------------------------------------------- configs


PHI1_CONFIG_JSON = {  # the layout of microsoft/phi-1's config.json (transformers 4.37, top-level rope fields)
    "_name_or_path": "microsoft/phi-1", "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0,
    "bos_token_id": None, "embd_pdrop": 0.0, "eos_token_id": None, "hidden_act": "gelu_new", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
    "model_type": "phi", "num_attention_heads": 32, "num_hidden_layers": 24, "num_key_value_heads": None,
    "partial_rotary_factor": 0.5, "qk_layernorm": False, "resid_pdrop": 0.0, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.37.0",
    "use_cache": True, "vocab_size": 51200,
}


def test_config_from_old_and_new_layouts():
    assert convert.config_from_hf(PHI1_CONFIG_JSON) == preset("phi1")
    v5 = transformers.PhiConfig(**{**BASE, **CONFIGS["prf0.4_gqa2_theta500"][0]}).to_dict()
    cfg = convert.config_from_hf(v5)
    assert (cfg.rotary_dim, cfg.rope_base, cfg.kv_heads) == (6, 500.0, 2)
    # rope_parameters wins over top-level fields, as in transformers v5.
    both = dict(PHI1_CONFIG_JSON, rope_parameters={"rope_type": "default", "rope_theta": 99.0,
                                                   "partial_rotary_factor": 0.25})
    assert (convert.config_from_hf(both).rotary_dim, convert.config_from_hf(both).rope_base) == (16, 99.0)
    # config_to_hf -> transformers -> config_from_hf is the identity for every preset.
    for name in ("phi1", "phi1_small", "tiny", "nano"):
        hf_dict = convert.config_to_hf(preset(name))
        loaded = transformers.PhiConfig.from_dict(hf_dict).to_dict()
        assert convert.config_from_hf(loaded) == preset(name), name
        assert convert.config_from_hf(hf_dict) == preset(name), name


def test_partial_rotary_factor_truncates_back():
    for head_dim in range(2, 257):
        for rotary_dim in range(2, head_dim + 1, 2):
            f = convert._partial_rotary_factor(rotary_dim, head_dim)
            assert int(head_dim * f) == rotary_dim, (head_dim, rotary_dim, f)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "relu", "hidden_act"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, "rope_type"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("partial_rotary_factor", 0.3, "partial_rotary_factor"),  # int(64 * 0.3) = 19: odd
    ("head_dim", 32, "head_dim"),
    ("num_key_value_heads", 5, "num_key_value_heads"),
    ("model_type", "phi3", "model_type"),
])
def test_unsupported_hf_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        convert.config_from_hf(dict(PHI1_CONFIG_JSON, **{field: value}))


def test_config_to_hf_rejects_unrepresentable():
    with pytest.raises(ValueError, match="head_dim"):
        convert.config_to_hf(preset("nano", head_dim=32))


# --------------------------------------------------------------------------- tensor errors


@pytest.fixture(scope="module")
def nano_state():
    cfg = preset("nano", qk_layernorm=True)
    return cfg, convert.params_to_hf_state(cfg, _random_params(cfg, seed=0))


def test_missing_unexpected_and_wrong_shape_tensors(nano_state):
    cfg, state = nano_state
    convert.params_from_hf_state(cfg, state)  # the intact state converts
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_layernorm.bias"}
    with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.layers\.1\.self_attn\.k_layernorm\.bias"):
        convert.params_from_hf_state(cfg, missing)
    extra = dict(state, **{"model.layers.2.mlp.fc1.weight": state["model.layers.0.mlp.fc1.weight"]})
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): model\.layers\.2\.mlp\.fc1\.weight"):
        convert.params_from_hf_state(cfg, extra)
    wrong = dict(state, **{"lm_head.weight": state["lm_head.weight"][:, :-1]})
    with pytest.raises(ValueError, match=r"lm_head\.weight has shape \(256, 63\), expected \(256, 64\)"):
        convert.params_from_hf_state(cfg, wrong)
    # A stale rotary cache from old exports is ignored.
    convert.params_from_hf_state(cfg, dict(state, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4)}))


def test_load_hf_errors_name_the_tensor(tmp_path, nano_state):
    cfg, state = nano_state
    convert.save_hf((cfg, convert.params_from_hf_state(cfg, state)), str(tmp_path / "ok"))
    broken = tmp_path / "broken"
    os.makedirs(broken)
    os.link(tmp_path / "ok" / "config.json", broken / "config.json")
    save_file({k: v for k, v in state.items() if k != "model.final_layernorm.bias"},
              str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="model.final_layernorm.bias"):
        convert.load_hf(str(broken))
    save_file(dict(state, **{"model.embed_tokens.weight": np.zeros((255, 64), np.float32)}),
              str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight has shape \(255, 64\)"):
        convert.load_hf(str(broken))
    with open(broken / "config.json") as f:
        d = json.load(f)
    os.remove(broken / "config.json")
    with open(broken / "config.json", "w") as f:
        json.dump(dict(d, hidden_act="relu"), f)
    with pytest.raises(ValueError, match="hidden_act"):
        convert.load_hf(str(broken))
    with pytest.raises(FileNotFoundError):
        convert.load_hf(str(tmp_path / "nowhere"))


def test_save_hf_refuses_to_clobber_other_directories(tmp_path, nano_state):
    cfg, state = nano_state
    params = convert.params_from_hf_state(cfg, state)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        convert.save_hf((cfg, params), str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    convert.save_hf((cfg, params), str(tmp_path / "m"))
    with pytest.raises(FileExistsError):
        convert.save_hf((cfg, params), str(tmp_path / "m"), overwrite=False)
