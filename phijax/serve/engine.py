"""Continuous batching over one KV cache: the engine behind `phijax.serve`.

    engine = Engine(load_for_inference(path), slots=8)
    engine.compile()          # every program, timed; else each compiles on first use (logged)
    engine.start()            # the engine thread
    seqs = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0), n=1,
                         on_event=lambda seq, event: ...)   # called from the engine thread
    engine.cancel(seqs); engine.shutdown()

How it runs (docs/serving.md):
  * One cache [layers, slots, kv_heads, max_len, head_dim] (k and v) holds every running
    sequence, one slot (row) each, tokens at their own positions: slot s holds its sequence's
    token p at column p. A decode step feeds every slot's last token at its own position (the
    cache index is one per row) and samples each row with its own temperature, top-p and key;
    idle slots get index max_len, which writes nothing. No shape depends on the other requests
    and rows are independent computations, so a request's tokens do not depend on what else
    runs (batch_invariant=False trades that for attention windows sized to the longest running
    sequence).
  * A new sequence takes a free slot and is prefilled in chunks of at most `prefill_chunk`
    tokens (buckets: powers of two from `min_prefill_bucket`), one sequence per call, into its
    row; at most `prefill_chunk` prompt tokens are prefilled between two decode steps while other
    sequences are decoding, so a long prompt delays running requests by one chunk at a time. The
    last chunk samples the first token; the sequence then joins the next decode step.
  * Decode calls are pipelined: the next call is dispatched from the previous one's state (token,
    position, step per row, kept on the device) before the host reads the previous one's tokens.
    The host turns them into text incrementally, checks stop sequences, end-of-text and
    `max_tokens`, and frees the slot of a finished (or cancelled) sequence; the call already in
    flight computes one more token for it, which is dropped, and the next waiting sequence takes
    the slot for the call after that.
  * Keys: fold_in(fold_in(key(seed), prompt index), choice index), then fold_in(step), as in
    `phijax.decode.Sampler`: the same request with the same seed gives the same tokens.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phijax import decode, sharding
from phijax import model as model_lib
from phijax.serve.text import StopScanner

log = logging.getLogger("phijax.serve")

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"


UNROLL_MAX_LAYERS = 8  # layers='auto': unrolled up to this depth, the layer scan beyond


class QueueFull(Exception):
    """More sequences waiting for a slot than the engine's max_queued."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One sequence's settings. logprobs: None, or k >= 0 (the chosen token's log-probability and
    the k most likely alternatives, k <= the engine's max_logprobs). prompt_logprobs: also the
    prompt tokens' (echo with logprobs). seed: None draws one."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: bool = False
    stop_at_eos: bool = True


@dataclasses.dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens, best first


@dataclasses.dataclass
class Event:
    """What a sequence produced since its last event: new text (never past a stop sequence;
    text that could start one is held back until it cannot), the tokens generated, their
    logprobs if asked, and at the end finish_reason ('stop', 'length', 'cancelled', 'error')."""

    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first event, if asked
    finish_reason: str | None = None
    error: str | None = None


_ids = itertools.count()


class Seq:
    """One sequence (a prompt x one choice) from submit to finish."""

    def __init__(self, prompt_ids, params: SamplingParams, prompt_index: int, choice: int, seed: int,
                 on_event: Callable[["Seq", Event], None], scanner: StopScanner):
        self.id = next(_ids)
        self.prompt_ids, self.params, self.prompt_index, self.choice = list(prompt_ids), params, prompt_index, choice
        self.seed, self.on_event, self.scanner = seed, on_event, scanner
        self.generated: list[int] = []
        self.slot: int | None = None
        self.prefilled = 0
        self.prompt_lps: list[TokenLogprob | None] = [None]
        self.finish_reason: str | None = None
        self.cancelled = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)


class Engine:
    """Continuous batching of one model on one mesh (None: the default device). See the module
    docstring. `max_len`: the cache's length (prompt + max_tokens of any sequence), default the
    model's; a multiple of `prefill_chunk` (a power of two). batch_invariant: see __init__."""

    def __init__(self, model: decode.InferenceModel, *, slots: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 256, min_prefill_bucket: int = 16, max_queued: int = 256,
                 max_logprobs: int = 20, batch_invariant: bool = True, decode_steps: int = 1, layers: str = "auto",
                 mesh=None, rules=None, eos_id: int | None = None, compiler_options: dict | None = None):
        cfg = model.cfg
        self.model, self.cfg, self.slots = model, cfg, slots
        self.max_len = max_len or cfg.max_len
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        if not 0 < self.max_len <= cfg.max_len:
            raise ValueError(f"max_len={self.max_len} must be in [1, the model's max_len={cfg.max_len}]")
        for name, v in (("prefill_chunk", prefill_chunk), ("min_prefill_bucket", min_prefill_bucket)):
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")
        if min_prefill_bucket > prefill_chunk or self.max_len % prefill_chunk:
            raise ValueError(f"max_len={self.max_len} must be a multiple of prefill_chunk={prefill_chunk}, which "
                             f"must be >= min_prefill_bucket={min_prefill_bucket}")
        if max_queued < 0 or max_logprobs < 0:
            raise ValueError(f"max_queued={max_queued} and max_logprobs={max_logprobs} must be >= 0")
        self.prefill_chunk, self.min_prefill_bucket, self.max_queued = prefill_chunk, min_prefill_bucket, max_queued
        self.max_logprobs = max_logprobs
        # Tokens per decode call: more means fewer host round trips and fewer, larger stream
        # chunks; a finished sequence's slot waits for the end of the call (up to decode_steps - 1
        # wasted tokens), a new one joins at the next call.
        if decode_steps < 1:
            raise ValueError(f"decode_steps={decode_steps} must be >= 1")
        self.decode_steps = decode_steps
        # Batch-invariant (the default): every decode step attends over the whole cache, so no
        # shape depends on the other requests. Otherwise over the shortest window (128, 256, ...
        # max_len columns) covering every running sequence: faster for short sequences, but a
        # different window changes the logits' last bits, so a near-tie may go the other way.
        self.batch_invariant = batch_invariant
        self.windows = [self.max_len] if batch_invariant else sorted(
            {min(128 << i, self.max_len) for i in range(self.max_len.bit_length())})
        self.eos_id, self.pad_id, self.rules = decode.decoding_setup(model, mesh, rules, eos_id, slots=slots)
        self.mesh = mesh
        self.params = decode.place_params(model, mesh, self.rules)
        # layers='scan': the layer scan over stacked weights and one stacked cache (compile time
        # flat in depth); 'unrolled': each layer from its own arrays (Phi.decode_step's
        # layer_params), faster per token where the scan's per-layer copies dominate (1.3-1.5x on
        # the CPU demo model), compile time growing with depth, twice the layer weights' memory.
        if layers not in ("auto", "scan", "unrolled"):
            raise ValueError(f"layers={layers!r}: 'auto', 'scan' or 'unrolled'")
        if layers == "auto":  # compile time only matters with depth: phi-1's 24 layers scan
            layers = "unrolled" if cfg.n_layers <= UNROLL_MAX_LAYERS else "scan"
        self.layers = layers
        self.layer_params = model_lib.unstack_layers(self.params) if layers == "unrolled" else None
        per_layer = layers == "unrolled"
        shape = (1 if per_layer else cfg.n_layers, slots, cfg.kv_heads, self.max_len, cfg.head_dim)
        one = jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.dtype), sharding=self._sharding(model_lib.CACHE_AXES, shape))
        self._cache_struct = tuple([one] * cfg.n_layers) if per_layer else one
        self._jit_kw = dict(compiler_options=compiler_options)
        self._programs: dict[tuple, object] = {}  # (kind, bucket, prompt_logprobs) -> compiled
        self.compile_seconds: dict[str, float] = {}
        self.cache = None  # (k, v), allocated by start()
        # Host-side slot state: token fed, its position (max_len: idle), steps generated (sent for
        # the rows in _patch only, below), key data, temperature, top-p (sent with every call).
        self._tok = np.zeros(slots, np.int32)
        self._pos = np.full(slots, self.max_len, np.int32)
        self._step = np.zeros(slots, np.int32)
        self._keys = np.zeros((slots,) + self._key_shape(), np.uint32)
        self._temp = np.zeros(slots, np.float32)
        self._top_p = np.ones(slots, np.float32)
        self._want = np.zeros(slots, bool)  # wants logprobs
        # The decode calls carry token, position and step on the device from one call to the
        # next; the host sends them only for the rows in _patch (a sequence joined or left).
        self._patch = np.zeros(slots, bool)
        self._state = None  # (token, position, step) on the device, set by start()
        self._owner: list[Seq | None] = [None] * slots
        self._waiting: collections.deque[Seq] = collections.deque()
        self._prefilling: collections.deque[Seq] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None
        self.stats = collections.Counter()  # decode_steps, prefill_calls, prefill_tokens, tokens, finish reasons

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _key_shape():
        return jax.random.key_data(jax.random.key(0)).shape

    def _sharding(self, axes, shape):
        if self.mesh is None:
            return None
        return sharding.named_sharding(axes, self.rules, self.mesh, shape)

    def _context(self):
        return sharding.use_mesh_rules(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def _struct(self, shape, dtype):
        """An abstract host input: replicated on a mesh."""
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._sharding((None,) * len(shape), shape))

    def _put(self, *xs):
        """Host arrays onto the device(s) in one call (replicated on a mesh). (jnp.asarray would
        dispatch a conversion per array: a third of the engine thread's time under load.)"""
        xs = [np.array(x) for x in xs]  # copies: the host arrays change while a call is in flight
        shardings = [self._sharding((None,) * x.ndim, x.shape) for x in xs] if self.mesh is not None else None
        return jax.device_put(xs, shardings)

    def cache_struct_leaves(self) -> list:
        """The cache's arrays (k and v: one stacked buffer each, or one per layer) as shapes."""
        return jax.tree.leaves((self._cache_struct, self._cache_struct))

    @property
    def prefill_buckets(self) -> list[int]:
        b, out = self.min_prefill_bucket, []
        while b <= self.prefill_chunk:
            out.append(b)
            b *= 2
        return out

    def _program(self, kind: str, bucket: int = 0, prompt_logprobs: bool = False):
        """The compiled program, compiled (and timed) on first use."""
        key = (kind, bucket, prompt_logprobs)
        if key in self._programs:
            return self._programs[key]
        cache = (self._cache_struct, self._cache_struct)
        S = self.slots
        t0 = time.perf_counter()
        with self._context():
            if kind == "decode":
                fn = jax.jit(self._decode_fn, donate_argnums=(2,), static_argnames=("window",), **self._jit_kw)
                i32, f32, b = (self._struct((S,), t) for t in (jnp.int32, jnp.float32, jnp.bool_))
                lowered = fn.lower(self.params, self.layer_params, cache, (i32, i32, i32), b, i32, i32, i32,
                                   self._struct(self._keys.shape, jnp.uint32), f32, f32, b, window=bucket)
            else:
                fn = jax.jit(self._prefill_fn, donate_argnums=(2,), static_argnames=("prompt_logprobs",),
                             **self._jit_kw)
                i32, f32 = self._struct((), jnp.int32), self._struct((), jnp.float32)
                lowered = fn.lower(self.params, self.layer_params, cache, self._struct((1, bucket), jnp.int32),
                                   self._struct((1, bucket), jnp.int32), i32, i32, i32, i32,
                                   self._struct(self._key_shape(), jnp.uint32), f32, f32, self._struct((), jnp.bool_),
                                   prompt_logprobs=prompt_logprobs)
            compiled = lowered.compile()
        seconds = time.perf_counter() - t0
        name = f"{kind} {bucket}" + (" +prompt logprobs" if prompt_logprobs else "")
        self.compile_seconds[name] = seconds
        log.info("compiled %s in %.2f s%s", name, seconds, "" if self._thread is None else " (first use)")
        self._programs[key] = compiled
        return compiled

    def compile(self) -> dict[str, float]:
        """Compiles the decode step of every window and every prefill bucket now; {program: seconds}."""
        for w in self.windows:
            self._program("decode", w)
        for b in self.prefill_buckets:
            self._program("prefill", b)
        return dict(self.compile_seconds)

    # ------------------------------------------------------------------ compiled parts

    def _choose(self, logits, keys, step, temperature, top_p, wanted):
        """Next token per row, and where some row wants them (`wanted`), its log-probability under
        the model (before temperature and top-p) and the max_logprobs most likely tokens."""
        tok = decode.sample_tokens(logits, keys, step, temperature, top_p)
        k = max(self.max_logprobs, 1)

        def none(logits, tok):
            b = logits.shape[0]
            return jnp.zeros((b,), jnp.float32), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32)

        return (tok, *jax.lax.cond(jnp.any(wanted), self._logprobs, none, logits, tok))

    def _logprobs(self, logits, tokens):
        """(log-probability of `tokens` [rows], the max_logprobs most likely ids and theirs) under
        the model's distribution (before temperature and top-p) for logits [rows, vocab]."""
        logp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_ids = jax.lax.top_k(logp, max(self.max_logprobs, 1))
        return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp

    def _decode_fn(self, params, layer_params, cache, state, patch, tokens, pos, step, key_data, temperature, top_p,
                   wanted, *, window):
        """`decode_steps` tokens per row: outputs [decode_steps, slots, ...], and the slots' state
        (token fed, its position, steps generated) after them, which the next call starts from
        (no host round trip in between). Rows where `patch` is set start from the host's tokens,
        pos, step instead: a sequence that joined or left. A row that ends inside the call runs on
        to its end (the host drops those tokens); idle rows (pos >= max_len) write nothing."""
        model = nnx.merge(self.model.graphdef, params)
        ones = jnp.ones((self.slots, self.max_len), jnp.int32)  # one segment: the causal mask does the rest
        keys = jax.vmap(jax.random.wrap_key_data)(key_data)
        tokens, pos, step = (jnp.where(patch, h, d) for h, d in zip((tokens, pos, step), state))

        def one(carry, _):
            (k, v), tokens, pos, step = carry
            logits, kv = model.decode_step(tokens[:, None], model_lib.KVCache(k, v, ones, pos),
                                           positions=pos[:, None], window=None if window == self.max_len else window,
                                           layer_params=layer_params)
            out = self._choose(logits, keys, step, temperature, top_p, wanted)
            return ((kv.k, kv.v), out[0], pos + 1, step + 1), out

        (cache, last, end, step), outs = jax.lax.scan(one, (cache, tokens, pos, step), None, length=self.decode_steps)
        idle = pos >= self.max_len  # stays idle (max_len) until the host patches a sequence in
        state = (last, jnp.where(idle, self.max_len, jnp.minimum(end, self.max_len)), step)
        if self.mesh is not None:  # replicated, as the next call's inputs were compiled for
            state = tuple(jax.lax.with_sharding_constraint(x, self._sharding((None,), x.shape)) for x in state)
        return cache, outs, state

    def _prefill_fn(self, params, layer_params, cache, tokens, next_tokens, slot, start, n_valid, step, key_data,
                    temperature, top_p, wanted, *, prompt_logprobs):
        """tokens [1, C] (right-padded) into row `slot` at columns start.. of the cache; samples
        from the logits of token n_valid - 1. With prompt_logprobs also the log-probabilities of
        next_tokens [1, C] (each position's following prompt token)."""
        model = nnx.merge(self.model.graphdef, params)
        k, v = cache
        c = tokens.shape[1]
        row_of = functools.partial(jax.tree.map, lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=1))
        row = model_lib.KVCache(row_of(k), row_of(v), jnp.ones((1, self.max_len), jnp.int32), start)
        positions = start + jnp.arange(c, dtype=jnp.int32)[None]
        at = jnp.arange(c, dtype=jnp.int32)[None] if prompt_logprobs else (n_valid - 1)[None]
        logits, row = model.decode_step(tokens, row, positions=positions, logits_at=at, layer_params=layer_params)
        # Only the chunk's new columns go back into the cache, not the whole row: written back
        # whole, the row (read from the same buffers) made XLA:CPU copy each per-layer buffer
        # before updating it in place (layers unrolled, 64 slots: 41 ms per prefill call, not 9).
        put = lambda x, r: jax.lax.dynamic_update_slice(x, jax.lax.dynamic_slice_in_dim(r, start, c, axis=3),
                                                        (0, slot, 0, start, 0))
        k, v = jax.tree.map(put, k, row.k), jax.tree.map(put, v, row.v)
        last = jax.lax.dynamic_index_in_dim(logits[0], n_valid - 1, keepdims=True) if prompt_logprobs else logits
        key = jax.random.wrap_key_data(key_data)[None]
        first = self._choose(last, key, step, temperature, top_p, wanted)
        extra = self._logprobs(logits[0], jnp.maximum(next_tokens[0], 0)) if prompt_logprobs else ()
        return (k, v), first, extra

    # ------------------------------------------------------------------ requests

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError naming what is wrong with this prompt and these settings."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty (phi has no BOS token: give at least one token)")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens={params.max_tokens} must be >= 1")
        if n + params.max_tokens > self.max_len:
            raise ValueError(f"this model's maximum context length is {self.max_len} tokens; the prompt has {n} "
                             f"tokens and max_tokens is {params.max_tokens} ({n + params.max_tokens} in all)")
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids outside [0, {self.cfg.vocab_size}): {bad[:5]}")
        if not params.temperature >= 0:
            raise ValueError(f"temperature={params.temperature} must be >= 0")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p={params.top_p} must be in (0, 1]")
        if params.logprobs is not None and not 0 <= params.logprobs <= self.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} must be in [0, {self.max_logprobs}]")
        if params.seed is not None and not 0 <= params.seed < 2**32:
            raise ValueError(f"seed={params.seed} must be in [0, 2**32)")

    def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int,
               on_event: Callable[[Seq, Event], None]) -> list[Seq]:
        """Queues n choices of every prompt (a list of token-id lists); returns their Seqs in the
        order prompt-major, choice-minor. Raises ValueError (bad input), QueueFull, or
        RuntimeError if the engine has stopped."""
        for p in prompts:
            self.check(p, params)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        tok = self.model.tokenizer
        seqs = [Seq(p, params, i, j, seed, on_event, StopScanner(tok, params.stop))
                for i, p in enumerate(prompts) for j in range(n)]
        with self._cv:
            if self.error is not None or self._stopping:
                raise RuntimeError(self.error or "the engine is shutting down")
            free = self.slots - self.running
            if len(self._waiting) + len(seqs) - free > self.max_queued:
                raise QueueFull(f"{max(0, len(self._waiting) - free)} sequences are waiting for a slot and this "
                                f"request adds {len(seqs)}; the limit is {self.max_queued}")
            self._waiting.extend(seqs)
            self._cv.notify()
        return seqs

    def cancel(self, seqs: Sequence[Seq]) -> None:
        """Ends these sequences (finish_reason 'cancelled' unless already finished); their slots
        are free before the next step."""
        with self._cv:
            for s in seqs:
                s.cancelled = True
            self._cv.notify()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(o is not None for o in self._owner)

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        zeros = jax.jit(lambda: jax.tree.map(lambda c: jnp.zeros(c.shape, c.dtype), self._cache_struct),
                        out_shardings=jax.tree.map(lambda c: c.sharding, self._cache_struct))
        self.cache = (zeros(), zeros())
        self._state = tuple(self._put(self._tok, self._pos, self._step))  # every slot idle
        self._thread = threading.Thread(target=self._loop, name="phijax-serve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 60.0) -> None:
        """Cancels whatever still waits or runs and stops the engine thread."""
        with self._cv:
            self._stopping = True
            for s in list(self._waiting) + [o for o in self._owner if o is not None]:
                s.cancelled = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def _loop(self):
        in_flight = None  # the decode call whose tokens the host has not read yet (module docstring)
        try:
            while True:
                with self._cv:
                    self._reap()
                    self._admit()
                    if self._stopping and not self._waiting and self.running == 0:
                        return
                    if not self._prefilling and not self._decoding() and in_flight is None:
                        self._cv.wait()
                        continue
                # Prefill: a chunk's worth of prompt tokens per decode step while others decode.
                budget = self.prefill_chunk * self.decode_steps if self._decoding() else float("inf")
                while self._prefilling and budget > 0 and not self._prefilling[0].cancelled:
                    budget -= self._prefill_chunk(self._prefilling[0])
                dispatched = self._dispatch(pipelined=in_flight is not None) if self._decoding() else None
                if in_flight is not None:
                    self._collect(*in_flight)
                in_flight = dispatched
        except Exception as e:  # a device error: fail every sequence, report through /health
            log.exception("the serving engine stopped")
            with self._cv:
                self.error = f"{type(e).__name__}: {e}"
                for s in list(self._waiting) + [o for o in self._owner if o is not None]:
                    self._finish(s, FINISH_ERROR, error=self.error)
                self._waiting.clear()

    def _decoding(self) -> bool:
        return any(o is not None and o.prefilled == o.prompt_tokens for o in self._owner)

    def _reap(self):
        for s in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(s)
            self._finish(s, FINISH_CANCELLED)
        for o in self._owner:
            if o is not None and o.cancelled:
                self._finish(o, FINISH_CANCELLED)

    def _admit(self):
        for slot in range(self.slots):
            if not self._waiting:
                return
            if self._owner[slot] is None:
                s = self._waiting.popleft()
                s.slot = slot
                self._owner[slot] = s
                self._prefilling.append(s)

    def _free(self, s: Seq):
        if s.slot is not None:
            self._owner[s.slot] = None
            self._pos[s.slot] = self.max_len
            self._patch[s.slot] = True
            self._temp[s.slot] = 0.0
            self._want[s.slot] = False
            s.slot = None
        if s in self._prefilling:
            self._prefilling.remove(s)

    def _finish(self, s: Seq, reason: str, event: Event | None = None, error: str | None = None):
        if s.finish_reason is not None:
            return
        self._free(s)
        s.finish_reason = reason
        self.stats[reason] += 1
        event = event or Event()
        if reason in (FINISH_STOP, FINISH_LENGTH):
            event.text += s.scanner.flush()
        event.finish_reason, event.error = reason, error
        s.on_event(s, event)

    def _key_data(self, s: Seq) -> np.ndarray:
        key = decode.row_keys(np.uint32(s.seed), jnp.asarray([s.prompt_index]), jnp.asarray([s.choice]))[0]
        return np.asarray(jax.random.key_data(key))

    def _prefill_chunk(self, s: Seq) -> int:
        """Runs the next chunk of s's prompt; the last one samples its first token. Returns the
        chunk's prompt tokens."""
        start, total = s.prefilled, s.prompt_tokens
        n = min(self.prefill_chunk, total - start)
        c = decode.pow2_bucket(n, self.min_prefill_bucket)
        tokens = np.full((1, c), self.pad_id, np.int32)
        tokens[0, :n] = s.prompt_ids[start:start + n]
        nxt = np.full((1, c), -1, np.int32)
        follow = s.prompt_ids[start + 1:start + n + 1]
        nxt[0, :len(follow)] = follow
        p = s.params
        if start == 0:
            self._keys[s.slot] = self._key_data(s)
        prog = self._program("prefill", c, p.prompt_logprobs)
        with self._context():
            self.cache, first, extra = prog(self.params, self.layer_params, self.cache, *self._put(
                tokens, nxt, np.int32(s.slot), np.int32(start), np.int32(n), np.int32(0), self._keys[s.slot],
                np.float32(p.temperature), np.float32(p.top_p), np.bool_(p.logprobs is not None)))
        s.prefilled = start + n
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += n
        if p.prompt_logprobs:
            chosen, top_ids, top_lp = jax.device_get(extra)
            for i in range(len(follow)):
                s.prompt_lps.append(self._logprob(follow[i], chosen[i], top_ids[i], top_lp[i], p.logprobs))
        if s.prefilled < total:
            return n
        self._prefilling.remove(s)
        tok, chosen, top_ids, top_lp = jax.device_get(first)
        slot = s.slot
        self._temp[slot], self._top_p[slot], self._want[slot] = p.temperature, p.top_p, p.logprobs is not None
        event = Event()
        if not self._take(s, int(tok[0]), chosen[0], top_ids[0], top_lp[0], event=event):
            s.on_event(s, event)
            # The slot joins the next decode call from here: its first token at the prompt's end.
            self._tok[slot], self._pos[slot], self._step[slot], self._patch[slot] = int(tok[0]), total, 1, True
        return n

    def _dispatch(self, pipelined: bool):
        """Starts a decode call for the sequences that have their first token; returns what
        `_collect` needs to read it: (outputs, the sequence of each slot)."""
        running = [o if o is not None and o.prefilled == o.prompt_tokens else None for o in self._owner]
        # A window must also cover the call in flight, whose tokens the host has not read yet.
        ahead = self.decode_steps * (2 if pipelined else 1)
        reach = max(o.prompt_tokens + o.completion_tokens - 1 + ahead for o in running if o is not None)
        prog = self._program("decode", next((w for w in self.windows if w >= reach), self.max_len))
        with self._context():
            host = self._put(self._patch, self._tok, self._pos, self._step, self._keys, self._temp, self._top_p,
                             self._want)
            self.cache, out, self._state = prog(self.params, self.layer_params, self.cache, self._state, *host)
        self._patch[:] = False
        self.stats["decode_steps"] += self.decode_steps
        return out, running

    def _collect(self, out, running):
        """The host side of a decode call: each token of each sequence that was running in it and
        has not finished since (a finished one's slot may already hold another sequence)."""
        tok, chosen, top_ids, top_lp = jax.device_get(out)
        for slot, s in enumerate(running):
            if s is None or s.finish_reason is not None or s.slot != slot:
                continue
            event = Event()
            for j in range(self.decode_steps):
                if self._take(s, int(tok[j, slot]), chosen[j, slot], top_ids[j, slot], top_lp[j, slot],
                              event=event):
                    break
            else:
                s.on_event(s, event)

    def _logprob(self, token, chosen, top_ids, top_lp, k) -> TokenLogprob:
        k = k or 0
        return TokenLogprob(int(token), float(chosen), [(int(i), float(x)) for i, x in zip(top_ids[:k], top_lp[:k])])

    def _take(self, s: Seq, token: int, chosen, top_ids, top_lp, *, event: Event) -> bool:
        """Host side of one generated token: its text, logprobs, stop checks into `event`.
        Returns True once s has finished (its last event then sent)."""
        with self._cv:
            if s.cancelled:
                self._finish(s, FINISH_CANCELLED, event)
                return True
        s.generated.append(token)
        self.stats["tokens"] += 1
        p = s.params
        event.tokens.append(token)
        if s.completion_tokens == 1 and p.prompt_logprobs:
            event.prompt_logprobs = s.prompt_lps
        reason = None
        if p.stop_at_eos and token == self.eos_id:
            reason = FINISH_STOP
        else:
            if p.logprobs is not None:
                event.logprobs.append(self._logprob(token, chosen, top_ids, top_lp, p.logprobs))
            text, stopped = s.scanner.add(token)
            event.text += text
            if stopped:
                reason = FINISH_STOP
        if reason is None and s.completion_tokens >= p.max_tokens:
            reason = FINISH_LENGTH
        if reason is not None:
            self._finish(s, reason, event)
            return True
        return False
