"""Bit-accurate maps from W-bit uniform integers to the distributions hardware produces:
scaled uniform, Rademacher, CLT-k sums, inversion-table (ICDF ROM) and Box–Muller Gaussians."""

from __future__ import annotations

import math
import re

import numpy as np


def _norm_ppf(p: np.ndarray) -> np.ndarray:
    """Inverse standard-normal CDF by bisection on math.erfc (float64, ~1e-15); no scipy."""
    p = np.asarray(p, dtype=np.float64)
    lo = np.full_like(p, -40.0)
    hi = np.full_like(p, 40.0)
    cdf = np.vectorize(lambda x: 0.5 * math.erfc(-x / math.sqrt(2.0)))
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        below = cdf(mid) < p
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def icdf_rom(m: int, w: int) -> np.ndarray:
    """Half-normal ICDF ROM: word i = round(Phi^-1(0.5 + (i+0.5)/2^(m+1)) * 2^(w-4)),
    saturated to w-1 bits (dossier Appendix A, module ``icdf``)."""
    i = np.arange(1 << m, dtype=np.float64)
    v = np.round(_norm_ppf(0.5 + (i + 0.5) / float(1 << (m + 1))) * float(1 << (w - 4)))
    return np.minimum(v, (1 << (w - 1)) - 1).astype(np.int64)


DISTS = ("uniform", "rademacher", "clt<k>", "icdf<m>", "boxmuller")
_DIST_RE = re.compile(r"^(uniform|rademacher|boxmuller|clt(\d+)|icdf(\d+))$")


def _parse_dist(dist: str) -> tuple[str, int]:
    m = _DIST_RE.match(dist)
    if not m:
        raise ValueError(f"dist={dist!r}: must be one of {DISTS} (e.g. 'clt4', 'icdf10')")
    if m.group(2):
        k = int(m.group(2))
        if not 1 <= k <= 64:
            raise ValueError(f"dist={dist!r}: CLT terms k must be in 1..64")
        return "clt", k
    if m.group(3):
        k = int(m.group(3))
        if not 2 <= k <= 16:
            raise ValueError(f"dist={dist!r}: ICDF address bits m must be in 2..16")
        return "icdf", k
    return m.group(1), 0


def sample_bits(dist: str, bits: int) -> int:
    """Uniform bits one output sample of ``dist`` consumes."""
    kind, k = _parse_dist(dist)
    return {"uniform": bits, "rademacher": bits, "clt": k * bits, "icdf": k + 1,
            "boxmuller": bits}[kind]


def _to_float(u, dist: str, bits: int, xp) -> np.ndarray:
    """Map ``(..., per_sample)`` integer words to unit-variance float32 samples."""
    kind, k = _parse_dist(dist)
    if kind == "uniform":  # midpoints of 2^W cells on (-1, 1); var = (1 - 4^-W)/3
        scale = 1.0 / math.sqrt((1.0 - 4.0 ** -bits) / 3.0)
        x = (u.astype(xp.float64) + 0.5) * (2.0 / (1 << bits)) - 1.0
        return (x * scale).astype(xp.float32)
    if kind == "rademacher":
        return xp.where((u >> xp.uint64(bits - 1)) & xp.uint64(1), 1.0, -1.0).astype(xp.float32)
    if kind == "clt":  # u: (..., k) words of W bits
        s = u.sum(axis=-1).astype(xp.float64)
        mean = k * ((1 << bits) - 1) / 2.0
        sd = math.sqrt(k * (4.0 ** bits - 1.0) / 12.0)
        return ((s - mean) / sd).astype(xp.float32)
    if kind == "icdf":  # u: m+1 bits, bit m = sign, low m bits = address
        rom = icdf_rom(k, bits)
        rms = math.sqrt(float(np.mean(rom.astype(np.float64) ** 2)))
        mag = xp.asarray(rom)[(u & xp.uint64((1 << k) - 1)).astype(xp.int64)]
        sgn = (u >> xp.uint64(k)) & xp.uint64(1)
        return (xp.where(sgn == 1, -mag, mag) / rms).astype(xp.float32)
    # Box–Muller on pairs of W-bit words: (..., 2) -> two outputs, rounded to W bits, W-4 frac
    n = float(1 << bits)
    u1 = (u[..., 0].astype(xp.float64) + 0.5) / n
    u2 = (u[..., 1].astype(xp.float64) + 0.5) / n
    r = xp.sqrt(-2.0 * xp.log(u1))
    frac = float(1 << max(bits - 4, 0))
    lim = (1 << (bits - 1)) - 1
    a = xp.clip(xp.round(r * xp.cos(2 * math.pi * u2) * frac), -lim, lim) / frac
    b = xp.clip(xp.round(r * xp.sin(2 * math.pi * u2) * frac), -lim, lim) / frac
    grid = (np.arange(1 << bits, dtype=np.float64) + 0.5) / n
    sd = math.sqrt(float(np.mean(-2.0 * np.log(grid))) / 2.0)
    return (xp.stack([a, b], axis=-1).reshape(*u.shape[:-1], 2) / sd).astype(xp.float32)


