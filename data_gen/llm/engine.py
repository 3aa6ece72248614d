"""The async generation engine: any OpenAI-compatible endpoint through the official client.

    cfg = EngineConfig(model=..., rpm=600, tpm=200_000, budget_usd=5.0, prices={...})
    report = Engine(out_dir, cfg).run_sync(requests)       # or: await Engine(...).run(requests)
    for rec in iter_answers(out_dir / RESPONSES_FILE): ...

A run holds the output directory's lock (``lock.py``). Per request: reserve its worst-case cost
in the budget (in request order; a reservation that does not fit stops the run cleanly), wait
for the rate limiter (concurrency, requests/min, tokens/min), mark it in flight in the ledger,
send it, and on a well-formed HTTP 200 append the result to responses.jsonl (fsync'd) and then
mark it done. Failures are retried per ``retry.py``: a 200 whose body is not a usable completion
(malformed) like a 5xx; 429s after their Retry-After without spending attempts (up to
``rate_limit_max_wait_s`` of waiting per request). finish_reason "length" or "content_filter" is
recorded with that status, never passed off as complete. 401 / 403 / 404 (key, permission,
model) stop the run at once, as do ``unreachable_after`` connection failures before any answer
(``EndpointError``), recording nothing against the samples.

Connection settings come from gin or the standard environment: ``base_url`` (else
OPENAI_BASE_URL, else api.openai.com), the key from ``$api_key_env`` (default OPENAI_API_KEY),
``organization`` (else OPENAI_ORG_ID). The key is never logged or written: every error text
that is stored or logged passes through ``Redactor``.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import gin

from data_gen.llm import batch as batch_lib
from data_gen.llm import cost as cost_lib
from data_gen.llm import ledger as ledger_lib
from data_gen.llm import lock as lock_lib
from data_gen.llm import ratelimit
from data_gen.llm import retry as retry_lib
from data_gen.llm.errors import EndpointError, EngineError, OutputDirError  # noqa: F401 (re-exported)
from data_gen.llm.outcome import RESULT_STATUSES, Outcome, Progress, RunReport, parse_completion  # noqa: F401
from data_gen.llm.request import Request, TokenCounter, estimate_tokens, split_params

log = logging.getLogger(__name__)

TPM_COUNTS = ("usage", "reserved")
RETRY_LOG_INTERVAL_S = 10.0


@gin.configurable(module="data_gen")
@dataclasses.dataclass
class EngineConfig:
    """Everything about talking to the endpoint. Bound in gin as ``data_gen.EngineConfig.*``."""

    model: str = "gpt-3.5-turbo"
    base_url: str | None = None          # else $OPENAI_BASE_URL, else the OpenAI API
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key
    api_key: str | None = None           # discouraged: config files get copied around
    organization: str | None = None      # else $OPENAI_ORG_ID
    concurrency: int = 32                # requests in flight at once
    rpm: float | None = None             # requests per minute (None: no client-side limit)
    tpm: float | None = None             # tokens per minute (prompt + max_tokens reserved)
    burst_s: float = 1.0                 # bucket size, in seconds of the limit
    tpm_counts: str = "usage"            # 'usage': correct by reported usage; 'reserved': don't
    timeout_s: float = 120.0             # per HTTP request
    max_attempts: int = 8                # per request and run: failed attempts (5xx, network, malformed)
    rate_limit_max_wait_s: float = 1800.0  # per request and run: waiting after 429s (no attempts spent)
    unreachable_after: int = 5           # connection failures before any answer that stop the run
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    prices: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    budget_usd: float | None = None      # cap on total spend in this output dir (None: none)
    prompt_margin: float = 1.25          # worst-case prompt tokens = estimate x margin
    tokenizer_file: str | None = None    # exact prompt counts from a tokenizer.json
    retry_failed: bool = False           # also resend requests that failed with a 4xx before
    fsync: bool = True                   # fsync every result line
    progress: bool = True                # tqdm bar on stderr
    use_batch: bool = False              # the Batch API instead of online requests
    batch_max_requests: int = 50_000     # per batch job (OpenAI's limit)
    batch_poll_s: float = 30.0
    batch_max_rounds: int = 3            # resubmissions of failed / expired batch requests
    batch_completion_window: str = "24h"

    def validate(self) -> None:
        if self.concurrency < 1:
            raise EngineError(f"concurrency must be >= 1, got {self.concurrency}")
        for name in ("rpm", "tpm", "budget_usd"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise EngineError(f"{name} must be > 0 or None, got {v!r}")
        if self.tpm_counts not in TPM_COUNTS:
            raise EngineError(f"tpm_counts must be one of {TPM_COUNTS}, got {self.tpm_counts!r}")
        if self.max_attempts < 1 or self.batch_max_rounds < 1 or self.unreachable_after < 1:
            raise EngineError("max_attempts, batch_max_rounds and unreachable_after must be >= 1")
        if not self.rate_limit_max_wait_s >= 0:
            raise EngineError(f"rate_limit_max_wait_s must be >= 0, got {self.rate_limit_max_wait_s!r}")
        if not self.prompt_margin >= 1.0:
            raise EngineError(f"prompt_margin must be >= 1, got {self.prompt_margin}")
        try:
            cost_lib.PriceTable(self.prices)
        except cost_lib.PriceError as e:
            raise EngineError(str(e)) from None


# --- secrets ------------------------------------------------------------------------
_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]{8,}")


class Redactor:
    """Replaces known secrets (and anything shaped like an OpenAI key) in text."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def __call__(self, text: Any) -> str:
        s = str(text)
        for secret in self.secrets:
            s = s.replace(secret, "[REDACTED]")
        return _KEY_PATTERN.sub(r"\1…[REDACTED]", s)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's message (install on handlers)."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = self.redactor(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(redactor: Redactor) -> None:
    """Redacts secrets in everything the root logger's handlers emit."""
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter(redactor))


# --- reports ------------------------------------------------------------------------
@dataclasses.dataclass
class Estimate:
    """What a run would send (``--dry_run``): nothing is contacted."""

    n_requests: int = 0
    n_already_done: int = 0
    n_to_send: int = 0
    prompt_tokens: int = 0
    max_completion_tokens: int = 0
    worst_case_usd: float = 0.0
    batch_worst_case_usd: float = 0.0
    spent_usd: float = 0.0
    budget_usd: float | None = None
    priced: bool = True

    def lines(self) -> list[str]:
        return [
            f"requests: {self.n_requests} ({self.n_already_done} already done, {self.n_to_send} to send)",
            f"prompt tokens (estimated): {self.prompt_tokens:,}; completion tokens at most: {self.max_completion_tokens:,}",
            (f"cost at most: ${self.worst_case_usd:,.4f} online, ${self.batch_worst_case_usd:,.4f} with the Batch API"
             if self.priced else "cost: unknown (no price for the model; add it to data_gen.EngineConfig.prices)"),
            f"spent so far in this output dir: ${self.spent_usd:,.4f}; budget: "
            + ("none" if self.budget_usd is None else f"${self.budget_usd:,.4f}"),
        ]


def make_client(cfg: EngineConfig):
    """The official AsyncOpenAI client, with its own retries off (the engine retries)."""
    from openai import AsyncOpenAI

    key = cfg.api_key or os.environ.get(cfg.api_key_env)
    base_url = cfg.base_url or os.environ.get("OPENAI_BASE_URL")
    if not key:
        if base_url and "api.openai.com" not in base_url:
            key = "EMPTY"  # local servers (vLLM, TGI, llama.cpp) accept any key
        else:
            raise EngineError(f"no API key: set ${cfg.api_key_env} (or point base_url / OPENAI_BASE_URL"
                              " at a server that needs none)")
    return AsyncOpenAI(api_key=key, base_url=base_url, organization=cfg.organization,
                       timeout=cfg.timeout_s, max_retries=0)


def api_key_of(cfg: EngineConfig) -> str | None:
    return cfg.api_key or os.environ.get(cfg.api_key_env)


def limits_line(cfg: EngineConfig, tokens_per_request: int) -> str:
    """How many requests can be in flight and which setting binds it (logged at the start).
    rpm / tpm bound the request rate; a rate of r per second keeps r x latency in flight, so they
    bind unless requests take long enough (tpm counted at the reservation, prompt + max_tokens)."""
    n = cfg.concurrency
    rates = {}  # requests per minute each limit admits
    if cfg.rpm:
        rates["rpm"] = (cfg.rpm, f"rpm {cfg.rpm:g}")
    if cfg.tpm:
        rates["tpm"] = (cfg.tpm / max(tokens_per_request, 1),
                        f"tpm {cfg.tpm:g} at {tokens_per_request:,} tokens reserved per request")
    if not rates:
        return (f"at most {n} requests in flight: concurrency binds (no rpm / tpm set: the server's 429s and"
                " Retry-After pace the run)")
    name, (per_min, detail) = min(rates.items(), key=lambda kv: kv[1][0])
    need_s = n / (per_min / 60.0)  # how long a request must take for n to be in flight at that rate
    if need_s <= 1.0:
        return f"at most {n} requests in flight: concurrency binds ({detail} admits {per_min:,.0f} requests/min)"
    return (f"at most {n} requests in flight (concurrency), but {name} binds unless each request takes"
            f" {need_s:,.0f}s or longer: {detail} admits {per_min:,.0f} requests/min")


class RetryLog:
    """Retries at WARNING, at most one line per ``interval_s`` (the first at once): how many by
    reason since the last line, and the latest error."""

    def __init__(self, interval_s: float = RETRY_LOG_INTERVAL_S):
        self.interval_s = interval_s
        self.counts: collections.Counter = collections.Counter()
        self.last = -float("inf")

    def note(self, reason: str, text: str) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            log.warning("retrying (%s since the last such line); latest: %s",
                        ", ".join(f"{r}: {c}" for r, c in self.counts.most_common()), text)
            self.counts.clear()
            self.last = now


# --- the engine ---------------------------------------------------------------------
class Engine:
    def __init__(self, out_dir: str | os.PathLike, config: EngineConfig, client=None):
        config.validate()
        self.out_dir = Path(out_dir)
        self.cfg = config
        self.prices = cost_lib.PriceTable(config.prices)
        self.counter = TokenCounter(config.tokenizer_file)
        self.redact = Redactor([api_key_of(config)])
        self._client = client
        self._owns_client = client is None
        self.backoff = retry_lib.Backoff(config.backoff_base_s, config.backoff_max_s)

    @property
    def responses_path(self) -> Path:
        return self.out_dir / ledger_lib.RESPONSES_FILE

    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.cfg)
        return self._client

    def check_prices(self, models: Iterable[str]) -> None:
        """With a budget, every model needs a price (else the cap could not be enforced)."""
        if self.cfg.budget_usd is None:
            return
        missing = sorted({m for m in models if not self.prices.has(m)})
        if missing:
            raise EngineError(f"budget_usd is set but there is no price for {missing}: add"
                              " data_gen.EngineConfig.prices = {'model': {'input': usd_per_1M, 'output': usd_per_1M}}")

    def endpoint_error(self, code: int, error: str, model: str) -> EndpointError:
        """The run-stopping error for a 401 / 403 / 404, saying what to fix (the key redacted)."""
        key = "data_gen.EngineConfig.api_key" if self.cfg.api_key else f"${self.cfg.api_key_env}"
        fix = {401: f"The API key was rejected: set {key} to a valid key for this endpoint",
               403: f"Permission denied: the key in {key} may not use model {model!r} here (check the key's"
                    " project / organization and its model access)",
               404: f"Model {model!r} was not found: check data_gen.EngineConfig.model (and base_url:"
                    " OpenAI-compatible servers answer under /v1)"}[code]
        return EndpointError(self.redact(f"{str(self.client.base_url).rstrip('/')}: {error.rstrip('.')}. {fix};"
                                         " the run stopped and nothing was recorded against the samples"))

    def worst_case(self, req: Request, batch: bool = False) -> tuple[int, float]:
        """(prompt + max tokens reserved for rate limits, worst-case USD)."""
        prompt = self.counter.prompt(req)
        usd = self.prices.cost(req.model, prompt * self.cfg.prompt_margin, req.max_tokens, batch)
        return prompt + req.max_tokens, usd

    # --- dry run ----------------------------------------------------------------------
    def estimate(self, requests: Iterable[Request]) -> Estimate:
        """Tokens and worst-case cost of what ``run`` would send; reads the output dir (if
        any) to skip completed work, contacts nothing, writes nothing. An ``out_dir`` that is a
        file (or under one) is an OutputDirError, as it is for a real run."""
        lock_lib.check_not_a_file(self.out_dir)
        done = {r["key"] for r in ledger_lib.iter_answers(self.responses_path)}
        spent = 0.0
        if (self.out_dir / ledger_lib.LEDGER_FILE).exists():
            led = ledger_lib.Ledger(self.out_dir / ledger_lib.LEDGER_FILE)
            spent = led.spent()
            led.close()
        est = Estimate(spent_usd=spent, budget_usd=self.cfg.budget_usd)
        seen = set()
        for req in requests:
            k = req.key
            if k in seen:
                continue
            seen.add(k)
            est.n_requests += 1
            if k in done:
                est.n_already_done += 1
                continue
            est.n_to_send += 1
            p = self.counter.prompt(req)
            est.prompt_tokens += p
            est.max_completion_tokens += req.max_tokens
            est.priced &= self.prices.has(req.model)
            est.worst_case_usd += self.worst_case(req)[1]
            est.batch_worst_case_usd += self.worst_case(req, batch=True)[1]
        return est

    # --- run --------------------------------------------------------------------------
    def open_state(self, report: RunReport) -> tuple[ledger_lib.Ledger, ledger_lib.ResultLog, set[str]]:
        """Repairs and reconciles the output dir; returns (ledger, result log, done keys)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        results = ledger_lib.ResultLog(self.responses_path, fsync=self.cfg.fsync)
        report.repaired["torn_bytes_cut"] = results.open()
        led = ledger_lib.Ledger(self.out_dir / ledger_lib.LEDGER_FILE)
        done: set[str] = set()

        def stream():  # one pass, without holding every result's text in memory
            for r in ledger_lib.iter_answers(self.responses_path):
                done.add(r["key"])
                yield r
        report.repaired.update(led.reconcile(stream()))
        return led, results, done

    def write_result(self, results: ledger_lib.ResultLog, led: ledger_lib.Ledger, req: Request,
                     out: Outcome, cost_usd: float, via: str, attempts: int) -> None:
        """The result line first (fsync'd), then the ledger: a kill in between is repaired by
        ``Ledger.reconcile`` on the next start."""
        rec = {"key": req.key, "sample_index": req.sample_index, "model": req.model, "kind": req.kind,
               "status": out.status, "finish_reason": out.finish_reason, "text": out.text,
               "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                         "reported": out.usage_reported},
               "cost_usd": round(cost_usd, 10), "via": via, "response_id": out.response_id,
               "attempts": attempts, "meta": dict(req.meta), "time": round(time.time(), 3)}
        if out.error:
            rec["error"] = self.redact(out.error)
        results.append(rec)
        led.mark_done(req.key, req.sample_index, out.status, out.prompt_tokens, out.completion_tokens,
                      cost_usd, via)

    def settle_usage(self, req: Request, out: Outcome, batch: bool) -> float:
        """Fills in usage the server did not report and returns the actual cost."""
        if not out.usage_reported:
            out.prompt_tokens = self.counter.prompt(req)
            out.completion_tokens = estimate_tokens(out.text or "")
        return self.prices.cost(req.model, out.prompt_tokens, out.completion_tokens, batch)

    async def call(self, req: Request) -> Outcome:
        """One HTTP attempt; exceptions become Outcomes."""
        import openai

        known, extra = split_params(req.params)
        kwargs: dict[str, Any] = dict(model=req.model, **known)
        if extra:
            kwargs["extra_body"] = extra
        try:
            if req.kind == "chat":
                raw = await self.client.chat.completions.with_raw_response.create(
                    messages=list(req.messages), **kwargs)
            else:
                raw = await self.client.completions.with_raw_response.create(prompt=req.prompt, **kwargs)
            body = raw.text
        except openai.APIStatusError as e:
            code = e.status_code
            return Outcome(error=self.redact(f"HTTP {code}: {e.message}"), status_code=code,
                           retryable=retry_lib.is_retryable_status(code),
                           retry_after=retry_lib.parse_retry_after(e.response.headers),
                           reason=str(code) if code in (408, 409, 429) else ("5xx" if code >= 500 else "4xx"))
        except openai.APITimeoutError as e:
            if type(e.__cause__).__name__ == "ConnectTimeout":  # httpx's: nothing reached the server
                return Outcome(error=f"connection error: connect timed out after {self.cfg.timeout_s}s",
                               retryable=True, reason="connection")
            return Outcome(error=f"timed out after {self.cfg.timeout_s}s", retryable=True, reason="timeout")
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            return Outcome(error=self.redact(f"connection error: {type(cause).__name__}: {cause}"),
                           retryable=True, reason="connection")
        return parse_completion(req.kind, body)

    async def process(self, req: Request, ctx: "_RunContext", tokens: int, reserved_usd: float) -> None:
        """Sends one request (retrying) with its rate-limit tokens and budget already reserved."""
        rng = random.Random(req.key)
        worst_usd = reserved_usd
        n_http = n_failed = n_429 = 0  # HTTP attempts; failures that spend attempts; 429s (which do not)
        waited_429 = 0.0
        try:
            while True:
                permit = await ctx.limiter.acquire(tokens)
                ctx.ledger.start_attempt(req.key, req.sample_index)
                ctx.report.n_http_attempts += 1
                n_http += 1
                try:
                    out = await self.call(req)
                except BaseException:
                    ctx.limiter.release(permit, None)
                    raise
                ctx.reachable |= out.status_code is not None
                if out.status in RESULT_STATUSES:  # a well-formed answer: done
                    cost = self.settle_usage(req, out, batch=False)
                    used = (out.prompt_tokens or 0) + (out.completion_tokens or 0)
                    ctx.limiter.release(permit, used if self.cfg.tpm_counts == "usage" else tokens)
                    self.write_result(ctx.results, ctx.ledger, req, out, cost, "online", n_http)
                    ctx.budget.settle(reserved_usd, cost)
                    reserved_usd = 0.0
                    ctx.report.count_result(out, cost)
                    ctx.progress.update(used, ctx.budget.spent)
                    if out.status != "ok":
                        log.warning("sample %d: %s", req.sample_index, out.status)
                    return
                # The run stops holding this permit, so that nothing more is sent.
                if out.status_code in ledger_lib.CONFIG_STATUS:
                    raise self.endpoint_error(out.status_code, out.error, req.model)
                if out.reason == "connection" and not ctx.reachable:
                    ctx.connect_failures += 1
                    if ctx.connect_failures >= self.cfg.unreachable_after or n_failed + 1 >= self.cfg.max_attempts:
                        raise EndpointError(self.redact(
                            f"cannot reach {str(self.client.base_url).rstrip('/')}: {ctx.connect_failures}"
                            f" connection failures and no answer yet (last: {out.error}); check base_url /"
                            " $OPENAI_BASE_URL and that the server is running; nothing was recorded"))
                if out.status == "malformed":  # served but unusable: charged at its worst case, asked again
                    ctx.limiter.release(permit, tokens)
                    ctx.ledger.charge(req.key, reserved_usd, "malformed")
                    ctx.budget.settle(reserved_usd, reserved_usd)
                    ctx.report.spent_usd += reserved_usd
                    reserved_usd = 0.0
                else:
                    ctx.limiter.release(permit, None)
                ctx.ledger.note_error(req.key, out.status_code, out.error)
                if not out.retryable:
                    self.give_up(req, ctx, out, out.error)
                    return
                if out.status_code == 429:
                    n_429 += 1
                    delay = self.backoff.delay(n_429 - 1, out.retry_after, rng)
                    ctx.limiter.cooldown(out.retry_after if out.retry_after is not None else self.cfg.backoff_base_s)
                    if waited_429 + delay > self.cfg.rate_limit_max_wait_s:
                        self.give_up(req, ctx, out, f"rate limited for {waited_429:.1f}s in total"
                                     f" (rate_limit_max_wait_s = {self.cfg.rate_limit_max_wait_s:g}): {out.error}")
                        return
                    waited_429 += delay
                else:
                    n_failed += 1
                    delay = self.backoff.delay(n_failed - 1, out.retry_after, rng)
                    if n_failed >= self.cfg.max_attempts:
                        self.give_up(req, ctx, out, f"gave up after {n_failed} failed attempts: {out.error}")
                        return
                if out.status == "malformed":  # the retry needs its own reservation
                    if not ctx.budget.try_reserve(worst_usd):
                        ctx.ledger.release(req.key)
                        ctx.report.n_not_sent += 1
                        ctx.report.stopped = "budget"
                        log.warning("sample %d: budget cap reached before asking again after a malformed answer",
                                    req.sample_index)
                        return
                    reserved_usd = worst_usd
                ctx.report.retries_by_reason[out.reason] += 1
                ctx.retry_log.note(out.reason, f"sample {req.sample_index}: {out.error}; retry in {delay:.2f}s")
                log.debug("sample %d: %s; retry in %.2fs", req.sample_index, out.error, delay)
                await asyncio.sleep(delay)
        except (EndpointError, asyncio.CancelledError):
            ctx.ledger.release(req.key)  # stopped: nothing recorded against the sample
            raise
        finally:
            if reserved_usd:
                ctx.budget.settle(reserved_usd, 0.0)
            ctx.settled.set()

    def give_up(self, req: Request, ctx: "_RunContext", out: Outcome, err: str) -> None:
        """Records a request as failed: retryable failures are asked again by the next run."""
        ctx.ledger.mark_failed(req.key, req.sample_index, out.status_code, err, out.retryable,
                               out.reason if out.retryable or out.status_code is None else str(out.status_code))
        ctx.report.n_failed += 1
        ctx.report.n_sent += 1
        log.warning("sample %d failed%s: %s", req.sample_index, "" if out.retryable else " (not retried)", err)

    async def run(self, requests: Iterable[Request], total: int | None = None) -> RunReport:
        """Sends every request not yet done; returns when all are done, failed, or the budget
        stopped the run. Safe to call again on the same output dir (resumes); holds its lock.
        EndpointError when the endpoint refuses the key / model or cannot be reached."""
        _ = self.client  # configuration errors (no key) before anything is touched
        with lock_lib.hold(self.out_dir):
            if self.cfg.use_batch:
                return await batch_lib.run_batch(self, requests, total)
            return await self.run_online(requests, total)

    async def run_online(self, requests: Iterable[Request], total: int | None) -> RunReport:
        t0 = time.monotonic()
        report = RunReport()
        led, results, done = self.open_state(report)
        permanent = set() if self.cfg.retry_failed else led.permanent_failures()
        budget = cost_lib.Budget(self.cfg.budget_usd, led.spent())
        limiter = ratelimit.RateLimiter(self.cfg.concurrency, self.cfg.rpm, self.cfg.tpm, self.cfg.burst_s)
        todo_total = None if total is None else max(total - len(done), 0)
        ctx = _RunContext(led, results, budget, limiter, report, Progress(todo_total, self.cfg.progress))
        outstanding = asyncio.Semaphore(2 * self.cfg.concurrency + 8)  # bounds reservations held
        seen: set[str] = set()
        checked: set[str] = set()
        config_error: EngineError | None = None
        announced = False
        try:
            async with asyncio.TaskGroup() as tg:
                for req in requests:
                    key = req.key
                    if key in seen:
                        report.n_duplicate_requests += 1
                        continue
                    seen.add(key)
                    report.n_requests += 1
                    if key in done:
                        report.n_already_done += 1
                        continue
                    if key in permanent:
                        report.n_skipped_failed += 1
                        continue
                    if report.stopped:
                        report.n_not_sent += 1
                        continue
                    if req.model not in checked:
                        try:
                            self.check_prices([req.model])
                        except EngineError as e:
                            config_error = e  # raised after in-flight requests are finished
                            break
                        checked.add(req.model)
                    tokens, usd = self.worst_case(req)
                    if not announced:  # before the first request sent
                        log.info("limits: %s", limits_line(self.cfg, tokens))
                        announced = True
                    await outstanding.acquire()
                    # In-flight requests usually cost less than reserved: wait for them to settle
                    # before concluding that the next request cannot be afforded.
                    fits = budget.try_reserve(usd)
                    while not fits and budget.n_reserved:
                        ctx.settled.clear()
                        await ctx.settled.wait()
                        fits = budget.try_reserve(usd)
                    if not fits:
                        outstanding.release()
                        report.stopped = "budget"
                        report.n_not_sent += 1
                        log.warning("budget cap $%.4f reached (spent $%.4f; the next request needs up to $%.4f):"
                                    " sending no more", budget.cap, budget.spent, usd)
                        continue
                    task = tg.create_task(self.process(req, ctx, tokens, usd))
                    task.add_done_callback(lambda _t: outstanding.release())
        except BaseExceptionGroup as eg:  # a request stopped the run (EndpointError): raise the first
            stop = eg.subgroup(lambda e: isinstance(e, EndpointError))
            if stop is None:
                raise
            while isinstance(stop, BaseExceptionGroup):
                stop = stop.exceptions[0]
            raise stop from None
        finally:
            ctx.progress.close()
            await self.finish(report, led, results)
        if config_error is not None:
            raise config_error
        report.elapsed_s = time.monotonic() - t0
        log.info("%s", report.summary())
        return report

    async def finish(self, report: RunReport, led: ledger_lib.Ledger, results: ledger_lib.ResultLog) -> None:
        results.close()
        report.total_spent_usd = led.spent()
        led.close()
        if self._client is not None and self._owns_client:
            await self._client.close()
            self._client = None

    def run_sync(self, requests: Iterable[Request], total: int | None = None) -> RunReport:
        return asyncio.run(self.run(requests, total))


@dataclasses.dataclass
class _RunContext:
    ledger: ledger_lib.Ledger
    results: ledger_lib.ResultLog
    budget: cost_lib.Budget
    limiter: ratelimit.RateLimiter
    report: RunReport
    progress: Progress
    settled: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # a request finished
    reachable: bool = False        # some request got an HTTP answer (any status) in this run
    connect_failures: int = 0      # connection failures before that
    retry_log: RetryLog = dataclasses.field(default_factory=RetryLog)
