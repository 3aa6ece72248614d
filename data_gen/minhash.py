"""MinHash signatures + LSH banding for near-duplicate detection (shared by the generators and
the dedup stage).

    from data_gen import minhash
    f = minhash.NearDupFilter(threshold=0.8)
    f.add("doc-1", text)            # -> None (kept)
    f.add("doc-2", text_copy)       # -> ("doc-1", 0.97): near-duplicate of doc-1

Shingles are n-grams of word tokens (``unit="word"``) or characters (``unit="char"``), hashed to
32 bits with blake2b (stable across processes, unlike ``hash()``). A signature is, for each of
``num_perm`` hash functions h(x) = ((a·x + b) mod 2^64) mod (2^61 − 1) (the datasketch family:
the uint64 wrap-around is what makes it non-monotone in x), the minimum over the shingles. a and b are drawn from ``seed``, so signatures are reproducible. The estimated Jaccard
similarity of two sets is the fraction of equal signature entries.

LSH: the signature is cut into ``bands`` bands of ``rows`` rows; documents sharing one band
exactly are candidates, and a candidate is a near-duplicate if its estimated Jaccard ≥
``threshold``. ``optimal_bands`` picks (bands, rows) minimising false positives + negatives
around the threshold. Everything is deterministic in insertion order: the first document
of a cluster is kept.
"""
from __future__ import annotations

import hashlib
import re
from typing import Hashable, Iterable

import numpy as np

MERSENNE_61 = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
EMPTY_HASH = np.uint64(0xFFFFFFFF)  # the "shingle" of an empty text, so it still has a signature


def tokens(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (whitespace ignored)."""
    return _WORD.findall(text.lower())


def shingles(text: str, n: int = 5, unit: str = "word") -> set[str]:
    """The set of n-gram shingles of ``text`` (a text shorter than n gives one shingle)."""
    if n < 1:
        raise ValueError(f"shingle size n must be >= 1, got {n}")
    if unit == "word":
        toks = tokens(text)
        return {" ".join(toks[i:i + n]) for i in range(max(len(toks) - n + 1, 1))} if toks else set()
    if unit == "char":
        t = " ".join(text.lower().split())
        return {t[i:i + n] for i in range(max(len(t) - n + 1, 1))} if t else set()
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def hash_shingles(items: Iterable[str]) -> np.ndarray:
    """Stable 32-bit hashes (uint64 array) of the shingles."""
    out = [int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=4).digest(), "little")
           for s in items]
    return np.asarray(out, np.uint64) if out else np.asarray([EMPTY_HASH], np.uint64)


class MinHasher:
    """``num_perm`` universal hash functions drawn from ``seed``."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.seed = seed
        self.a = rng.integers(1, MERSENNE_61, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, MERSENNE_61, num_perm, dtype=np.uint64)

    def signature_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        h = np.asarray(hashes, np.uint64)[:, None]
        with np.errstate(over="ignore"):  # the mod-2^64 wrap is intended
            return ((self.a[None, :] * h + self.b[None, :]) % MERSENNE_61).min(axis=0)

    def signature(self, text: str, n: int = 5, unit: str = "word") -> np.ndarray:
        return self.signature_of_hashes(hash_shingles(shingles(text, n, unit)))


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity of two sets (1.0 for two empty sets)."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    if sig_a.shape != sig_b.shape:
        raise ValueError(f"signatures differ in length: {sig_a.shape} vs {sig_b.shape}")
    return float(np.mean(sig_a == sig_b))


def _prob_candidate(s: float, bands: int, rows: int) -> float:
    return 1.0 - (1.0 - s ** rows) ** bands


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows), bands·rows ≤ num_perm, minimising the weighted integrated false-positive
    (s < threshold) and false-negative (s ≥ threshold) candidate probability."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    grid = np.linspace(0.0, 1.0, 201)
    lo, hi = grid[grid < threshold], grid[grid >= threshold]
    best, best_err = (num_perm, 1), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        fp = np.trapezoid(_prob_candidate(lo, bands, rows), lo) if len(lo) > 1 else 0.0
        fn = np.trapezoid(1.0 - _prob_candidate(hi, bands, rows), hi) if len(hi) > 1 else 0.0
        err = fp_weight * fp + (1.0 - fp_weight) * fn
        if err < best_err:
            best, best_err = (bands, rows), err
    return best


class LSHIndex:
    """Band buckets over signatures; ``candidates(sig)`` are ids sharing at least one band."""

    def __init__(self, num_perm: int, bands: int, rows: int):
        if bands * rows > num_perm or bands < 1 or rows < 1:
            raise ValueError(f"bands·rows must be in [1, num_perm={num_perm}], got {bands}·{rows}")
        self.bands, self.rows = bands, rows
        self._tables: list[dict[bytes, list[Hashable]]] = [{} for _ in range(bands)]

    def _keys(self, sig: np.ndarray):
        for i in range(self.bands):
            yield i, sig[i * self.rows:(i + 1) * self.rows].tobytes()

    def insert(self, key: Hashable, sig: np.ndarray) -> None:
        for i, k in self._keys(sig):
            self._tables[i].setdefault(k, []).append(key)

    def candidates(self, sig: np.ndarray) -> list[Hashable]:
        seen: dict[Hashable, None] = {}  # insertion-ordered set: deterministic results
        for i, k in self._keys(sig):
            for key in self._tables[i].get(k, ()):
                seen.setdefault(key, None)
        return list(seen)


class NearDupFilter:
    """Keeps the first of each near-duplicate cluster, in the order documents are added."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                 unit: str = "word", seed: int = 0, bands: int | None = None):
        self.threshold, self.ngram, self.unit = threshold, ngram, unit
        self.hasher = MinHasher(num_perm, seed)
        b, r = (bands, num_perm // bands) if bands else optimal_bands(threshold, num_perm)
        self.index = LSHIndex(num_perm, b, r)
        self._sigs: dict[Hashable, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._sigs)

    def check(self, text: str) -> tuple[tuple[Hashable, float] | None, np.ndarray]:
        """((id of the most similar kept document, estimated Jaccard) or None, signature)."""
        sig = self.hasher.signature(text, self.ngram, self.unit)
        best = None
        for key in self.index.candidates(sig):
            j = estimate_jaccard(sig, self._sigs[key])
            if j >= self.threshold and (best is None or j > best[1]):
                best = (key, j)
        return best, sig

    def add(self, key: Hashable, text: str) -> tuple[Hashable, float] | None:
        """None if ``text`` was kept under ``key``; else (kept id it duplicates, similarity)."""
        if key in self._sigs:
            raise KeyError(f"id {key!r} already added")
        dup, sig = self.check(text)
        if dup is None:
            self._sigs[key] = sig
            self.index.insert(key, sig)
        return dup
