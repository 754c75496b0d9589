"""Statistical checks of a generator stream (numpy only): mean, variance, lag-1 correlation,
and a KS (Gaussian) or chi-square (uniform) test."""

from __future__ import annotations

import math

import numpy as np


def _kolmogorov_sf(t: float) -> float:
    """P(K > t) for the Kolmogorov distribution (asymptotic KS p-value)."""
    if t < 0.2:
        return 1.0
    k = np.arange(1, 101)
    return float(min(1.0, max(0.0, 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k * k * t * t)))))


def _chi2_sf(x: float, dof: int) -> float:
    """Chi-square upper tail via the Wilson–Hilferty normal approximation."""
    z = ((x / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def check_stream(x, *, reference: str = "normal", bins: int = 64) -> dict:
    """Mean, variance, lag-1 correlation, KS (vs N(0,1) or unit-variance uniform) and a
    chi-square on ``bins`` equiprobable cells of the reference distribution.

    KS against a continuous reference also measures the quantisation of a W-bit stream
    (a 2^W-level grid is at least 2^-(W+1) away in CDF), so read ``ks_stat`` next to it.
    """
    x = np.asarray(x.get() if hasattr(x, "get") else x, dtype=np.float64).ravel()
    n = x.size
    if n < 100:
        raise ValueError(f"x: need >= 100 samples, got {n}")
    if reference == "normal":
        cdf = np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2.0)))
    elif reference == "uniform":
        a = math.sqrt(3.0)
        cdf = lambda v: np.clip((v + a) / (2 * a), 0.0, 1.0)
    else:
        raise ValueError(f"reference={reference!r}: must be 'normal' or 'uniform'")
    xs = np.sort(x[: min(n, 200_000)])
    m = xs.size
    f = cdf(xs)
    d = float(max(np.max(np.arange(1, m + 1) / m - f), np.max(f - np.arange(m) / m)))
    p_ks = _kolmogorov_sf(d * (math.sqrt(m) + 0.12 + 0.11 / math.sqrt(m)))
    cells = np.minimum((cdf(xs) * bins).astype(np.int64), bins - 1)
    counts = np.bincount(cells, minlength=bins)
    exp = m / bins
    chi2 = float(np.sum((counts - exp) ** 2 / exp))
    xc = x - x.mean()
    lag1 = float(np.dot(xc[:-1], xc[1:]) / max(np.dot(xc, xc), 1e-300))
    return {"n": n, "mean": float(x.mean()), "var": float(x.var()), "lag1": lag1,
            "ks_stat": d, "ks_p": p_ks, "chi2": chi2, "chi2_dof": bins - 1,
            "chi2_p": _chi2_sf(chi2, bins - 1)}
