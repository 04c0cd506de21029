"""Uncertainty of a comparison: intervals, paired tests, rank ranges and tiers.

Every statistic is computed over the *examples* of a task (the unit that was sampled), seeded and
reproducible:

* :func:`wilson_interval`: the Wilson score interval of a 0/1 rate (accuracy, agreement) on one task;
  close to nominal coverage even at small ``n`` or a rate near 0 or 1, where the normal
  approximation is not.
* :class:`Bootstrap`: one set of resampling weights per task, shared by every pipeline, so that a
  pipeline's resampled means and every paired difference come from the *same* resampled examples.
  With several tasks, each task is resampled on its own (stratified) and the task means are averaged.
  Percentile intervals (:func:`percentile_interval`) for scores, KL and means over tasks.
* :func:`mcnemar_exact`: the exact McNemar (sign) test of two paired 0/1 columns: under the null
  hypothesis the discordant pairs split 50/50, so the p-value is a binomial tail.
* :func:`bootstrap_p_value`: the paired bootstrap's two-sided p-value (the percentile interval
  inverted: the smallest level at which it excludes zero).
* :func:`rank_ranges` and :func:`tiers`: the ranks a pipeline takes over the resamples, and groups
  of pipelines that a paired test cannot tell from their group's leader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate ``successes / n`` (``(0, 1)`` when ``n == 0``)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value of paired 0/1 outcomes ``a`` and ``b`` (same examples, same order).

    Only discordant pairs count: ``n01`` (a wrong, b right) and ``n10``. Under the null hypothesis each
    discordant pair goes either way with probability 1/2, so ``p = min(1, 2 * P(X <= min(n01, n10)))``
    for ``X ~ Binomial(n01 + n10, 1/2)``, computed exactly with integers.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"mcnemar_exact: paired columns differ in length ({x.shape} vs {y.shape})")
    n10 = int(((x == 1) & (y == 0)).sum())
    n01 = int(((x == 0) & (y == 1)).sum())
    n = n10 + n01
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(n10, n01) + 1))
    return min(1.0, 2 * tail / 2**n)


def is_binary(values: np.ndarray) -> bool:
    """Whether every present (non-NaN) value is 0 or 1."""
    present = values[~np.isnan(values)]
    return bool(np.all((present == 0) | (present == 1)))


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``level`` percentile interval of bootstrap ``samples`` ``(B,)`` (NaNs ignored)."""
    present = samples[~np.isnan(samples)]
    if present.size == 0:
        return (math.nan, math.nan)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(present, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of a paired bootstrap: ``2 * min(P*(d <= 0), P*(d >= 0))``, at most 1.

    ``differences``: ``(B,)`` resampled mean differences. The percentile interval at level ``1 - p``
    just reaches zero, so ``p < 0.05`` exactly when the 95% percentile interval excludes zero (up to
    resamples equal to zero). The resolution is ``1 / B``.
    """
    present = differences[~np.isnan(differences)]
    if present.size == 0:
        return math.nan
    if np.all(present == 0):
        return 1.0
    low, high = float((present <= 0).mean()), float((present >= 0).mean())
    return min(1.0, 2 * min(low, high))


@dataclass(frozen=True)
class Bootstrap:
    """Seeded resampling weights for one task's ``n`` examples: ``weights`` ``(B, n)``, counts summing to ``n``.

    Every pipeline of the task is resampled with the same weights (a paired bootstrap), so a resampled
    difference of means is the mean of the resampled per-example differences.
    """

    weights: np.ndarray

    @classmethod
    def draw(cls, n: int, resamples: int = RESAMPLES, seed: int = 0, stream: str = "") -> Bootstrap:
        """Multinomial counts ``(resamples, n)`` from a generator seeded by ``seed`` and ``stream`` (a task label)."""
        entropy = [seed, *stream.encode("utf-8")]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        if n == 0:
            return cls(np.zeros((resamples, 0)))
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
        return cls(counts)

    @property
    def resamples(self) -> int:
        return int(self.weights.shape[0])

    def means(self, values: np.ndarray) -> np.ndarray:
        """Resampled means ``(P, B)`` of ``values`` ``(P, n)``; NaN (a missing value) is left out of its row's mean."""
        values = np.atleast_2d(np.asarray(values, dtype=np.float64))
        present = ~np.isnan(values)
        totals = np.where(present, values, 0.0) @ self.weights.T
        counts = present.astype(np.float64) @ self.weights.T
        with np.errstate(invalid="ignore", divide="ignore"):
            return totals / counts


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN), for many pipelines at once."""
    indexed = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    indexed.sort()
    out = [math.nan] * len(p_values)
    running = 0.0
    m = len(indexed)
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def rank_ranges(samples: np.ndarray, level: float = LEVEL, higher_is_better: bool = True) -> list[tuple[int, int]]:
    """Per pipeline, the ``level`` range of its rank (1 = best) over the resamples.

    ``samples``: ``(P, B)`` resampled scores of ``P`` pipelines under the same resamples. Ties share
    the better rank. A NaN row gets ``(P, P)``.
    """
    scores = np.where(np.isnan(samples), -np.inf if higher_is_better else np.inf, samples)
    keyed = -scores if higher_is_better else scores
    # rank of each pipeline in each resample: 1 + how many are strictly better
    ranks = 1 + (keyed[None, :, :] < keyed[:, None, :]).sum(axis=1)
    alpha = (1 - level) / 2
    lo = np.floor(np.quantile(ranks, alpha, axis=1, method="lower")).astype(int)
    hi = np.ceil(np.quantile(ranks, 1 - alpha, axis=1, method="higher")).astype(int)
    return [(int(a), int(b)) for a, b in zip(lo, hi, strict=True)]


def tiers(order: Sequence[int], distinct: np.ndarray) -> list[int]:
    """Tier (1 = top) of each pipeline: each tier's leader and every pipeline it cannot be told from.

    Args:
        order: Pipeline indices, best point estimate first.
        distinct: ``(P, P)`` bool, ``distinct[i, j]``: the paired test separates ``i`` and ``j``.

    The best pipeline leads tier 1; every pipeline that the paired test does not separate from it joins
    tier 1; the best pipeline left leads tier 2, and so on. A pipeline in tier 2 may still be
    indistinguishable from some in tier 1 (not from the leader).
    """
    tier = [0] * len(order)
    current = 0
    remaining = list(order)
    while remaining:
        current += 1
        leader = remaining[0]
        members = [i for i in remaining if i == leader or not distinct[leader, i]]
        for i in members:
            tier[i] = current
        remaining = [i for i in remaining if i not in members]
    return tier


__all__ = [
    "LEVEL",
    "RESAMPLES",
    "Bootstrap",
    "bootstrap_p_value",
    "holm",
    "is_binary",
    "mcnemar_exact",
    "percentile_interval",
    "rank_ranges",
    "tiers",
    "wilson_interval",
]
