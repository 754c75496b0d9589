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
