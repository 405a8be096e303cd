"""Confidence intervals for evaluation figures.

- ``wilson_ci``: the Wilson score interval for a binomial proportion (Wilson 1927) — the 95% interval
  every runner prints next to an accuracy. Unlike the normal ("Wald") interval it stays inside [0, 1] and
  behaves at 0/n and n/n, which matters for the small slices we evaluate on.
- ``bootstrap_ci``: percentile bootstrap of a mean (Efron 1979), resampling whole examples, with the
  same procedure as rouge-score's ``BootstrapAggregator`` (so its published test vectors reproduce) but
  with a local, seeded generator instead of NumPy's global one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (z=1.96 -> 95%).

    >>> [round(x, 4) for x in wilson_ci(8, 10)]
    [0.4902, 0.9433]
    >>> wilson_ci(0, 0)
    (0.0, 1.0)
    """
    if not (isinstance(k, int) and isinstance(n, int)) or n < 0 or not 0 <= k <= n:
        raise ValueError(f"need integers 0 <= k <= n, got k={k!r}, n={n!r}")
    if z <= 0:
        raise ValueError(f"z must be positive, got {z}")
    if n == 0:
        return 0.0, 1.0  # no data: the interval is everything
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(
    values: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    confidence: float = 0.95,
    n_samples: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile bootstrap of the mean: returns (low, mid, high), each of shape (M,) for an (N, M) input
    (or scalars' arrays of shape () for a 1-D input). ``mid`` is the median of the resampled means.

    >>> lo, mid, hi = bootstrap_ci([1.0, 0.0, 1.0, 1.0], n_samples=200, seed=1)
    >>> bool(lo <= mid <= hi)
    True
    """
    if not 0 <= confidence <= 1:
        raise ValueError(f"confidence must be in [0, 1], got {confidence}")
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    matrix = np.asarray(values, dtype=np.float64)
    one_d = matrix.ndim == 1
    if one_d:
        matrix = matrix[:, None]  # (N, 1)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D or 2-D array of scores")
    rng = np.random.RandomState(seed)  # legacy generator: same stream as np.random.seed(seed)
    n = matrix.shape[0]
    means = np.zeros((n_samples, matrix.shape[1]))  # (S, M)
    for i in range(n_samples):
        idx = rng.choice(np.arange(n), size=n)  # (N,)
        means[i] = matrix[idx].mean(axis=0)
    delta = (1 - confidence) / 2
    low, mid, high = np.percentile(means, 100 * np.array([delta, 0.5, 1 - delta]), axis=0)  # each (M,)
    if one_d:
        return low[0], mid[0], high[0]
    return low, mid, high
