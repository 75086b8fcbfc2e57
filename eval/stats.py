"""Paired significance tests for the gate: per-item, both models on the same items.

Point values on a few hundred items move by several points from noise alone, so
every criterion is decided on a test: exact McNemar for benchmark correctness, and
percentile bootstrap intervals for differences in rates.
"""

from collections.abc import Sequence
from math import ceil, comb, sqrt
from statistics import NormalDist

import numpy as np


def mcnemar_exact(production: Sequence[bool], candidate: Sequence[bool]) -> tuple[float, int]:
    """Two-sided exact McNemar p-value and the number of discordant items.

    Only items where the models disagree carry information; under "no difference"
    each is equally likely to favour either model (a binomial with p = 1/2).
    """
    _check_paired(production, candidate)
    gains = sum(1 for p, c in zip(production, candidate, strict=True) if c and not p)
    losses = sum(1 for p, c in zip(production, candidate, strict=True) if p and not c)
    n = gains + losses
    if n == 0:
        return 1.0, 0
    tail = sum(comb(n, k) for k in range(min(gains, losses) + 1)) / 2**n
    return min(1.0, 2 * tail), n


def items_to_detect_drop(
    accuracy: float, drop: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Items needed to detect an accuracy drop of `drop` from `accuracy` with a
    two-sided test at `alpha` and the given power: the two-proportion sample size
    without continuity correction (Fleiss, Levin and Paik, Statistical Methods for
    Rates and Proportions, 3rd ed., 2003).

    The gate's test is paired (McNemar), which needs fewer items when both models get
    most items alike, so this errs towards calling a benchmark too small."""
    if not 0 < drop < 1:
        raise ValueError(f"a drop of {drop} is not a share of items")
    p1 = min(max(accuracy, drop), 1.0)  # room for the drop, whatever the accuracy
    p2 = p1 - drop
    mean = (p1 + p2) / 2
    z_alpha, z_power = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    spread = z_alpha * sqrt(2 * mean * (1 - mean)) + z_power * sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return ceil((spread / drop) ** 2)


def paired_bootstrap(
    production: Sequence[float],
    candidate: Sequence[float],
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of candidate - production per item, with a percentile bootstrap CI."""
    _check_paired(production, candidate)
    diff = np.asarray(candidate, dtype=float) - np.asarray(production, dtype=float)
    return _bootstrap(diff, samples, confidence, seed)


def bootstrap_ci(
    values: Sequence[float], samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of a mean (e.g. an accuracy from 0/1 items)."""
    _, low, high = _bootstrap(np.asarray(values, dtype=float), samples, confidence, seed)
    return low, high


def _bootstrap(
    values: np.ndarray, samples: int, confidence: float, seed: int
) -> tuple[float, float, float]:
    if values.size == 0:
        raise ValueError("no items to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(values.mean()), float(low), float(high)


def _check_paired(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
