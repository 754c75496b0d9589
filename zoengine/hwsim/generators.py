"""Bit-accurate hardware random-number streams: sources, transforms and reuse put together.

The uniform sources are modelled in ``zoengine.hwsim.sources`` (exact integer words of the RTL
of ``zoengine.hwsim.rtl`` or the cited reference algorithm, clock by clock), the transforms in
``zoengine.hwsim.distributions`` (exact integer functions of those words: CLT sum, ICDF ROM
lookup; except Box–Muller, whose internal fixed-point datapath is *not* modelled: it is
evaluated in float64 on the W-bit inputs and rounded to the W-bit output format), and the
``hw:`` specs in ``zoengine.hwsim.specs``. This module lays the samples out for each reuse mode
(none, PeZO's on-the-fly rotation, a pool); the names of those modules are re-exported here.

Distributions (``DISTS``): ``uniform`` (midpoint grid on (-1, 1), scaled to unit variance),
``rademacher`` (top bit), ``clt<k>`` (Irwin–Hall sum of k W-bit words), ``icdf<m>`` (m address
bits + 1 sign bit into a half-normal ROM of W-bit words) and ``boxmuller``.

Every float stream has mean 0 and variance 1 by construction (exact for uniform, rademacher,
CLT and ICDF; up to the output rounding for Box–Muller).

Co-simulation entry point for the optimizers: :func:`hw_noise`.
"""

from __future__ import annotations

import math

import numpy as np

from zoengine.hwsim.distributions import DISTS, _parse_dist, _to_float, icdf_rom, sample_bits
from zoengine.hwsim.sources import (
    PHILOX_M,
    PHILOX_W,
    SOURCE_BITS,
    SOURCES,
    _xp,
    cupy_available,
    lfsr_step1,
    mix_seed,
    philox4x32_10,
    source_words,
    splitmix64,
)
from zoengine.hwsim.specs import REUSE_MODES, StreamSpec, parse_spec
from zoengine.hwsim.stats import check_stream

__all__ = [
    "DISTS",
    "PHILOX_M",
    "PHILOX_W",
    "REUSE_MODES",
    "SOURCES",
    "SOURCE_BITS",
    "StreamSpec",
    "check_stream",
    "cupy_available",
    "hw_noise",
    "icdf_rom",
    "lfsr_step1",
    "mix_seed",
    "parse_spec",
    "philox4x32_10",
    "sample_bits",
    "source_words",
    "splitmix64",
    "stream",
]


def _samples(source: str, dist: str, bits: int, *, seed: int, instances: int, count: int,
             xp_device: str) -> np.ndarray:
    """``(clocks, instances * per_clock)`` unit-variance samples, clock-major, >= count."""
    kind, k = _parse_dist(dist)
    need = sample_bits(dist, bits)
    per = {"clt": k, "boxmuller": 2}.get(kind, 1)  # words consumed per output group
    outs_per_group = 2 if kind == "boxmuller" else 1
    wbits = need if kind == "icdf" else bits
    if kind == "icdf" and source != "lfsr" and need > 32:
        raise ValueError(f"dist={dist!r}: needs {need} bits per sample; allowed <= 32")
    if kind == "icdf":
        per = 1
    if source == "lfsr":
        spc = 1
    else:
        spc = (SOURCE_BITS[source] // 32) * (32 // wbits)  # samples are cut per 32-bit word
    words_needed = math.ceil(count / outs_per_group / instances) * per  # per instance
    clocks = max(1, math.ceil(words_needed / spc))
    u = source_words(source, seed=seed, instances=instances, clocks=clocks, bits=wbits,
                     device=xp_device)  # (C, I, spc)
    xp = _xp(xp_device)
    if per == 1 and wbits <= 16:  # one word -> one sample: a 2^W-entry table, no float math
        table = xp.asarray(_to_float(np.arange(1 << wbits, dtype=np.uint64), dist, bits, np))
        return table[xp.transpose(u, (0, 2, 1)).reshape(-1)]
    # consecutive words of one instance form a group: order (instance, clock, spc)
    u = xp.transpose(u, (1, 0, 2)).reshape(instances, -1)
    g = u.shape[1] // per
    u = u[:, :g * per].reshape(instances, g, per)
    x = _to_float(u if per > 1 else u[..., 0], dist, bits, xp)  # (I, g) or (I, g, 2)
    x = x.reshape(instances, -1)
    return xp.ascontiguousarray(x.T).reshape(-1)  # sample-index-major across instances


def stream(name: str, numel: int, *, seed: int, bits: int = 8, instances: int = 256,
           offset: int = 0, pool_pointer: int = 0, device: str = "cpu") -> np.ndarray:
    """``numel`` unit-variance float32 samples of the hardware generator ``name``.

    Args:
        name: a spec for :func:`parse_spec` (``"lfsr-uniform"``, ``"lfsr8-clt4-otf16x256"``...).
        numel: number of samples (>= 0).
        seed: non-negative int; the generator states come from SplitMix64 of it.
        bits: W when the spec does not name it.
        instances: parallel generator instances for reuse ``none`` (element i comes from
            instance i % instances at sample index i // instances). With ``otf<n>x<L>`` the n
            generators are rotated over L lanes: element c*L + i = x[(i + c) mod n, c]
            (PeZO's on-the-fly array, rotation by one lane per clock). With ``pool<P>`` element
            j = Q[(pool_pointer + j) mod P] for a pool Q of P samples made from ``seed``.
        offset: skip this many elements first (a shard's slice).
        device: ``"cpu"`` (numpy) or ``"cuda"`` (cupy, only when ``cupy.cuda.is_available()``).
    """
    sp = parse_spec(name, bits=bits)
    for fname, v, lo in (("numel", numel, 0), ("seed", seed, 0), ("offset", offset, 0),
                         ("instances", instances, 1), ("pool_pointer", pool_pointer, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{fname}={v!r}: must be an int >= {lo}")
    xp = _xp(device)
    total = int(offset) + int(numel)
    if total == 0:
        return xp.zeros(0, dtype=xp.float32)
    if sp.reuse == "none":
        x = _samples(sp.source, sp.dist, sp.bits, seed=seed, instances=instances, count=total,
                     xp_device=device)
        return x[offset:total]
    if sp.reuse == "pool":
        q = _samples(sp.source, sp.dist, sp.bits, seed=seed, instances=instances,
                     count=sp.pool_size, xp_device=device)[:sp.pool_size]
        idx = (xp.arange(offset, total, dtype=xp.int64) + int(pool_pointer)) % sp.pool_size
        return q[idx]
    n, lanes = sp.n_generators, sp.lanes
    clocks = -(-total // lanes)
    x = _samples(sp.source, sp.dist, sp.bits, seed=seed, instances=n, count=clocks * n,
                 xp_device=device)[:clocks * n].reshape(clocks, n)
    c = xp.arange(clocks, dtype=xp.int64)[:, None]
    i = xp.arange(lanes, dtype=xp.int64)[None, :]
    z = xp.take_along_axis(x, (i + c) % n, axis=1).reshape(-1)
    return z[offset:total]


def hw_noise(spec: str, numel: int, *, seed: int, step: int, key: int, sample: int = 0,
             offset: int = 0, device: str = "cpu") -> np.ndarray:
    """The noise-contract form of :func:`stream` for ``noise="hw:<spec>"`` in the optimizers.

    Elements ``[offset, offset+numel)`` of the stream of tensor ``key`` for perturbation
    ``sample`` at ``step``: a pure function of ``(spec, seed, step, sample, key, index)``, so
    the +eps, -2eps and restore/update passes regenerate identical numbers. Reuse ``none`` and
    ``otf`` seed the generators from ``mix_seed(seed, step, sample, key)``; ``pool`` keeps one
    pool per ``seed`` for the whole run and starts at pointer ``mix_seed(step, sample, key) mod P``
    (PeZO's pre-generated pool with a moving start). Returns a float32 numpy (or cupy) array.
    """
    sp = parse_spec(spec)
    for fname, v in (("step", step), ("sample", sample), ("key", key)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{fname}={v!r}: must be an int >= 0")
    if sp.reuse == "pool":
        ptr = mix_seed(step, sample, key) % sp.pool_size
        return stream(spec, numel, seed=seed, offset=offset, pool_pointer=ptr, device=device)
    return stream(spec, numel, seed=mix_seed(seed, step, sample, key), offset=offset,
                  device=device)

