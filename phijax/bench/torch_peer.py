"""The PyTorch peer of phijax's train step: transformers' PhiForCausalLM with AdamW.

One implementation for every benchmark that compares against PyTorch: `train_throughput` (CPU,
fp32, eager) and `mfu --peer torch` (the accelerator; eager and torch.compile).

What it matches in phijax's step (phijax.train_step with optim.adamw):
- the model: PhiForCausalLM from `convert.config_to_hf(cfg)`, SDPA attention, fp32 parameters;
  given `hf_state` (phijax's initial parameters through `convert.params_to_hf_state`) it starts
  from the same weights, so the first losses compare;
- the numerics: autocast to cfg.dtype when that is not float32 (phijax: bf16 compute on fp32
  parameters), the cross-entropy in fp32 on the logits, averaged over the tokens;
- the update: the global gradient norm clipped to 1.0, then AdamW (b1 0.9, b2 0.95, eps 1e-8,
  weight decay 0.1 on matrices and the embedding only, as optim.decay_mask), fused on CUDA;
- the tokens: `step_timing.synthetic_batch`, the batch phijax's benchmarks train on.

Imports torch and transformers: import this module only where the peer runs.
"""
from __future__ import annotations

import gc
import time

import numpy as np
import torch
import transformers
from transformers import PhiConfig as HFPhiConfig, PhiForCausalLM

from phijax import convert
from phijax.bench import step_timing

MODES = ("eager", "compile")
LR = 1e-4  # phijax's benchmarks peak at 1e-4 too; the value does not change the step's work


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def versions() -> str:
    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def build_model(cfg, device: str, hf_state=None, seed: int = 0):
    """PhiForCausalLM (train mode, fp32, SDPA attention) on `device`; phijax's weights if given."""
    torch.manual_seed(seed)
    # `attn_implementation` is a PretrainedConfig kwarg in transformers 4.36+ and 5.
    hf_cfg = HFPhiConfig(**convert.config_to_hf(cfg), attn_implementation="sdpa")
    with torch.device(device):  # initialise where it runs (phi-1's 1.3B initialise slowly on a CPU)
        model = PhiForCausalLM(hf_cfg)
    model = model.to(torch.float32).train()
    if hf_state is not None:
        # torch.tensor copies: the arrays may be read-only views of jax buffers.
        model.load_state_dict({k: torch.tensor(v) for k, v in hf_state.items()}, strict=True)
    return model


def adamw(model, fused: bool):
    """AdamW with phijax's hyperparameters and decay mask (no decay for biases and LayerNorms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused else {}))


class TrainStep:
    """One call = one train step on a fixed synthetic batch; returns the loss (a tensor, not synced).

    mode 'compile' compiles the forward and the loss as one graph (phijax's jit covers both);
    `dynamic=False` so that each batch size gets its own static-shape graph. The backward runs the
    graph AOTAutograd derived; clipping and the (fused) AdamW step stay eager.
    """

    def __init__(self, cfg, batch: int, seq: int, *, device: str = "cpu", mode: str = "eager",
                 hf_state=None, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown peer mode {mode!r}; known: {MODES}")
        self.device = torch.device(device)
        self.model = build_model(cfg, device, hf_state, seed)
        self.opt = adamw(self.model, fused=self.device.type == "cuda")
        b = step_timing.synthetic_batch(cfg.vocab_size, batch, seq, seed)
        self.inputs, self.targets = (torch.from_numpy(np.ascontiguousarray(b[k])).long().to(device)
                                     for k in ("inputs", "targets"))
        self.amp_dtype = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
        self.loss_fn = self._loss
        if mode == "compile":
            torch._dynamo.reset()  # a fresh cache per run: no recompile-limit or dynamic-shape carry-over
            self.loss_fn = torch.compile(self._loss, dynamic=False)

    def _loss(self, inputs, targets):
        logits = self.model(input_ids=inputs, use_cache=False).logits  # training: no KV cache (config says True)
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def __call__(self):
        amp = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype if amp else torch.bfloat16, enabled=amp):
            loss = self.loss_fn(self.inputs, self.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, steps: int):
        """(seconds per step, last loss) over `steps` more steps, device work included."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self()
        self.sync()
        return (time.perf_counter() - t0) / steps, float(loss)


def run(cfg, batch: int, seq: int, steps: int, *, device: str, mode: str, warmup: int = 2, hf_state=None) -> dict:
    """Times one (batch, mode): step seconds, compile+first-step seconds, first/last loss, peak memory."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step = TrainStep(cfg, batch, seq, device=device, mode=mode, hf_state=hf_state)
    step.sync()
    t0 = time.perf_counter()
    first_loss = float(step())  # compiles in mode 'compile'; float() waits for the device
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    dt, loss = step.timed(steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return {"step_s": dt, "compile_s": first, "first_loss": first_loss, "loss": loss, "peak_mem_gib": peak}


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory():
    """Return what a finished (or failed) run held: compiled graphs, tensors, the caching allocator's pool."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


def free_device_gib(device: str):
    """(free, total) GiB on a CUDA device (what jax left for torch), None elsewhere."""
    if torch.device(device).type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return free / 2**30, total / 2**30
