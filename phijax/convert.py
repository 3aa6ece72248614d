"""Hugging Face `PhiForCausalLM` <-> phijax conversion (safetensors + config.json, no torch).

Pure mapping::

    config_from_hf(hf_config: dict) -> PhiConfig        config_to_hf(cfg) -> dict
    params_from_hf_state(cfg, tensors) -> params        params_to_hf_state(cfg, params) -> tensors

Files::

    load_hf(path, dtype=None) -> phijax.model.Phi        (reads config.json + *.safetensors)
    read_hf(path) -> (cfg, numpy params, HFMeta)           (the same without building a model)
    save_hf(model or (cfg, params), path, dtype=None)      (atomic; sharded over max_shard_size)
    resolve_model_dir(path_or_hub_id) -> local directory

Wherever phijax reads a Hugging Face directory (read_hf/load_hf, the CLI's --hf_dir,
decode.load_for_inference, evaluate.model_path, train.init_params_from), a hub id such as
`microsoft/phi-1` (or `microsoft/phi-1@<revision>`) that is not an existing path works too:
`resolve_model_dir` finds it through huggingface_hub's cache (HF_HUB_CACHE / HF_HOME; with
HF_HUB_OFFLINE=1 only the cache is looked at, otherwise missing files are downloaded).

CLI::

    python -m phijax.convert hf-to-orbax --hf_dir D --out_dir DIR [--dtype bfloat16]
    python -m phijax.convert orbax-to-hf --ckpt DIR --out_dir D [--dtype float16] [--step N]

`--ckpt` is either an `export_params` directory (`export_info.json` + `params/`) or a training
checkpoint directory (`MODEL_DIR/checkpoints`, steps written by `phijax.checkpoint.Checkpointer`;
the newest committed step unless `--step`).

Layouts. A torch Linear weight is [out, in]; phijax kernels are [in..., out...] with the head
axes split out (q/k/v kernel [D, H, Dh], dense kernel [H, Dh, D]), and per-layer tensors are
stacked on a leading `layers` axis. Every conversion is a transpose/reshape/stack, so fp32 values
are copied exactly; a float16/bfloat16 file is upcast exactly to the model's `param_dtype`, and
the source dtype is remembered (`HFMeta.dtype`, kept on the loaded model) so that `save_hf` writes
the same dtype back: HF -> phijax -> HF is bit-identical.

transformers' Phi computes its rotary width as `int(head_dim * partial_rotary_factor)`; we read it
the same way and, when writing, pick the float whose product truncates back to `rotary_dim`
(`rotary_dim / head_dim` itself does not always, e.g. 30/44).

No torch or tensorflow import here; orbax is imported only by the CLI's orbax side.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
from typing import Any, Iterable, Mapping

import numpy as np

from phijax.config import PhiConfig
from phijax.util import files

__all__ = [
    "HFMeta",
    "config_from_hf",
    "config_to_hf",
    "params_from_hf_state",
    "params_to_hf_state",
    "hf_tensor_shapes",
    "read_hf",
    "load_hf",
    "save_hf",
    "hf_meta_of",
    "resolve_model_dir",
    "main",
]

log = logging.getLogger("phijax.convert")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
HF_META_FILE = "hf_source.json"  # written next to an orbax export by hf-to-orbax
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3  # bytes
# What resolve_model_dir fetches of a hub repository: config, weights, tokenizer (not *.bin, not ONNX, ...).
HUB_FILES = (CONFIG_FILE, "*.safetensors", WEIGHTS_INDEX_FILE, "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")
# owner/name[@revision]: a path like '/x/y', './x/y', 'gs://b/x' or 'a/b/c' is never taken for one.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")

# Activations that equal phijax.model.gelu_new (the tanh approximation of GELU).
SUPPORTED_ACTS = ("gelu_new", "gelu_pytorch_tanh")
# Tensors a Phi checkpoint may carry that are not parameters (old exports saved the rotary cache).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------- dtypes


def _np_dtype(dtype) -> np.dtype:
    """numpy dtype for a name/dtype, bfloat16 included (ml_dtypes, shipped with jax)."""
    if dtype is None:
        raise ValueError("dtype must not be None here")
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in ("bfloat16", "bf16"):
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32"}
        return np.dtype(aliases.get(name, name))
    try:
        return np.dtype(dtype)
    except TypeError:  # e.g. a jnp scalar type
        import jax.numpy as jnp

        return np.dtype(jnp.dtype(dtype))


_FLOAT_NAMES = ("float32", "float16", "bfloat16", "float64")


def _check_float_dtype(dtype, what: str) -> np.dtype:
    d = _np_dtype(dtype)
    if d.name not in _FLOAT_NAMES:
        raise ValueError(f"{what}={d.name!r} is not supported; use one of {list(_FLOAT_NAMES[:3])}")
    return d


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class HFMeta:
    """What a Hugging Face checkpoint carries besides PhiConfig (restored by save_hf)."""

    dtype: str | None = None  # the tensors' dtype on disk
    hidden_act: str = "gelu_new"
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str | None) -> "HFMeta":
        if not s:
            return cls()
        d = json.loads(s)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _rope_settings(hf: Mapping[str, Any]) -> tuple[str, float, float]:
    """(rope_type, rope_theta, partial_rotary_factor) from a v5 (`rope_parameters`) or older
    (top-level `rope_theta` / `partial_rotary_factor` / `rope_scaling`) config; v5 wins."""
    rp = hf.get("rope_parameters")
    if rp is not None and not isinstance(rp, Mapping):
        raise ValueError(f"unsupported Hugging Face config: rope_parameters={rp!r} is not a dict")
    rp = dict(rp or {})
    if rp and not ({"rope_type", "type", "rope_theta", "partial_rotary_factor"} & set(rp)):
        raise ValueError(f"unsupported Hugging Face config: rope_parameters={rp!r} "
                         "(per-layer-type rope parameters are not used by Phi)")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, Mapping):
            raise ValueError(f"unsupported Hugging Face config: rope_scaling={scaling!r}")
        s_type = scaling.get("rope_type", scaling.get("type", "default"))
        if s_type != "default":
            raise ValueError(f"unsupported Hugging Face config: rope_scaling={dict(scaling)!r} "
                             "(phijax implements plain RoPE only)")
    if rope_type != "default":
        raise ValueError(f"unsupported Hugging Face config: rope_parameters.rope_type={rope_type!r} "
                         "(phijax implements plain RoPE only, rope_type 'default')")
    extra = sorted(set(rp) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if extra:
        raise ValueError(f"unsupported Hugging Face config: rope_parameters has {extra} "
                         "(phijax implements plain RoPE only)")
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    prf = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    return rope_type, float(theta), float(prf)


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> PhiConfig:
    """PhiConfig for a Hugging Face Phi `config.json` dict (v5 or older layout).

    `overrides` replace PhiConfig fields that HF does not carry (dtype, param_dtype,
    remat_policy, attention, ...). Raises ValueError naming the field of an HF config that
    phijax cannot reproduce exactly.
    """
    hf = dict(hf_config)

    def bad(field, why):
        return ValueError(f"unsupported Hugging Face config: {field}={hf.get(field)!r} ({why})")

    model_type = hf.get("model_type", "phi")
    if model_type != "phi":
        raise bad("model_type", "only transformers' 'phi' (PhiForCausalLM) is supported")
    act = hf.get("hidden_act", "gelu_new")
    if act not in SUPPORTED_ACTS:
        raise bad("hidden_act", f"phijax uses the tanh GELU; supported: {list(SUPPORTED_ACTS)}")
    if hf.get("tie_word_embeddings", False):
        raise bad("tie_word_embeddings", "phi has an untied lm_head with a bias")
    d_model = int(hf.get("hidden_size", 2048))
    n_heads = int(hf.get("num_attention_heads", 32))
    if n_heads <= 0 or d_model % n_heads:
        raise bad("num_attention_heads", f"hidden_size={d_model} must be a multiple of it")
    head_dim = d_model // n_heads
    if hf.get("head_dim") not in (None, head_dim):
        raise bad("head_dim", f"transformers' Phi requires head_dim == hidden_size // num_attention_heads "
                              f"= {head_dim}")
    kv = hf.get("num_key_value_heads")
    kv = n_heads if kv is None else int(kv)
    if kv <= 0 or n_heads % kv:
        raise bad("num_key_value_heads", f"must divide num_attention_heads={n_heads}")
    _, theta, prf = _rope_settings(hf)
    rotary_dim = int(head_dim * prf)  # exactly as transformers' PhiAttention.rotary_ndims
    if not 0 < prf <= 1.0 or rotary_dim % 2 or rotary_dim <= 0:
        raise ValueError(f"unsupported Hugging Face config: partial_rotary_factor={prf!r} gives "
                         f"int(head_dim * partial_rotary_factor) = {rotary_dim} rotary features for "
                         f"head_dim={head_dim}; it must be even and in [2, head_dim]")
    for field in ("resid_pdrop", "embd_pdrop", "attention_dropout"):
        v = hf.get(field) or 0.0
        if not 0.0 <= float(v) < 1.0:
            raise bad(field, "must be in [0, 1)")
    fields = dict(
        vocab_size=int(hf.get("vocab_size", 51200)),
        d_model=d_model,
        n_layers=int(hf.get("num_hidden_layers", 24)),
        n_heads=n_heads,
        n_kv_heads=None if kv == n_heads else kv,
        head_dim=head_dim,
        d_mlp=int(hf.get("intermediate_size", 8192)),
        max_len=int(hf.get("max_position_embeddings", 2048)),
        rotary_dim=rotary_dim,
        rope_base=theta,
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        qk_layernorm=bool(hf.get("qk_layernorm", False)),
        embd_dropout=float(hf.get("embd_pdrop") or 0.0),
        attn_dropout=float(hf.get("attention_dropout") or 0.0),
        resid_dropout=float(hf.get("resid_pdrop") or 0.0),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return PhiConfig(**fields)


def hf_meta_from_config(hf_config: Mapping[str, Any]) -> HFMeta:
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if dtype is not None:
        dtype = str(dtype).removeprefix("torch.")
    return HFMeta(dtype=dtype, hidden_act=hf_config.get("hidden_act", "gelu_new"),
                  bos_token_id=hf_config.get("bos_token_id"), eos_token_id=hf_config.get("eos_token_id"),
                  pad_token_id=hf_config.get("pad_token_id"))


def _partial_rotary_factor(rotary_dim: int, head_dim: int) -> float:
    """The float f closest to rotary_dim/head_dim with int(head_dim * f) == rotary_dim."""
    f = rotary_dim / head_dim
    while int(head_dim * f) < rotary_dim:
        f = math.nextafter(f, math.inf)
    return f


def config_to_hf(cfg: PhiConfig, *, dtype=None, meta: HFMeta | None = None) -> dict:
    """A transformers `PhiConfig` dict (config.json) for `cfg`.

    Writes rope settings both as v5 `rope_parameters` and as the older top-level
    `partial_rotary_factor` / `rope_theta` (transformers v5 prefers the former).
    """
    meta = meta or HFMeta()
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise ValueError(f"cannot express this model as a transformers Phi: n_heads * head_dim = "
                         f"{cfg.n_heads} * {cfg.head_dim} != d_model = {cfg.d_model} "
                         "(transformers' Phi sizes its q/k LayerNorms as hidden_size // num_attention_heads)")
    if cfg.rotary_dim <= 0:
        raise ValueError("cannot express rotary_dim=0 as a transformers Phi (partial_rotary_factor must be > 0)")
    act = meta.hidden_act if meta.hidden_act in SUPPORTED_ACTS else "gelu_new"
    dtype_name = _np_dtype(dtype).name if dtype is not None else (meta.dtype or cfg.param_dtype)
    prf = _partial_rotary_factor(cfg.rotary_dim, cfg.head_dim)
    theta = float(cfg.rope_base)
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "resid_pdrop": cfg.resid_dropout,
        "embd_pdrop": cfg.embd_dropout,
        "attention_dropout": cfg.attn_dropout,
        "hidden_act": act,
        "max_position_embeddings": cfg.max_len,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps,
        "use_cache": True,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": prf},
        "partial_rotary_factor": prf,
        "rope_theta": theta,
        "qk_layernorm": cfg.qk_layernorm,
        "bos_token_id": meta.bos_token_id,
        "eos_token_id": meta.eos_token_id,
        "pad_token_id": meta.pad_token_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


# --------------------------------------------------------------------------- tensor mapping

# (HF name suffix, phijax path under the stacked 'layers' tree, kind). Kinds:
#   vec: same layout; lin: torch Linear [out, in] -> kernel [in, out];
#   qkv: [heads*Dh, D] -> [D, heads, Dh]; qkv_b: [heads*Dh] -> [heads, Dh];
#   out: [D, H*Dh] -> [H, Dh, D].
_LAYER_SPECS = (
    ("input_layernorm.weight", ("input_layernorm", "scale"), "vec"),
    ("input_layernorm.bias", ("input_layernorm", "bias"), "vec"),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), "qkv"),
    ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), "qkv_b"),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), "qkv"),
    ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), "qkv_b"),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), "qkv"),
    ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), "qkv_b"),
    ("self_attn.dense.weight", ("self_attn", "dense", "kernel"), "out"),
    ("self_attn.dense.bias", ("self_attn", "dense", "bias"), "vec"),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "lin"),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), "vec"),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "lin"),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), "vec"),
)
_QK_LN_SPECS = (
    ("self_attn.q_layernorm.weight", ("self_attn", "q_layernorm", "scale"), "vec"),
    ("self_attn.q_layernorm.bias", ("self_attn", "q_layernorm", "bias"), "vec"),
    ("self_attn.k_layernorm.weight", ("self_attn", "k_layernorm", "scale"), "vec"),
    ("self_attn.k_layernorm.bias", ("self_attn", "k_layernorm", "bias"), "vec"),
)
_GLOBAL_SPECS = (
    ("model.embed_tokens.weight", ("embed_tokens",), "vec"),
    ("model.final_layernorm.weight", ("final_layernorm", "scale"), "vec"),
    ("model.final_layernorm.bias", ("final_layernorm", "bias"), "vec"),
    ("lm_head.weight", ("lm_head", "kernel"), "lin"),
    ("lm_head.bias", ("lm_head", "bias"), "vec"),
)


def _layer_specs(cfg: PhiConfig):
    return _LAYER_SPECS + (_QK_LN_SPECS if cfg.qk_layernorm else ())


def hf_tensor_shapes(cfg: PhiConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a transformers PhiForCausalLM state dict and its shape."""
    d, h, kv, dh, f, v = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_mlp, cfg.vocab_size
    layer = {
        "input_layernorm.weight": (d,), "input_layernorm.bias": (d,),
        "self_attn.q_proj.weight": (h * dh, d), "self_attn.q_proj.bias": (h * dh,),
        "self_attn.k_proj.weight": (kv * dh, d), "self_attn.k_proj.bias": (kv * dh,),
        "self_attn.v_proj.weight": (kv * dh, d), "self_attn.v_proj.bias": (kv * dh,),
        "self_attn.dense.weight": (d, h * dh), "self_attn.dense.bias": (d,),
        "mlp.fc1.weight": (f, d), "mlp.fc1.bias": (f,),
        "mlp.fc2.weight": (d, f), "mlp.fc2.bias": (d,),
    }
    if cfg.qk_layernorm:
        for n in ("q_layernorm", "k_layernorm"):
            layer[f"self_attn.{n}.weight"] = (dh,)
            layer[f"self_attn.{n}.bias"] = (dh,)
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg.n_layers):
        for suffix, shape in layer.items():
            shapes[f"model.layers.{i}.{suffix}"] = shape
    shapes.update({"model.final_layernorm.weight": (d,), "model.final_layernorm.bias": (d,),
                   "lm_head.weight": (v, d), "lm_head.bias": (v,)})
    return shapes


def _to_phijax(x: np.ndarray, kind: str, cfg: PhiConfig) -> np.ndarray:
    if kind == "vec":
        return x
    if kind == "lin":
        return x.T
    if kind == "qkv":
        return x.T.reshape(x.shape[1], x.shape[0] // cfg.head_dim, cfg.head_dim)
    if kind == "qkv_b":
        return x.reshape(x.shape[0] // cfg.head_dim, cfg.head_dim)
    if kind == "out":
        return x.T.reshape(cfg.n_heads, cfg.head_dim, x.shape[0])
    raise AssertionError(kind)


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "vec":
        y = x
    elif kind == "lin":
        y = x.T
    elif kind == "qkv":  # [D, H, Dh] -> [H*Dh, D]
        y = x.reshape(x.shape[0], -1).T
    elif kind == "qkv_b":
        y = x.reshape(-1)
    elif kind == "out":  # [H, Dh, D] -> [D, H*Dh]
        y = x.reshape(-1, x.shape[-1]).T
    else:
        raise AssertionError(kind)
    return np.ascontiguousarray(y)


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _list(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def params_from_hf_state(cfg: PhiConfig, tensors: Mapping[str, Any], dtype=None) -> dict:
    """phijax params (nested dict of numpy arrays, layers stacked) from an HF state dict.

    `tensors` maps HF names to arrays (numpy or anything np.asarray accepts). Values are
    copied exactly; `dtype` (default: keep the source dtype) casts floating tensors.
    Raises ValueError naming every missing, unexpected or wrong-shape tensor.
    """
    expected = hf_tensor_shapes(cfg)
    given = {k for k in tensors if not k.endswith(_IGNORED_SUFFIXES)}
    problems = []
    missing = set(expected) - given
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_list(missing)}")
    unexpected = given - set(expected)
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_list(unexpected)}")
    wrong = []
    for name in sorted(set(expected) & given):
        shape = _shape(tensors, name)
        if shape != expected[name]:
            wrong.append(f"{name} has shape {shape}, expected {expected[name]}")
    if wrong:
        problems.append(f"wrong-shape tensors ({len(wrong)}): " + "; ".join(wrong[:12])
                        + (f" ... and {len(wrong) - 12} more" if len(wrong) > 12 else ""))
    if problems:
        raise ValueError("Hugging Face state dict does not match the phi config "
                         f"(d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
                         f"kv_heads={cfg.kv_heads}, d_mlp={cfg.d_mlp}, vocab={cfg.vocab_size}, "
                         f"qk_layernorm={cfg.qk_layernorm}): " + " | ".join(problems))
    target = _check_float_dtype(dtype, "dtype") if dtype is not None else None

    def fetch(name):
        x = np.asarray(tensors[name])
        if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
            raise ValueError(f"tensor {name} has non-float dtype {x.dtype.name}")
        return x

    def cast(x):
        return x if target is None or x.dtype == target else x.astype(target)

    params: dict = {}
    for name, path, kind in _GLOBAL_SPECS:
        # A copy: the result never aliases the (memory-mapped) file.
        _set(params, path, np.array(cast(_to_phijax(fetch(name), kind, cfg)), order="C", copy=True))
    for suffix, path, kind in _layer_specs(cfg):
        first = _to_phijax(fetch(f"model.layers.0.{suffix}"), kind, cfg)
        out = np.empty((cfg.n_layers,) + first.shape, dtype=target or first.dtype)
        for i in range(cfg.n_layers):
            out[i] = _to_phijax(fetch(f"model.layers.{i}.{suffix}"), kind, cfg)  # exact (up)cast
        _set(params, ("layers",) + path, out)
    return params


def _host(x) -> np.ndarray:
    """A numpy copy of a (possibly sharded, possibly multi-host) array."""
    if isinstance(x, np.ndarray):
        return x
    try:
        import jax
    except ImportError:  # pragma: no cover
        return np.asarray(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def params_to_hf_state(cfg: PhiConfig, params: Mapping, dtype=None) -> dict[str, np.ndarray]:
    """HF state dict {name: contiguous numpy array} for phijax params (pure nested dict).

    `dtype` (default: keep the params' dtype) casts every tensor.
    """
    target = _check_float_dtype(dtype, "dtype") if dtype is not None else None

    def cast(x):
        return x if target is None or x.dtype == target else x.astype(target)

    shapes = hf_tensor_shapes(cfg)
    out: dict[str, np.ndarray] = {}

    def lookup(path):
        try:
            return _host(_get(params, path))
        except (KeyError, TypeError):
            raise ValueError(f"params have no '{'/'.join(path)}' (expected for {cfg.shape_dict()})") from None

    def put(name, arr):
        if tuple(arr.shape) != shapes[name]:
            raise ValueError(f"param for {name} converts to shape {tuple(arr.shape)}, expected {shapes[name]}")
        out[name] = arr

    for name, path, kind in _GLOBAL_SPECS[:3]:
        put(name, _to_hf(cast(lookup(path)), kind))
    for suffix, path, kind in _layer_specs(cfg):
        stacked = lookup(("layers",) + path)
        if stacked.shape[0] != cfg.n_layers:
            raise ValueError(f"params 'layers/{'/'.join(path)}' has {stacked.shape[0]} layers, expected {cfg.n_layers}")
        for i in range(cfg.n_layers):
            put(f"model.layers.{i}.{suffix}", _to_hf(cast(stacked[i]), kind))
    for name, path, kind in _GLOBAL_SPECS[3:]:
        put(name, _to_hf(cast(lookup(path)), kind))
    return out


# --------------------------------------------------------------------------- files


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class _LazyTensors(Mapping):
    """{name: array} over safetensors files, read one tensor at a time (memory-mapped), so a
    1.3B-parameter checkpoint is never held twice in host memory while it is being stacked."""

    def __init__(self, files: dict[str, list[str] | None]):
        from safetensors import safe_open

        self._handles = []
        self._where: dict[str, Any] = {}
        for fpath, names in files.items():
            h = safe_open(fpath, framework="np")
            self._handles.append(h)
            keys = set(h.keys())
            if names is not None:
                absent = [n for n in names if n not in keys]
                if absent:
                    raise ValueError(f"missing tensors: {_list(absent)} (listed in {WEIGHTS_INDEX_FILE} "
                                     f"under {os.path.basename(fpath)}, not in the file)")
                keys = names
            for k in keys:
                self._where[k] = h

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        d = self._where[name].get_slice(name).get_dtype()
        return _ST_DTYPES.get(d, d.lower())


def _shape(tensors: Mapping, name: str) -> tuple[int, ...]:
    return tensors.shape(name) if isinstance(tensors, _LazyTensors) else tuple(np.shape(tensors[name]))


def resolve_model_dir(path_or_id: str) -> str:
    """A local directory for `path_or_id`: an existing path is returned unchanged; a Hugging Face
    hub id (`owner/name`, optionally `owner/name@revision`) that is not one is resolved through
    huggingface_hub's cache (`snapshot_download` of config, safetensors and tokenizer files:
    offline, with HF_HUB_OFFLINE=1, the cached snapshot; online, a download of what is missing).
    Anything else is returned unchanged, for the caller to report as a missing directory.

    Raises ValueError naming the id, the cache directory and what to do when it cannot be resolved.
    """
    path_or_id = os.fspath(path_or_id)
    m = _HUB_ID.fullmatch(path_or_id)
    if m is None or os.path.exists(path_or_id):
        return path_or_id
    repo, revision = m.group("repo"), m.group("revision")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise ValueError(f"{path_or_id!r} is not a local directory, and reading it as a Hugging Face hub id "
                         "needs huggingface_hub (pip install huggingface_hub)") from None
    cache = constants.HF_HUB_CACHE
    try:
        return huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES))
    except Exception as e:  # not cached / offline / unknown repo or revision / no connection: one message
        where = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else " and could not be downloaded"
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path_or_id!r} is not a local directory and the Hugging Face hub model {repo}"
            f"{'@' + revision if revision else ''} is not in the local hub cache {cache}{where} "
            f"({type(e).__name__}: {why}); download it with `hf download {repo}"
            f"{' --revision ' + revision if revision else ''}` (older huggingface_hub: `huggingface-cli download`) "
            "on a machine with internet and copy the cache, "
            "or point HF_HUB_CACHE (or HF_HOME) at a cache that has it") from None


def _read_hf_tensors(path: str) -> _LazyTensors:
    single = os.path.join(path, WEIGHTS_FILE)
    index = os.path.join(path, WEIGHTS_INDEX_FILE)
    if os.path.exists(single):
        return _LazyTensors({single: None})
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(os.path.join(path, fname), []).append(name)
        for fpath in by_file:
            if not os.path.exists(fpath):
                raise ValueError(f"shard {os.path.basename(fpath)} listed in {WEIGHTS_INDEX_FILE} is missing "
                                 f"from {path}")
        return _LazyTensors(by_file)
    others = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.exists(os.path.join(path, n))]
    hint = f" (found {others}: re-save with safe_serialization=True)" if others else ""
    raise FileNotFoundError(f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {path}{hint}")


def _source_dtype(tensors: Mapping) -> str | None:
    if isinstance(tensors, _LazyTensors):
        names = {tensors.dtype_name(k) for k in tensors}
    else:
        names = {np.asarray(t).dtype.name for t in tensors.values()}
    return names.pop() if len(names) == 1 else None


def read_hf(path: str, *, cast_to=None, **overrides) -> tuple[PhiConfig, dict, HFMeta]:
    """(PhiConfig, params as numpy arrays, HFMeta) from a transformers Phi directory.

    `path` may be a hub id (`resolve_model_dir`). `cast_to` casts the params (default: keep the
    file's dtype); `overrides` go to `config_from_hf` (e.g. dtype, param_dtype, attention, remat_policy).
    """
    path = resolve_model_dir(path)
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    cfg = config_from_hf(hf_cfg, **overrides)
    tensors = _read_hf_tensors(path)
    meta = hf_meta_from_config(hf_cfg)
    meta = dataclasses.replace(meta, dtype=_source_dtype(tensors) or meta.dtype)
    params = params_from_hf_state(cfg, tensors, dtype=cast_to)
    return cfg, params, meta


def hf_meta_of(model) -> HFMeta:
    """The HFMeta remembered by `load_hf` on a model (defaults for any other model)."""
    return HFMeta.from_json(getattr(model, "hf_meta", None))


def load_hf(path: str, dtype=None, *, param_dtype="float32", **overrides):
    """A `phijax.model.Phi` with the weights of a transformers Phi checkpoint directory (or hub id).

    `dtype` is the compute dtype (PhiConfig.dtype, default float32); parameters are kept in
    `param_dtype` (default float32: fp32/fp16/bf16 files load exactly). The file's dtype and
    token ids are kept on the model (`hf_meta_of(model)`) for `save_hf`.
    """
    import jax.numpy as jnp

    from phijax import model as model_lib

    if dtype is not None:
        overrides["dtype"] = _np_dtype(dtype).name
    overrides["param_dtype"] = _check_float_dtype(param_dtype, "param_dtype").name
    cfg, params, meta = read_hf(path, cast_to=overrides["param_dtype"], **overrides)
    graphdef, _, _ = model_lib.abstract(cfg)
    model = model_lib.merge(graphdef, _tree_map(jnp.asarray, params))
    model.hf_meta = meta.to_json()  # a static (hashable) attribute
    return model


def _tree_map(fn, tree):
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _unwrap_params(params):
    """A pure nested dict from an nnx.State / dict with {'value': x} leaves / pure dict."""
    try:
        from flax import nnx

        if isinstance(params, nnx.State):
            return nnx.to_pure_dict(params)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(params, Mapping):
        if set(params) == {"value"} and not isinstance(params["value"], Mapping):
            return params["value"]
        return {k: _unwrap_params(v) for k, v in params.items()}
    return params


def _shard(tensors: dict[str, np.ndarray], max_shard_size: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    return shards


def _looks_replaceable(path: str) -> bool:
    """An existing directory save_hf may replace: empty or a model directory."""
    entries = os.listdir(path)
    return not entries or CONFIG_FILE in entries or any(e.endswith(".safetensors") for e in entries)


def save_hf(model_or_cfg_params, path: str, dtype=None, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
            meta: HFMeta | None = None, overwrite: bool = True) -> str:
    """Writes a transformers-loadable Phi checkpoint (config.json + safetensors) to `path`.

    `model_or_cfg_params`: a `phijax.model.Phi`, or `(PhiConfig, params)` with params a pure
    nested dict (or nnx.State). `dtype`: tensor dtype on disk; default: the dtype the model was
    loaded from (`load_hf`), else the params' dtype. Over `max_shard_size` bytes the weights are
    split into `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`.

    Atomic: everything is written to a temporary sibling directory that is renamed to `path`
    at the end (an existing model directory at `path` is replaced only after that succeeds).
    Returns `path`.
    """
    if isinstance(model_or_cfg_params, tuple):
        cfg, params = model_or_cfg_params
        params = _unwrap_params(params)
        src_meta = HFMeta()
    else:
        from phijax import model as model_lib

        cfg = model_or_cfg_params.cfg
        _, params, _ = model_lib.split(model_or_cfg_params)
        src_meta = hf_meta_of(model_or_cfg_params)
    if not isinstance(cfg, PhiConfig):
        raise TypeError(f"expected a PhiConfig, got {type(cfg).__name__}")
    meta = meta or src_meta
    if dtype is None and meta.dtype in _FLOAT_NAMES[:3]:
        dtype = meta.dtype
    tensors = params_to_hf_state(cfg, params, dtype=dtype)
    out_dtype = _source_dtype(tensors) or cfg.param_dtype
    hf_cfg = config_to_hf(cfg, dtype=out_dtype, meta=meta)

    try:
        import jax

        if jax.process_index() != 0:  # every host gathered above; one writes
            return path
    except ImportError:  # pragma: no cover
        pass

    from safetensors.numpy import save_file

    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path) or not overwrite or not _looks_replaceable(path):
            raise FileExistsError(f"{path} exists and is not an (empty or model) directory save_hf may replace"
                                  if overwrite else f"{path} exists (overwrite=False)")
    with files.staged_dir(path, fsync=True) as tmp:  # replaces `path` whole, or leaves it as it was
        shards = _shard(tensors, max_shard_size)
        st_meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, WEIGHTS_FILE), metadata=st_meta)
        else:
            weight_map = {}
            n = len(shards)
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{n:05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata=st_meta)
                weight_map.update({name: fname for name in shard})
            index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                     "weight_map": weight_map}
            with open(os.path.join(tmp, WEIGHTS_INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    log.info("wrote %d tensors (%s, %d file(s)) to %s", len(tensors), out_dtype, len(shards), path)
    return path


# --------------------------------------------------------------------------- orbax side (CLI)


def _strip_value_leaves(tree):
    if isinstance(tree, Mapping):
        if set(tree) == {"value"}:
            return _strip_value_leaves(tree["value"])
        return {k: _strip_value_leaves(v) for k, v in tree.items()}
    return tree


def _config_from_meta(meta: Mapping | None) -> PhiConfig | None:
    if not meta:
        return None
    for key in ("model", "config", "model_config"):
        d = meta.get(key)
        if isinstance(d, Mapping) and "d_model" in d:
            return PhiConfig.from_dict(dict(d))
    return None


def _load_config_arg(spec: str) -> PhiConfig:
    """--config: a JSON file of PhiConfig fields, or a preset name."""
    if os.path.exists(spec):
        with open(spec) as f:
            d = json.load(f)
        return PhiConfig.from_dict(d.get("config", d) if "d_model" not in d else d)
    from phijax.config import preset

    return preset(spec)


def _training_steps(ckpt_dir: str) -> list[int]:
    return sorted((int(n) for n in os.listdir(ckpt_dir)
                   if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n, "state"))), reverse=True)


def _restore_train_params(state_dir: str) -> dict:
    """Only state['params'] of a Checkpointer step, as host numpy arrays (partial restore)."""
    import orbax.checkpoint as ocp

    from etils import epath

    state_dir = epath.Path(state_dir)
    handler = ocp.PyTreeCheckpointHandler()
    ckptr = ocp.Checkpointer(handler)
    try:
        stored = handler.metadata(state_dir)
        tree = getattr(stored, "tree", stored)
        if not isinstance(tree, Mapping) or "params" not in tree:
            raise ValueError(f"{state_dir} holds no 'params' (keys: {sorted(tree) if isinstance(tree, Mapping) else tree})")
        item = {"params": tree["params"]}
        restore_args = _tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    finally:
        ckptr.close()
    return _strip_value_leaves(restored["params"])


def load_orbax(ckpt: str, *, step: int | None = None, config: PhiConfig | None = None
               ) -> tuple[PhiConfig, dict, HFMeta]:
    """(cfg, numpy params, HFMeta) from an export_params directory or a training checkpoint dir."""
    from phijax import checkpoint as ckpt_lib

    meta = HFMeta()
    hf_meta_file = os.path.join(ckpt, HF_META_FILE)
    if os.path.exists(hf_meta_file):
        with open(hf_meta_file) as f:
            meta = HFMeta.from_json(f.read())
    if os.path.exists(os.path.join(ckpt, ckpt_lib.EXPORT_INFO_FILE)):
        if step is not None:
            raise ValueError(f"--step applies to training checkpoints; {ckpt} is a parameter export")
        info = ckpt_lib.read_export_info(ckpt)
        cfg = config or (PhiConfig.from_dict(info["config"]) if info.get("config") else None)
        if cfg is None:
            raise ValueError(f"{ckpt}/{ckpt_lib.EXPORT_INFO_FILE} has no model config; pass --config")
        params = ckpt_lib.load_params(ckpt)
        return cfg, _strip_value_leaves(params), meta
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"{ckpt} does not exist")
    steps = _training_steps(ckpt)
    if not steps and os.path.isdir(os.path.join(ckpt, "checkpoints")):  # given MODEL_DIR itself
        return load_orbax(os.path.join(ckpt, "checkpoints"), step=step, config=config)
    if not steps:
        raise ValueError(f"{ckpt} is neither a parameter export ({ckpt_lib.EXPORT_INFO_FILE} + params/) nor a "
                         "training checkpoint directory with committed steps (<step>/state/)")
    if step is not None:
        if step not in steps:
            raise ValueError(f"no committed step {step} in {ckpt} (have {sorted(steps)})")
        steps = [step]
    errors = []
    for s in steps:
        step_dir = os.path.join(ckpt, str(s))
        try:
            params = _restore_train_params(os.path.join(step_dir, "state"))
        except Exception as e:  # a truncated step: fall back to the previous one (as Checkpointer)
            errors.append(f"step {s}: {type(e).__name__}: {e}")
            log.warning("checkpoint step %d in %s unreadable (%s); trying an older one", s, ckpt, e)
            continue
        cfg = config
        if cfg is None:
            meta_file = os.path.join(step_dir, "meta", "metadata")
            if os.path.exists(meta_file):
                with open(meta_file) as f:
                    cfg = _config_from_meta(json.load(f))
        if cfg is None:
            raise ValueError(f"checkpoint step {s} in {ckpt} has no model config in meta/metadata; pass --config")
        log.info("read params of training step %d from %s", s, ckpt)
        return cfg, params, meta
    raise RuntimeError(f"no checkpoint in {ckpt} could be read: {'; '.join(errors)}")


def _cmd_hf_to_orbax(args) -> None:
    from phijax import checkpoint as ckpt_lib

    cfg, params, meta = read_hf(args.hf_dir)
    dtype = args.dtype or meta.dtype
    dtype = None if dtype is None or _np_dtype(dtype) == _source_dtype_of_tree(params) else _check_float_dtype(dtype, "--dtype")
    # Cast on the host (exact for upcasts, round-to-nearest-even down) so export_params saves as is.
    if dtype is not None:
        params = _tree_map(lambda x: x.astype(dtype), params)
    ckpt_lib.export_params(params, args.out, config=cfg.to_dict())
    with open(os.path.join(args.out, HF_META_FILE), "w") as f:
        f.write(meta.to_json() + "\n")
    print(f"exported {cfg.param_count()} parameters ({(dtype or _source_dtype_of_tree(params)).name}) to {args.out}")


def _source_dtype_of_tree(params) -> np.dtype:
    leaves = []
    _tree_map(leaves.append, params)
    return leaves[0].dtype


def _cmd_orbax_to_hf(args) -> None:
    config = _load_config_arg(args.config) if args.config else None
    cfg, params, meta = load_orbax(args.ckpt, step=args.step, config=config)
    dtype = args.dtype or str(_source_dtype_of_tree(params).name)
    path = save_hf((cfg, params), args.out, dtype=dtype, max_shard_size=args.max_shard_size,
                   meta=dataclasses.replace(meta, dtype=None))
    print(f"wrote {path} ({_np_dtype(dtype).name})")


def main(argv=None) -> int:
    from phijax.util import cli

    parser = cli.ArgumentParser(description="Convert between Hugging Face Phi checkpoints and phijax/orbax.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hf-to-orbax", help="transformers Phi directory -> orbax parameter export")
    p.add_argument("--hf_dir", required=True, help="a Hugging Face Phi directory or hub id (microsoft/phi-1)")
    p.add_argument("--out_dir", "--out", dest="out", required=True, help="the export directory to write")
    p.add_argument("--dtype", default=None, help="export dtype (default: the checkpoint's own)")
    p = sub.add_parser("orbax-to-hf", help="orbax export or training checkpoints -> transformers Phi directory")
    p.add_argument("--ckpt", required=True, help="an export_params directory or MODEL_DIR/checkpoints")
    p.add_argument("--out_dir", "--out", dest="out", required=True, help="the Hugging Face directory to write")
    p.add_argument("--dtype", default=None, help="safetensors dtype (default: the stored params' dtype)")
    p.add_argument("--step", type=int, default=None, help="training step (default: newest committed)")
    p.add_argument("--config", default=None, help="PhiConfig JSON file or preset name, if the checkpoint has none")
    p.add_argument("--max_shard_size", type=int, default=DEFAULT_MAX_SHARD_SIZE, help="bytes per safetensors file")
    args = parser.parse_args(argv)
    cli.setup_logging()
    try:
        if args.cmd == "hf-to-orbax":
            _cmd_hf_to_orbax(args)
        else:
            _cmd_orbax_to_hf(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return cli.fail(e)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
