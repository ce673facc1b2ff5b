"""Separation and shift statistics on projections: AUROC, accuracy, Cohen's d, bootstrap.

Plain Python and torch only, so results do not depend on an optional package.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with ties counted as one half).

    Returns None when one class is absent, because the value is undefined.
    """
    pairs = sorted(zip(scores, labels), key=lambda p: p[0])
    n_pos = sum(1 for _, y in pairs if y == 1)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = 0.0
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        average_rank = (i + j) / 2 + 1  # ranks are 1-based; tied scores share their mean rank
        rank_sum += average_rank * sum(1 for k in range(i, j + 1) if pairs[k][1] == 1)
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def accuracy(scores: Sequence[float], labels: Sequence[int], threshold: float) -> float | None:
    """Share of items whose `score >= threshold` matches `label == 1`, the rule flags use too."""
    if not scores:
        return None
    hits = sum(1 for s, y in zip(scores, labels) if (s >= threshold) == (y == 1))
    return hits / len(scores)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def cohens_d(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """(mean_pos - mean_neg) / pooled standard deviation; None when undefined."""
    if len(positive) < 2 or len(negative) < 2:
        return None
    mp, sp = mean_std(positive)
    mn, sn = mean_std(negative)
    n1, n2 = len(positive), len(negative)
    pooled = math.sqrt(((n1 - 1) * sp**2 + (n2 - 1) * sn**2) / (n1 + n2 - 2))
    if pooled == 0:
        return None
    return (mp - mn) / pooled


@dataclass(frozen=True)
class ShiftStatistics:
    """Mean of paired differences with a bootstrap confidence interval and a paired test."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    confidence: float
    t_statistic: float | None
    p_value: float | None


def paired_shift(
    differences: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> ShiftStatistics:
    """Percentile bootstrap CI for the mean difference and a two-sided paired t-test.

    The bootstrap is seeded, so the same inputs give the same interval.
    """
    n = len(differences)
    if n == 0:
        nan = math.nan
        return ShiftStatistics(0, nan, nan, nan, confidence, None, None)
    mean, std = mean_std(differences)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(differences, k=n)) / n for _ in range(resamples))
    alpha = (1 - confidence) / 2
    low = means[max(0, int(math.floor(alpha * resamples)))]
    high = means[min(resamples - 1, int(math.ceil((1 - alpha) * resamples)) - 1)]
    t_stat: float | None = None
    p_value: float | None = None
    if n >= 2 and std > 0:
        t_stat = mean / (std / math.sqrt(n))
        p_value = _two_sided_t_p(t_stat, n - 1)
    elif n >= 2:
        t_stat, p_value = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    return ShiftStatistics(n, mean, low, high, confidence, t_stat, p_value)


def _two_sided_t_p(t: float, dof: int) -> float:
    """Two-sided p-value of Student's t through the regularised incomplete beta function."""
    x = dof / (dof + t * t)
    return _betainc(dof / 2, 0.5, x)


def _betainc(a: float, b: float, x: float) -> float:
    # Continued fraction (Numerical Recipes, 2nd ed., section 6.4), accurate to about 1e-12.
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1 - x) / b


def _beta_cf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((a + m2 - 1) * (a + m2)), -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h
