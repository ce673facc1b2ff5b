"""AUROC, accuracy, Cohen's d and the paired shift statistics against independent computations."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from safety_lens_cli.metrics import accuracy, auroc, cohens_d, paired_shift


def brute_force_auroc(scores: list[float], labels: list[int]) -> float:
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    wins = 0.0
    for p, n in itertools.product(positives, negatives):
        if p > n:
            wins += 1.0
        elif p == n:
            wins += 0.5
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = random.Random(seed)
    scores = [float(rng.randint(0, 6)) for _ in range(40)]  # many ties
    labels = [rng.randint(0, 1) for _ in range(40)]
    assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)


def test_auroc_undefined_for_one_class() -> None:
    assert auroc([0.1, 0.2], [1, 1]) is None


def test_accuracy_counts_ties_as_positive() -> None:
    assert accuracy([0.5, 0.4, 0.6], [1, 0, 1], 0.5) == 1.0


def test_cohens_d_known_value() -> None:
    # Means 2 and 0, both sample variances 1, so d = 2.
    assert cohens_d([1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("t", "dof", "expected"),
    # Two-sided p-values from Student's t tables.
    [(2.0, 10, 0.0734), (1.0, 3, 0.3910), (2.228, 10, 0.0500), (3.169, 10, 0.0100)],
)
def test_paired_t_test_p_values(t: float, dof: int, expected: float) -> None:
    n = dof + 1
    # Differences with mean t * sd / sqrt(n): build them from a fixed zero-mean pattern.
    pattern = [(-1) ** i * (1 + i % 3) for i in range(n)]
    centre = sum(pattern) / n
    pattern = [p - centre for p in pattern]
    sd = math.sqrt(sum(p * p for p in pattern) / (n - 1))
    differences = [p + t * sd / math.sqrt(n) for p in pattern]
    stats = paired_shift(differences, resamples=200)
    assert stats.t_statistic == pytest.approx(t, rel=1e-9)
    assert stats.p_value == pytest.approx(expected, abs=5e-4)


def test_bootstrap_interval_is_seeded_and_covers_mean() -> None:
    rng = random.Random(3)
    differences = [rng.gauss(0.2, 0.1) for _ in range(50)]
    first = paired_shift(differences, seed=7)
    again = paired_shift(differences, seed=7)
    other = paired_shift(differences, seed=8)
    assert (first.ci_low, first.ci_high) == (again.ci_low, again.ci_high)
    assert (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)
    assert first.ci_low < first.mean < first.ci_high
    # The percentile interval is close to mean +/- 1.96 standard errors for normal data.
    se = 0.1 / math.sqrt(50)
    assert first.ci_high - first.ci_low == pytest.approx(2 * 1.96 * se, rel=0.3)


def test_zero_differences_give_zero_shift() -> None:
    stats = paired_shift([0.0] * 10)
    assert stats.mean == 0.0
    assert stats.ci_low == stats.ci_high == 0.0
    assert stats.p_value == 1.0
