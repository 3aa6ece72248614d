"""Token prices and the budget cap.

Prices are USD per 1M tokens, {model: {"input": x, "output": y}}, bound in gin
(``data_gen.EngineConfig.prices``; defaults in gin/data/engine.gin). The Batch API is billed at
``BATCH_DISCOUNT`` of the online price.

The budget never lets spent + reserved exceed the cap: every request reserves its worst case
(prompt estimate × ``prompt_margin`` + max_tokens, priced) before it is sent, and the
reservation is replaced by the priced reported usage when the response arrives (or released
when the request failed without being served). When a reservation does not fit, the engine
stops sending and finishes what is in flight.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

BATCH_DISCOUNT = 0.5


class PriceError(ValueError):
    """A model with no price where one is needed, or a malformed price entry."""


@dataclasses.dataclass(frozen=True)
class PriceTable:
    prices: Mapping[str, Mapping[str, float]]

    def __post_init__(self):
        for model, p in self.prices.items():
            if not isinstance(p, Mapping) or set(p) != {"input", "output"} or \
                    not all(isinstance(v, (int, float)) and v >= 0 for v in p.values()):
                raise PriceError(f"price for {model!r} must be {{'input': usd_per_1M, 'output': usd_per_1M}}"
                                 f" with non-negative numbers, got {p!r}")

    def has(self, model: str) -> bool:
        return model in self.prices

    def cost(self, model: str, prompt_tokens: float, completion_tokens: float, batch: bool = False) -> float:
        """USD; 0 for a model without a price (callers that need one check ``has`` first)."""
        p = self.prices.get(model)
        if p is None:
            return 0.0
        usd = (prompt_tokens * p["input"] + completion_tokens * p["output"]) / 1e6
        return usd * (BATCH_DISCOUNT if batch else 1.0)


class Budget:
    """spent (persisted by the caller in the ledger) + reservations <= cap (None = no cap)."""

    def __init__(self, cap_usd: float | None, spent_usd: float = 0.0):
        if cap_usd is not None and not cap_usd >= 0:
            raise ValueError(f"budget_usd must be >= 0, got {cap_usd!r}")
        self.cap = cap_usd
        self.spent = float(spent_usd)
        self.reserved = 0.0
        self.n_reserved = 0  # open reservations (a count: the float sum can keep rounding dust)
        self.refused = 0  # reservations that did not fit

    def try_reserve(self, usd: float) -> bool:
        if self.cap is not None and self.spent + self.reserved + usd > self.cap + 1e-12:
            self.refused += 1
            return False
        self.reserved += usd
        self.n_reserved += 1
        return True

    def settle(self, reserved_usd: float, actual_usd: float, count: int = 1) -> None:
        """``count`` reservations totalling ``reserved_usd`` become ``actual_usd`` spent (0 for
        requests that were not served)."""
        self.n_reserved = max(self.n_reserved - count, 0)
        self.reserved = max(self.reserved - reserved_usd, 0.0) if self.n_reserved else 0.0
        self.spent += actual_usd

    @property
    def left(self) -> float | None:
        return None if self.cap is None else self.cap - self.spent - self.reserved
