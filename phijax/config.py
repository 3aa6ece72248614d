"""Model configuration for the phi family, and the named presets.

The field names follow the paper / phi-1 model card; `convert.py` maps them to and
from Hugging Face's `PhiConfig`. Nothing here imports tensorflow or gin. PRESETS is the only
copy of each preset: a `gin/models/*.gin` file selects one by name (`phijax.model_preset.name`)
and gin bindings of `phijax.PhiConfig.<field>` override single fields (phijax.gin_bindings).
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class PhiConfig:
    vocab_size: int = 51200
    d_model: int = 2048
    n_layers: int = 24
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head (phi-1); fewer: grouped-query attention
    head_dim: int = 64
    d_mlp: int = 8192
    max_len: int = 2048
    rotary_dim: int = 32  # rotary on the first rotary_dim features of each head (phi-1: 32 of 64)
    rope_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    qk_layernorm: bool = False
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    init_std: float = 0.02
    # Numerics and memory.
    dtype: str = "float32"  # compute dtype; parameters are always kept in param_dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"  # see phijax.remat.POLICIES
    attention: str = "xla"  # see phijax.attention.BACKENDS
    scan_unroll: int = 1  # layers per iteration of the layer scan (n_layers: fully unrolled)
    loss_chunk: int = 0  # > 0: training fuses the LM head into the loss, this many positions at a time (phijax.loss)
    loss_kernel: str = "xla"  # 'cpu': the fused loss's softmax cross-entropy in an XLA:CPU FFI kernel (phijax.loss)

    def __post_init__(self):
        problems = []
        if self.n_heads * self.head_dim <= 0:
            problems.append("n_heads and head_dim must be positive")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            problems.append(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}")
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            problems.append(f"rotary_dim={self.rotary_dim} must be even and in [0, head_dim={self.head_dim}]")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 1 <= self.scan_unroll <= max(self.n_layers, 1):
            problems.append(f"scan_unroll={self.scan_unroll} must be in [1, n_layers={self.n_layers}]")
        if self.loss_chunk < 0:
            problems.append(f"loss_chunk={self.loss_chunk} must be >= 0 (0: unfused)")
        if self.loss_kernel not in ("xla", "cpu"):
            problems.append(f"loss_kernel={self.loss_kernel!r} must be 'xla' or 'cpu'")
        elif self.loss_kernel == "cpu" and self.loss_chunk == 0:
            problems.append("loss_kernel='cpu' is the fused loss's kernel: set loss_chunk > 0")
        if problems:
            raise ValueError("invalid PhiConfig: " + "; ".join(problems))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def replace(self, **changes: Any) -> "PhiConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PhiConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PhiConfig fields: {unknown}")
        return cls(**d)

    def shape_dict(self) -> dict:
        """The fields that determine parameter shapes (a checkpoint must match these)."""
        keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_mlp", "qk_layernorm")
        return {k: getattr(self, k) for k in keys}

    def param_count(self, include_embedding: bool = True) -> int:
        d, h, kv, dh, f, v = self.d_model, self.n_heads, self.kv_heads, self.head_dim, self.d_mlp, self.vocab_size
        attn = d * h * dh + h * dh + 2 * (d * kv * dh + kv * dh) + h * dh * d + d
        mlp = d * f + f + f * d + d
        norms = 2 * d + (4 * dh if self.qk_layernorm else 0)
        total = self.n_layers * (attn + mlp + norms) + 2 * d + d * v + v
        return total + (v * d if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * (matmul parameters) + 12 * layers * heads * head_dim * seq_len.

        The PaLM (Chowdhery et al. 2022, app. B) accounting: forward + backward of every
        matmul weight (the input embedding is a gather and is not counted; the lm_head is),
        plus the attention score and value matmuls, counted for the full (not causal-halved)
        score matrix. MFU = tokens/s * flops_per_token / peak FLOP/s.
        """
        matmul_params = self.param_count(include_embedding=False)
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len


# Presets. phi-1 (1.3B) and phi-1-small (350M) are the paper's; the rest train on a CPU.
# gin/models/<name>.gin selects each by name; tests/test_gin_bindings.py checks they agree.
PRESETS: dict[str, PhiConfig] = {
    "phi1": PhiConfig(),
    "phi1_small": PhiConfig(d_model=1024, n_layers=20, n_heads=16, d_mlp=4096),
    # ~7.4M params with an 8k vocab: the CPU demo / benchmark model.
    "tiny": PhiConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, head_dim=64, d_mlp=1024,
                      max_len=512, rotary_dim=32),
    # ~0.1M params: unit tests.
    "nano": PhiConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_mlp=256,
                      max_len=128, rotary_dim=8),
}


def preset(name: str, **overrides: Any) -> PhiConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
