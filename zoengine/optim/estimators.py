"""Estimators: loss values (scalars) -> projected gradients (scalars). No tensor of size d.

KerZOO (Mi et al. 2025, arXiv 2505.18886) multiplies the perturbation by a scalar r ~ U[-a, a]
and weights the central difference by a polynomial kernel K_a(r) whose moments cancel the ε²
bias of the two-point estimator: E[K] = 0, E[rK] = 1, E[r³K] = 0 (order >= 3), E[r⁵K] = 0
(order 5). Kernels are Legendre constructions on U[-1, 1]; K_a(r) = K(r/a)/a keeps the moments.
"""

from __future__ import annotations

import math
from fractions import Fraction

from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import MASK32, STREAM_KERZOO_R, philox4x32

# K(r) = r * Σ_i c_i r^(2i) on U[-1, 1], coefficients exact. The order-5 constant is 105/64:
# the 195/64 printed in the literature gives E[rK] = 13/7, not 1 (research/algorithms.md §3).
KERNELS: dict[int, tuple[Fraction, ...]] = {
    1: (Fraction(3),),
    3: (Fraction(75, 4), Fraction(-105, 4)),  # (15/4)·r·(5 − 7r²)
    5: (Fraction(105 * 35, 64), Fraction(-105 * 126, 64), Fraction(105 * 99, 64)),
}


def kernel_weight(r: float, order: int, a: float = 1.0) -> float:
    """K_a(r) = K(r/a)/a for the kernel of ``order`` (1, 3 or 5) on U[-a, a]."""
    x = r / a
    x2 = x * x
    poly = 0.0
    for c in reversed(KERNELS[order]):
        poly = poly * x2 + float(c)
    return x * poly / a


def _scalar_words(seed: int, step: int, sample: int, key: int, stream_word: int) -> list[int]:
    """The four words of Philox block 0 for (seed, step, sample), tensor key, stream word."""
    import torch

    key64 = stream_key(seed, step, sample)
    words = philox4x32(torch.zeros(1, dtype=torch.int64), 0, key, stream_word,
                       key64 & MASK32, key64 >> 32)
    return [int(w[0]) for w in words]


def _unit_open(w: int) -> float:
    return ((w >> 8) * 2 + 1) * 2.0**-25  # the contract's (0, 1) map, exact in float64


def scalar_uniform(seed: int, step: int, sample: int, stream_word: int = STREAM_KERZOO_R,
                   key: int = 0) -> float:
    """One value in (-1, 1) from the noise contract, for per-sample scalars such as r.

    Word 0 of Philox block 0 under the contract's uniform map before its √3 scaling.
    """
    return _unit_open(_scalar_words(seed, step, sample, key, stream_word)[0]) * 2.0 - 1.0


def scalar_normal(seed: int, step: int, sample: int, stream_word: int, key: int = 0) -> float:
    """One N(0, 1) value from the noise contract (Box–Muller on words 0 and 1, float64)."""
    w = _scalar_words(seed, step, sample, key, stream_word)
    return math.sqrt(-2.0 * math.log(_unit_open(w[0]))) * math.cos(2.0 * math.pi * _unit_open(w[1]))


def clip_value(g: float, clip: float | None) -> float:
    """Clip a projected gradient to [-clip, clip] (KerZOO README's optional clip constant)."""
    return g if clip is None else max(-clip, min(clip, g))


# ---- KerZOO's open questions as options: kernel reading, r schedule, moments ----------------

R_SCHEDULES = ("linear", "cosine")
MOMENTS = ("E[K]", "E[rK]", "E[r3K]", "E[r5K]", "E[r2K2]")


def kernel_moments(order: int, a=1, *, rescale: bool = True) -> dict[str, Fraction]:
    """Exact moments of the kernel of ``order`` under r ~ U(-a, a), ``a`` a Fraction, int or
    float (a float is taken at its exact binary value).

    ``rescale=True``: the weight is K_a(r) = K(r/a)/a (E[rK] = 1 for every a);
    ``rescale=False``: K(r) itself, evaluated at r ~ U(-a, a). Keys: ``MOMENTS``; E[r2K2] is
    E[r²K²], the factor by which the kernel multiplies the estimator's second moment.
    """
    if order not in KERNELS:
        raise ValueError(f"order={order!r}: must be one of {tuple(KERNELS)}")
    a = Fraction(a)
    if a <= 0:
        raise ValueError(f"a={a}: must be > 0")
    # K as {power: coefficient}: r^(2i+1) with c_i, divided by a^(2i+2) when rescaled
    k = {2 * i + 1: c / (a ** (2 * i + 2) if rescale else 1) for i, c in enumerate(KERNELS[order])}

    def mean(poly: dict) -> Fraction:  # E[Σ c r^m] on U(-a, a): a^m/(m+1) for even m
        return sum((c * a ** m / (m + 1) for m, c in poly.items() if m % 2 == 0), Fraction(0))

    k2 = {}
    for m1, c1 in k.items():
        for m2, c2 in k.items():
            k2[m1 + m2 + 2] = k2.get(m1 + m2 + 2, Fraction(0)) + c1 * c2
    shift = lambda j: {m + j: c for m, c in k.items()}  # noqa: E731  (r^j K)
    return {"E[K]": mean(k), "E[rK]": mean(shift(1)), "E[r3K]": mean(shift(3)),
            "E[r5K]": mean(shift(5)), "E[r2K2]": mean(k2)}


def check_r_schedule(r_schedule, r_range: float):
    """``None`` or ``(kind, a_end, steps)``, kind ``"linear"`` or ``"cosine"``, 0 < a_end <=
    r_range (r shrinks), steps an int >= 1; a list (a JSON round trip) is accepted. Returns the
    schedule as a tuple ``(kind, float(a_end), steps)``."""
    if r_schedule is None:
        return None
    allowed = ("must be None or (kind, a_end, steps) with kind 'linear' or 'cosine', "
               f"0 < a_end <= r_range ({r_range!r}) and steps an int >= 1")
    if not isinstance(r_schedule, (tuple, list)) or len(r_schedule) != 3:
        raise ValueError(f"r_schedule={r_schedule!r}: {allowed}")
    kind, a_end, steps = r_schedule
    ok = kind in R_SCHEDULES if isinstance(kind, str) else False
    ok = ok and isinstance(a_end, (int, float)) and not isinstance(a_end, bool)
    ok = ok and math.isfinite(a_end) and 0 < a_end <= r_range
    ok = ok and isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
    if not ok:
        raise ValueError(f"r_schedule={r_schedule!r}: {allowed}")
    return (kind, float(a_end), steps)


def scheduled_r_range(r_range: float, r_schedule, step: int) -> float:
    """a at ``step`` (the optimizer's step count before the step, 0-based): ``r_range`` without
    a schedule; with ``(kind, a_end, T)`` and s = min(step, T)/T,
    linear: a = r_range + (a_end - r_range)·s;
    cosine: a = a_end + (r_range - a_end)·(1 + cos(π·s))/2; a = a_end from step T on.
    A pure function of the step, in float64: resume, replay and every rank agree."""
    if r_schedule is None:
        return r_range
    kind, a_end, total = r_schedule
    s = min(step, total) / total
    if s >= 1.0:
        return a_end
    if kind == "linear":
        return r_range + (a_end - r_range) * s
    return a_end + (r_range - a_end) * (1.0 + math.cos(math.pi * s)) / 2.0
