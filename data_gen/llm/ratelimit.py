"""Client-side limits: in-flight concurrency, requests/minute and tokens/minute.

Both per-minute limits are token buckets refilled continuously at limit/60 per second, holding
at most ``burst_s`` seconds' worth (they start full). A request is admitted while both buckets
are out of debt (level > 0), and then takes 1 request and its prompt tokens + max_tokens up
front, which may put the bucket into debt that later requests wait out; when the response
reports usage the unused part is given back (``release``). So the tokens actually used per
minute converge to the limit even when max_tokens is far above typical completions, and many
requests can be in flight at once (a bucket that had to hold every in-flight reservation would
serialise requests whose max_tokens is large). Over any interval of t seconds the charged
tokens stay below capacity + rate·t + one request. A 429 puts every caller on hold for the
server's Retry-After (``cooldown``). Waiters are served first come, first served.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable


class TokenBucket:
    """Continuous-refill bucket: admit while level > 0, then take (possibly into debt)."""

    def __init__(self, per_minute: float, burst_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if not per_minute > 0:
            raise ValueError(f"rate limit must be > 0 per minute, got {per_minute!r}")
        if not burst_s > 0:
            raise ValueError(f"burst_s must be > 0, got {burst_s!r}")
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate * burst_s, 1.0)
        self.clock = clock
        self.level = self.capacity
        self._t = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    def wait_s(self) -> float:
        """Seconds until the bucket is out of debt (0 if it is now)."""
        self._refill()
        if self.level > 0:
            return 0.0
        return (1e-9 - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give(self, amount: float) -> None:
        """Refund (amount > 0) or charge more (amount < 0)."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


@dataclasses.dataclass
class Permit:
    tokens: int
    released: bool = False


class RateLimiter:
    """concurrency (None = unbounded), rpm / tpm (None = no limit)."""

    def __init__(self, concurrency: int | None = None, rpm: float | None = None,
                 tpm: float | None = None, burst_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self._sem = asyncio.Semaphore(concurrency) if concurrency else None
        self.rpm = TokenBucket(rpm, burst_s, clock) if rpm else None
        self.tpm = TokenBucket(tpm, burst_s, clock) if tpm else None
        self.clock = clock
        self._lock = asyncio.Lock()  # FIFO: the first waiter is admitted first
        self._cooldown_until = 0.0
        self.in_flight = 0

    def cooldown(self, seconds: float) -> None:
        """Holds every new admission for ``seconds`` from now (server said 429)."""
        self._cooldown_until = max(self._cooldown_until, self.clock() + max(seconds, 0.0))

    async def acquire(self, tokens: int) -> Permit:
        if self._sem is not None:
            await self._sem.acquire()
        try:
            async with self._lock:
                while True:
                    wait = self._cooldown_until - self.clock()
                    if self.rpm:
                        wait = max(wait, self.rpm.wait_s())
                    if self.tpm:
                        wait = max(wait, self.tpm.wait_s())
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                if self.rpm:
                    self.rpm.take(1)
                if self.tpm:
                    self.tpm.take(tokens)
        except BaseException:
            if self._sem is not None:
                self._sem.release()
            raise
        self.in_flight += 1
        return Permit(tokens)

    def release(self, permit: Permit, used_tokens: int | None) -> None:
        """Frees the concurrency slot; ``used_tokens`` (reported usage, or None when the request
        was not served) corrects the up-front token reservation. Idempotent."""
        if permit.released:
            return
        permit.released = True
        self.in_flight -= 1
        if self._sem is not None:
            self._sem.release()
        if self.tpm is not None:
            self.tpm.give(permit.tokens - (used_tokens or 0))
