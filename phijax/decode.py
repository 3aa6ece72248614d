"""Batched autoregressive decoding with a KV cache: greedy, temperature and top-p sampling.

    model = load_for_inference(path)                  # HF PhiForCausalLM dir, parameter export, or MODEL_DIR
    sampler = Sampler(model, batch_size=8, mesh=None)
    sampler.complete(prompts, max_new_tokens=300, stop=("\ndef",))      # -> [prompt][sample] strings
    sampler.generate_tokens(prompt_ids, max_new_tokens=128)              # -> [prompt][sample] token ids

How a batch runs (docs/decoding.md):
  * Prompts are LEFT-padded to a bucket length P (a power of two), so every row's last prompt
    token sits in slot P-1 and every generated token of every row is written to the same cache
    slot: one dynamic_update_slice per layer and step, no per-row scatter or gather. Padding gets
    segment id 0 and real tokens 1, so the attention mask (causal + same segment) hides it, and
    RoPE positions count from each row's first real token: a row's result does not depend on
    the other rows.
  * One compiled prefill call runs the whole padded prompt batch into the cache and samples the
    first token; a compiled `lax.while_loop` then decodes one token per iteration until the step
    limit or until every row has produced end-of-text. Both run the layers in the layer scan
    over the stacked weights, with the stacked cache carried through it and written in place
    (`Phi.decode_step`), so compile time does not grow with depth. Programs are compiled once per
    (batch, prompt bucket, new-token bucket, greedy or sampling); limits, temperature, top-p,
    seed and end-of-text id are runtime values.
  * String stop sequences are checked on the host between chunks of `chunk_size` steps (rows
    that stopped are masked on the device, and the loop ends early once all have); the returned
    text is cut before the first stop sequence, exactly as if the whole completion had been
    decoded and then cut.
  * Sampling keys are fold_in(seed, prompt index, sample index, step): the samples of a prompt do
    not depend on the batch size or on which prompts share its batch.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phijax import model as model_lib
from phijax import sharding
from phijax.config import PhiConfig
# HumanEval stop sequences, the default of Sampler.complete (a stdlib-only module: no gin, no jax).

__all__ = ["InferenceModel", "load_for_inference", "Sampler", "cut_at_stop", "place_params", "sample_tokens",
           "row_keys", "top_p_filter", "decoding_setup"]

log = logging.getLogger("phijax.decode")

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class InferenceModel:
    graphdef: Any
    params: Any  # nested dict of arrays (numpy on the host until a Sampler places them)
    cfg: PhiConfig
    tokenizer: Any = None  # phijax.data.vocab.BPETokenizer, or None (token-level decoding only)


def load_for_inference(path: str, tokenizer_path: str | None = None, *, dtype: str | None = None,
                       param_dtype: str | None = None, step: int | None = None,
                       **config_overrides) -> InferenceModel:
    """The model at `path`: a transformers PhiForCausalLM directory (config.json + safetensors) or
    Hugging Face hub id (`microsoft/phi-1`, from the local hub cache: `convert.resolve_model_dir`), a
    phijax parameter export (`checkpoint.export_params`), or training checkpoints (MODEL_DIR or
    MODEL_DIR/checkpoints; newest step unless `step`).

    The tokenizer is `tokenizer_path`, else `path/tokenizer.json` if present (HF directories and hub ids carry
    one; `export_params(tokenizer_path=...)` copies one into an export), else None (then only
    `generate_tokens` works). `dtype` is the compute dtype (default: the config's; float32 for HF
    dirs), `param_dtype` the dtype the weights are kept in (default: the config's);
    `config_overrides` replace other non-shape PhiConfig fields (e.g. attention='cudnn').
    """
    from phijax import convert
    from phijax.data import vocab

    path = convert.resolve_model_dir(path)  # a hub id (microsoft/phi-1) -> its cached snapshot
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory (expected a Hugging Face Phi directory, "
                                "a phijax parameter export or a training MODEL_DIR)")
    if tokenizer_path is None and os.path.exists(os.path.join(path, TOKENIZER_FILE)):
        tokenizer_path = os.path.join(path, TOKENIZER_FILE)
    if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"tokenizer_path={tokenizer_path!r} is not a file")
    unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(PhiConfig)})
    if unknown:
        raise ValueError(f"unknown PhiConfig fields in config_overrides: {unknown}")
    bad = sorted(set(config_overrides) & set(PhiConfig().shape_dict()))
    if bad:
        raise ValueError(f"config_overrides may not change parameter shapes ({bad})")
    # BPETokenizer takes foreign tokenizer.json files too (phi-1's codegen BPE: no pad token, eos 50256).
    tokenizer = vocab.BPETokenizer(tokenizer_path) if tokenizer_path is not None else None
    if os.path.exists(os.path.join(path, convert.CONFIG_FILE)):
        if step is not None:
            raise ValueError(f"step={step} applies to training checkpoints; {path} is a Hugging Face directory")
        cfg, params, _ = convert.read_hf(path)
    else:
        cfg, params, _ = convert.load_orbax(path, step=step)
    changes = dict(config_overrides)
    if dtype is not None:
        changes["dtype"] = jnp.dtype(dtype).name
    if param_dtype is not None:
        changes["param_dtype"] = jnp.dtype(param_dtype).name
    cfg = cfg.replace(**changes)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} ids but the model's vocabulary "
                         f"is {cfg.vocab_size}")
    graphdef, abstract, _ = model_lib.abstract(cfg)
    pd = jnp.dtype(cfg.param_dtype)
    params = jax.tree.map(lambda a, x: np.asarray(x).astype(pd), abstract, params)
    return InferenceModel(graphdef=graphdef, params=params, cfg=cfg, tokenizer=tokenizer)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """(text before the first occurrence of any stop sequence, whether one occurred)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def pow2_bucket(n: int, minimum: int) -> int:
    """The shape bucket of n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    cache: model_lib.KVCache
    tokens: jax.Array  # [batch, new bucket] generated ids, -1 where none
    last: jax.Array  # [batch] last generated id (fed at the next step)
    pos: jax.Array  # [batch] its RoPE position
    step: jax.Array  # scalar: tokens generated so far
    done: jax.Array  # [batch] ended (end-of-text, host stop, or a filler row)
    keys: jax.Array  # [batch] per-row PRNG keys


def top_p_filter(logits, top_p):
    """Keeps the smallest set of highest-probability tokens whose mass reaches top_p (ties at the
    cut-off are kept); everything else gets -inf. top_p: a scalar or [batch, 1]."""
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    cutoff = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def row_keys(seed, prompt_ids, sample_ids):
    """[batch] PRNG keys fold_in(fold_in(key(seed), prompt index), sample index): a row's samples
    depend on its seed, prompt index and sample index only (phijax.serve derives the same keys)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))(prompt_ids, sample_ids)


def sample_tokens(logits, keys, step, temperature, top_p, greedy: bool | None = None):
    """Next tokens [batch] from fp32 logits [batch, vocab]: the key of a row at a step is
    fold_in(its key, step). temperature, top_p: scalars or [batch] (runtime values). greedy=True
    (argmax) or False (sampling) decides for every row at trace time; None decides per row
    (temperature 0 = argmax), skipping the sort of top-p and the draw when no row needs them."""
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return argmax
    b = logits.shape[0]
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (b,))

    def draw(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        # top_p is a runtime value (one program for every top_p); 1.0 skips the filter exactly.
        nucleus = jax.lax.cond(jnp.any(top_p < 1.0), lambda x: top_p_filter(x, top_p[:, None]), lambda x: x, scaled)
        scaled = jnp.where((top_p < 1.0)[:, None], nucleus, scaled)
        step_keys = jax.vmap(jax.random.fold_in)(keys, step)
        return jax.vmap(jax.random.categorical)(step_keys, scaled).astype(jnp.int32)

    if greedy is False:
        return draw(logits)
    sampled = jax.lax.cond(jnp.any(temperature > 0), draw, lambda x: argmax, logits)
    return jnp.where(temperature > 0, sampled, argmax)


def _replicate_outputs(state: _State) -> _State:
    """The host reads tokens and flags every chunk: keep them (small) whole on every device, so
    every process can read them on a multi-host mesh. No-op without a mesh."""
    return dataclasses.replace(state, tokens=sharding.constrain(state.tokens, (None, None)),
                               done=sharding.constrain(state.done, (None,)))


def _place(x, dtype, sharding=None):
    """x as `dtype` on the device(s). An abstract x (jax.ShapeDtypeStruct, e.g. from
    `model.abstract`) stays abstract: such a Sampler compiles (`Sampler.lower`) but cannot run."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=sharding)
    return jax.device_put(x if x.dtype == dtype else x.astype(dtype), sharding)


def decoding_setup(model: InferenceModel, mesh, rules, eos_id: int | None, **rows: int):
    """(end-of-text id: `eos_id` or the tokenizer's; pad id; the rules as a tuple) for decoding
    on `mesh`; raises ValueError if the rows (one keyword: batch_size=8, slots=16) do not split
    over the mesh's data-parallel size."""
    tok = model.tokenizer
    eos = eos_id if eos_id is not None else (tok.eos_id if tok is not None else None)
    if mesh is not None:
        dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        (name, n), = rows.items()
        if n % dp:
            raise ValueError(f"{name}={n} is not divisible by the mesh's data-parallel size {dp} (data x fsdp)")
    return eos, tok.pad_id if tok is not None else 0, tuple(rules if rules is not None else sharding.DEFAULT_RULES)


def place_params(model: InferenceModel, mesh=None, rules=None):
    """model.params in cfg.param_dtype on the default device, or on `mesh` sharded by the logical
    rules (default sharding.DEFAULT_RULES). Abstract params stay abstract (see _place)."""
    pd = jnp.dtype(model.cfg.param_dtype)
    if mesh is None:
        return jax.tree.map(lambda x: _place(x, pd), model.params)
    _, _, axes = model_lib.abstract(model.cfg)
    rules = tuple(rules if rules is not None else sharding.DEFAULT_RULES)
    shardings = sharding.tree_shardings(axes, model.params, rules, mesh)
    return jax.tree.map(lambda x, s: _place(x, pd, s), model.params, shardings)


class Sampler:
    """Batched decoding of one model on one mesh. Rows (prompt x sample) are sorted by prompt
    length and run `batch_size` at a time; the last batch is filled with masked rows.

    `params` (placed on the mesh here) may be replaced by other arrays of the same shapes,
    dtypes and shardings, e.g. live training parameters, without recompiling."""

    def __init__(self, model: InferenceModel, batch_size: int = 8, mesh=None, rules=None, *,
                 min_prompt_bucket: int = 16, min_new_bucket: int = 16, chunk_size: int = 32,
                 eos_id: int | None = None, compiler_options: dict | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        self.model, self.cfg, self.batch_size = model, model.cfg, batch_size
        self.min_prompt_bucket, self.min_new_bucket, self.chunk_size = min_prompt_bucket, min_new_bucket, chunk_size
        self.eos_id, self.pad_id, self.rules = decoding_setup(model, mesh, rules, eos_id, batch_size=batch_size)
        self.mesh = mesh
        if mesh is not None:
            self.params = place_params(model, mesh, self.rules)
            self._row_sharding = sharding.named_sharding(("activation_batch",), self.rules, mesh, (batch_size,))
            self._tok_sharding = sharding.named_sharding(("activation_batch", None), self.rules, mesh,
                                                         (batch_size, 1))
        else:
            self.params = place_params(model)
            self._row_sharding = self._tok_sharding = None
        self.traces: collections.Counter = collections.Counter()  # Python traces = compilations
        self.last_steps: list[int] = []
        # compiler_options: XLA options for these programs only (e.g. {"xla_cpu_experimental_ynn_fusion_type": ""})
        jit = functools.partial(jax.jit, compiler_options=compiler_options)
        self._prefill = jit(self._prefill_fn, static_argnames=("new_bucket", "greedy"))
        self._decode = jit(self._decode_fn, static_argnames=("greedy",), donate_argnums=(1,))

    # ------------------------------------------------------------------ compiled parts

    def _context(self):
        return sharding.use_mesh_rules(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def _prefill_fn(self, params, tokens, lengths, prompt_ids, sample_ids, done, seed, temperature, top_p, eos,
                    *, new_bucket, greedy):
        self.traces["prefill"] += 1
        model = nnx.merge(self.model.graphdef, params)
        b, p = tokens.shape
        slot = jnp.arange(p, dtype=jnp.int32)[None]
        first = (p - lengths)[:, None]  # slot of each row's first real token
        segments = (slot >= first).astype(jnp.int32)
        positions = jnp.maximum(slot - first, 0)
        keys = row_keys(seed, prompt_ids, sample_ids)
        cache = model.init_cache(b, p + new_bucket)
        logits, cache = model.decode_step(tokens, cache, positions=positions, segment_ids=segments)
        tok = sample_tokens(logits, keys, 0, temperature, top_p, greedy)
        out = jnp.full((b, new_bucket), -1, jnp.int32).at[:, 0].set(jnp.where(done, -1, tok))
        return _replicate_outputs(_State(cache=cache, tokens=out, last=tok, pos=lengths, step=jnp.ones((), jnp.int32),
                                         done=done | (tok == eos), keys=keys))

    def _decode_fn(self, params, state, limit, stopped, temperature, top_p, eos, *, greedy):
        self.traces["decode"] += 1
        model = nnx.merge(self.model.graphdef, params)

        def cond(s):
            return (s.step < limit) & ~jnp.all(s.done)

        def body(s):
            fed = jnp.where(s.done, 0, s.last)
            logits, cache = model.decode_step(fed[:, None], s.cache, positions=s.pos[:, None])
            tok = sample_tokens(logits, s.keys, s.step, temperature, top_p, greedy)
            col = jnp.where(s.done, -1, tok)[:, None]
            out = jax.lax.dynamic_update_slice(s.tokens, col, (0, s.step))
            return _State(cache=cache, tokens=out, last=tok, pos=s.pos + 1, step=s.step + 1,
                          done=s.done | (tok == eos), keys=s.keys)

        state = dataclasses.replace(state, done=state.done | stopped)
        return _replicate_outputs(jax.lax.while_loop(cond, body, state))

    def lower(self, prompt_bucket: int, new_bucket: int, *, greedy: bool = True):
        """(prefill, decode loop) of one bucket lowered on abstract inputs: nothing runs and
        nothing is allocated, so the params may be abstract too. `.compile()` each to measure
        compile time (phijax.bench.decode_compile) or check memory ahead of time. The compiled
        programs take the arguments `_run` passes: prefill(params, tokens, lengths, prompt_ids,
        sample_ids, done, seed, temperature, top_p, eos), decode(params, state, limit, stopped,
        temperature, top_p, eos)."""
        b = self.batch_size

        def arg(shape, dtype):
            where = {0: None, 1: self._row_sharding, 2: self._tok_sharding}[len(shape)]
            return jax.ShapeDtypeStruct(shape, dtype, sharding=where)

        rows = arg((b,), jnp.int32)
        scalars = (arg((), jnp.float32), arg((), jnp.float32), arg((), jnp.int32))  # temperature, top_p, eos
        with self._context():
            prefill = self._prefill.lower(self.params, arg((b, prompt_bucket), jnp.int32), rows, rows, rows,
                                          arg((b,), jnp.bool_), arg((), jnp.uint32), *scalars,
                                          new_bucket=new_bucket, greedy=greedy)
            decode = self._decode.lower(self.params, prefill.out_info, arg((), jnp.int32), arg((b,), jnp.bool_),
                                        *scalars, greedy=greedy)
        return prefill, decode

    # ------------------------------------------------------------------ host side

    def _put(self, x):
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, self._row_sharding if x.ndim == 1 else self._tok_sharding)

    def _run(self, rows, max_new_tokens, temperature, top_p, seed, eos_id: int | None,
             stop_fn: Callable[[list[int]], bool] | None, room: Sequence[int] | None = None):
        """Generated ids per row ([(prompt ids, prompt index, sample index)]); a row that ended on
        end-of-text ends with its id; rows for which stop_fn(ids) became true may run a little
        past it (to the end of the chunk). `room` (per prompt index): at most that many new
        tokens for its rows (default max_new_tokens for every row)."""
        greedy = temperature == 0
        eos = np.int32(-1 if eos_id is None else eos_id)
        scalars = (np.float32(max(temperature, 1e-6)), np.float32(top_p), eos)
        cap = [max_new_tokens if room is None else room[pi] for _, pi, _ in rows]
        nb = pow2_bucket(max(cap), self.min_new_bucket)
        chunk = self.chunk_size if stop_fn is not None else max_new_tokens
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
        results: list[list[int] | None] = [None] * len(rows)
        self.last_steps = []  # per batch: decode steps run (for tests and logs)
        B = self.batch_size
        for start in range(0, len(order), B):
            idx = order[start:start + B]
            n = len(idx)
            row_cap = np.zeros(B, np.int64)  # filler rows: 0
            row_cap[:n] = [cap[r] for r in idx]
            most = int(row_cap.max())
            longest = max(len(rows[r][0]) for r in idx)
            p = pow2_bucket(longest, self.min_prompt_bucket)
            tokens = np.full((B, p), self.pad_id, np.int32)
            lengths = np.ones(B, np.int32)  # filler rows: one pad token
            pids, sids = np.zeros(B, np.int32), np.zeros(B, np.int32)
            for i, r in enumerate(idx):
                ids, pi, si = rows[r]
                tokens[i, p - len(ids):] = ids
                lengths[i], pids[i], sids[i] = len(ids), pi, si
            done = np.arange(B) >= n
            with self._context():
                state = self._prefill(self.params, self._put(tokens), self._put(lengths),
                                      self._put(pids), self._put(sids), self._put(done),
                                      np.uint32(seed), *scalars, new_bucket=nb, greedy=greedy)
                step, stopped = 1, np.zeros(B, bool)
                while True:
                    out, dev_done = jax.device_get((state.tokens, state.done))
                    stopped |= step >= row_cap
                    if stop_fn is not None:
                        for i in range(n):
                            if not dev_done[i] and not stopped[i]:
                                stopped[i] = stop_fn([int(t) for t in out[i, :step] if t >= 0])
                    if step >= most or np.all(dev_done | stopped):
                        break
                    limit = np.int32(min(step + chunk, most))
                    state = self._decode(self.params, state, limit, self._put(stopped), *scalars, greedy=greedy)
                    step = int(jax.device_get(state.step))
            self.last_steps.append(step)
            for i, r in enumerate(idx):
                row = out[i, :cap[r]]
                results[r] = [int(t) for t in row[row >= 0]]
        return results

    def _rows(self, prompts_ids, num_samples, temperature):
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1")
        n = 1 if temperature == 0 else num_samples  # greedy samples are all the same: decode once
        return [(list(ids), i, j) for i, ids in enumerate(prompts_ids) for j in range(n)], n

    def _check(self, prompts_ids, max_new_tokens, temperature, top_p, seed, fit_context=False):
        """Raises ValueError naming a bad argument or prompt. Returns None, or with fit_context
        each prompt's room: max_new_tokens, or what fits beside it in the model's max_len (said
        once, in a log line)."""
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed} must be in [0, 2**32)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        for i, ids in enumerate(prompts_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty (phi has no BOS token: give at least one token)")
            if len(ids) + max_new_tokens > self.cfg.max_len and not (fit_context and len(ids) < self.cfg.max_len):
                raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                                 f"exceeds the model's max_len={self.cfg.max_len}")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.cfg.vocab_size}): {bad[:5]}")
        if not fit_context:
            return None
        room = [min(max_new_tokens, self.cfg.max_len - len(ids)) for ids in prompts_ids]
        clipped = [r for r in room if r < max_new_tokens]
        if clipped:
            log.info("max_new_tokens=%d does not fit beside %d of %d prompts in the model's context (max_len=%d): "
                     "those generate at most max_len - prompt tokens (%d to %d new tokens)", max_new_tokens,
                     len(clipped), len(room), self.cfg.max_len, min(clipped), max(clipped))
        return room

    def generate_tokens(self, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                        temperature: float = 0.0, top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
                        stop_at_eos: bool = True, eos_id: int | None = None,
                        fit_context: bool = False) -> list[list[list[int]]]:
        """Generated token ids [prompt][sample]: up to max_new_tokens each; a row that produces
        end-of-text (`eos_id`, default the sampler's) stops there and ends with it, unless
        stop_at_eos=False. A prompt + max_new_tokens longer than the model's max_len is an error,
        or with fit_context=True generates what fits (a prompt of max_len tokens or more still
        is an error)."""
        room = self._check(prompts_ids, max_new_tokens, temperature, top_p, seed, fit_context)
        rows, n = self._rows(prompts_ids, num_samples, temperature)
        eos = (self.eos_id if eos_id is None else eos_id) if stop_at_eos else None
        ids = self._run(rows, max_new_tokens, temperature, top_p, seed, eos, None, room)
        return [[ids[i * n + (j if n > 1 else 0)] for j in range(num_samples)] for i in range(len(prompts_ids))]

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 512, *, temperature: float = 0.0,
                 top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
                 stop: Sequence[str] = (), fit_context: bool = False) -> list[list[str]]:
        """num_samples completions per prompt: the text after the prompt (special tokens left out),
        cut before the first stop sequence or end-of-text. The stop sequences are the caller's (a
        benchmark's prompt format has its own: phijax.evaluate.problems.STOP). fit_context: as in
        generate_tokens."""
        tok = self.model.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer: pass tokenizer_path= to load_for_inference")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        stop = tuple(s for s in stop if s)
        prompts_ids = tok.encode_batch(list(prompts))
        room = self._check(prompts_ids, max_new_tokens, temperature, top_p, seed, fit_context)
        rows, n = self._rows(prompts_ids, num_samples, temperature)
        eos = self.eos_id

        def text(ids):  # special tokens (end-of-text, <|pad|>) are not text: phijax.serve leaves them out too
            return tok.decode([t for t in ids if t != eos], skip_special_tokens=True)

        stop_fn = (lambda ids: cut_at_stop(text(ids), stop)[1]) if stop else None
        ids = self._run(rows, max_new_tokens, temperature, top_p, seed, eos, stop_fn, room)
        texts = [cut_at_stop(text(r), stop)[0] for r in ids]
        return [[texts[i * n + (j if n > 1 else 0)] for j in range(num_samples)] for i in range(len(prompts))]
