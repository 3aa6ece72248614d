"""Which failures are retried, and how long to wait.

Retried: 429 (rate limited), 408/409 (timeout/conflict, as the openai client does), 5xx,
client-side timeouts and dropped or refused connections. Not retried: every other 4xx (bad
request, auth, not found, ...): sending the same request again cannot succeed.

Wait: the server's Retry-After / retry-after-ms when given (never less; plus up to 10% jitter
so a crowd of callers does not return in lockstep), else exponential backoff with full jitter,
uniform(0, min(max_s, base_s · 2^attempt)).
"""
from __future__ import annotations

import dataclasses
import email.utils
import random
import time
from typing import Mapping

RETRY_STATUS = frozenset({408, 409, 429})


def is_retryable_status(code: int) -> bool:
    return code in RETRY_STATUS or code >= 500


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds from retry-after-ms, or retry-after as seconds or an HTTP date; None if absent."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return max(float(ra), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


@dataclasses.dataclass(frozen=True)
class Backoff:
    base_s: float = 1.0
    max_s: float = 60.0
    max_retry_after_s: float = 600.0  # a Retry-After beyond this is capped (a broken header)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 0)."""
        if retry_after is not None:
            ra = min(retry_after, self.max_retry_after_s)
            return ra + rng.uniform(0.0, 0.1 * ra)
        return rng.uniform(0.0, min(self.max_s, self.base_s * (2 ** attempt)))
