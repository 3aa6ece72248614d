"""What a generation run produces, shared by the online engine (engine.py) and the Batch API
path (batch.py): one HTTP attempt's `Outcome` (and `parse_completion` of a 200 body), the run's
`RunReport`, and the progress bar."""
from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time
from typing import Any, Mapping

RESULT_STATUSES = ("ok", "length", "content_filter")  # well-formed answers; else "malformed"


@dataclasses.dataclass
class RunReport:
    n_requests: int = 0
    n_already_done: int = 0
    n_skipped_failed: int = 0          # earlier permanent (4xx) failures, not resent: still missing
    n_duplicate_requests: int = 0      # the same key twice in the input
    n_sent: int = 0                    # requests that got an HTTP response or were given up on
    by_status: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    n_failed: int = 0
    n_not_sent: int = 0                # left pending (budget)
    n_http_attempts: int = 0
    retries_by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spent_usd: float = 0.0             # this run
    total_spent_usd: float = 0.0       # this output dir, all runs
    stopped: str | None = None         # 'budget' when the cap stopped the run
    elapsed_s: float = 0.0
    repaired: dict = dataclasses.field(default_factory=dict)

    def count_result(self, out: "Outcome", cost_usd: float) -> None:
        self.n_sent += 1
        self.by_status[out.status] += 1
        self.prompt_tokens += out.prompt_tokens or 0
        self.completion_tokens += out.completion_tokens or 0
        self.spent_usd += cost_usd

    @property
    def complete(self) -> bool:
        return self.stopped is None and self.n_failed == 0 and self.n_not_sent == 0 and self.n_skipped_failed == 0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["by_status"], d["retries_by_reason"] = dict(self.by_status), dict(self.retries_by_reason)
        d["complete"] = self.complete
        return d

    def summary(self) -> str:
        rate = self.n_sent / self.elapsed_s * 60 if self.elapsed_s else 0.0
        parts = [f"{self.n_requests} requests: {self.n_already_done} already done, {self.n_sent} sent"
                 f" ({dict(self.by_status)}), {self.n_failed} failed, {self.n_not_sent} not sent"
                 + (f", {self.n_skipped_failed} skipped (failed before with a 4xx; retry_failed resends)"
                    if self.n_skipped_failed else ""),
                 f"{self.prompt_tokens + self.completion_tokens:,} tokens, ${self.spent_usd:.4f} this run"
                 f" (${self.total_spent_usd:.4f} in total), {rate:.0f} req/min over {self.elapsed_s:.1f}s"]
        if self.retries_by_reason:
            parts.append(f"retries: {dict(self.retries_by_reason)}")
        if self.stopped:
            parts.append(f"stopped: {self.stopped}")
        return "; ".join(parts)


# --- responses ----------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """One HTTP attempt: a served response (status in RESULT_STATUSES, or "malformed") or an error."""

    status: str | None = None          # set when the server answered 200
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_reported: bool = False
    response_id: str | None = None
    error: str | None = None
    status_code: int | None = None
    retryable: bool = False
    retry_after: float | None = None
    reason: str | None = None          # short error class for counters: '429', '5xx', 'timeout', ...


def parse_completion(kind: str, body: str | bytes | Mapping) -> Outcome:
    """Interprets a 200 body (chat or completion, online or from a batch). Never raises."""
    try:
        data = body if isinstance(body, Mapping) else json.loads(body)
        choice = data["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        if not isinstance(text, str):
            raise TypeError(f"content is {type(text).__name__}, not a string")
        finish = choice.get("finish_reason")
        usage = data.get("usage") or {}
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        reported = isinstance(pt, int) and isinstance(ct, int)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        snippet = (body[:120] if isinstance(body, (str, bytes)) else repr(body)[:120])
        return Outcome(status="malformed", error=f"malformed answer: {type(e).__name__}: {e}; body starts {snippet!r}",
                       status_code=200, retryable=True, reason="malformed")
    status = {"length": "length", "content_filter": "content_filter"}.get(finish, "ok")
    return Outcome(status=status, text=text, finish_reason=finish, status_code=200,
                   prompt_tokens=pt if reported else None,
                   completion_tokens=ct if reported else None, usage_reported=reported,
                   response_id=data.get("id") if isinstance(data.get("id"), str) else None)


# --- progress -----------------------------------------------------------------------
class Progress:
    """tqdm bar: completed requests, and rate, tokens/min, spend in the postfix (ETA from tqdm)."""

    def __init__(self, total: int | None, enabled: bool, desc: str = "generate"):
        self.bar = None
        self.t0 = time.monotonic()
        self.tokens = 0
        self.window: collections.deque = collections.deque()  # (t, tokens) of the last minute
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True,
                            mininterval=1.0, smoothing=0.05)

    def update(self, tokens: int, spent: float) -> None:
        now = time.monotonic()
        self.tokens += tokens
        self.window.append((now, tokens))
        while self.window and now - self.window[0][0] > 60.0:
            self.window.popleft()
        if self.bar is not None:
            span = max(min(now - self.t0, 60.0), 1e-6)
            self.bar.set_postfix_str(f"{len(self.window) / span * 60:.0f} req/min, "
                                     f"{sum(t for _, t in self.window) / span * 60:,.0f} tok/min, ${spent:.4f}",
                                     refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
