"""Bit-accurate, vectorised models of hardware random-number generators.

Every uniform source here produces the exact integer words the RTL of ``zoengine.hwsim.rtl``
(or the cited reference algorithm) produces clock by clock; the Gaussian transforms are exact
integer functions of those words (CLT sum, ICDF ROM lookup) except Box–Muller, whose internal
fixed-point datapath is *not* modelled (it is evaluated in float64 on the W-bit inputs and
rounded to the W-bit output format).

Uniform sources (``SOURCES``)
    ``lfsr``          64-bit Fibonacci XNOR LFSR, taps 64,63,61,60 (Xilinx XAPP052), leaping W
                      bits per clock; output = the W newest state bits (dossier Appendix A).
    ``lutsr``         LUT-SR-*style* recurrence: 32 shift-register chains of depth 32 (SRL32s),
                      each chain fed by the XOR of 5 tapped bits. Same structure and cost class as
                      Thomas & Luk's LUT-SR (2 LUT + 1 FF per output bit) but with our own taps;
                      period not proven maximal. 32 bits per clock.
    ``taus88``        L'Ecuyer's three-component Tausworthe (Math. Comp. 65:203, 1996), 32 b/clk.
    ``xoshiro128ss``  xoshiro128** (Blackman & Vigna, ACM TOMS 47(4), 2021), 32 b/clk.
    ``philox``        Philox4x32-10 (Salmon et al., SC'11), 128 b/clk (one counter per clock).

Distributions (``DISTS``): ``uniform`` (midpoint grid on (-1, 1), scaled to unit variance),
``rademacher`` (top bit), ``clt<k>`` (Irwin–Hall sum of k W-bit words), ``icdf<m>`` (m address
bits + 1 sign bit into a half-normal ROM of W-bit words) and ``boxmuller``.

Every float stream has mean 0 and variance 1 by construction (exact for uniform, rademacher,
CLT and ICDF; up to the output rounding for Box–Muller).

Co-simulation entry point for the optimizers: :func:`hw_noise`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from zoengine.hwsim.distributions import (  # noqa: F401  (re-exported)
    DISTS,
    _parse_dist,
    _to_float,
    icdf_rom,
    sample_bits,
)
from zoengine.hwsim.stats import check_stream  # noqa: F401  (re-exported)

__all__ = [
    "DISTS",
    "SOURCES",
    "StreamSpec",
    "check_stream",
    "cupy_available",
    "hw_noise",
    "icdf_rom",
    "parse_spec",
    "source_words",
    "stream",
]

SOURCES = ("lfsr", "lutsr", "taus88", "xoshiro128ss", "philox")
# bits one instance of each source delivers per clock (lfsr: W, i.e. leap = sample width)
SOURCE_BITS = {"lutsr": 32, "taus88": 32, "xoshiro128ss": 32, "philox": 128}
REUSE_MODES = ("none", "otf", "pool")

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def cupy_available() -> bool:
    """True only if cupy imports *and* a CUDA device is usable."""
    try:
        import cupy  # noqa: PLC0415
    except Exception:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def _xp(device: str):
    if device == "cpu":
        return np
    if device == "cuda":
        if not cupy_available():
            raise ValueError("device='cuda': cupy with a usable CUDA device is not available; "
                             "allowed: 'cpu' (or 'cuda' when cupy.cuda.is_available())")
        import cupy  # noqa: PLC0415
        return cupy
    raise ValueError(f"device={device!r}: must be 'cpu' or 'cuda'")


# ---------------------------------------------------------------------------------------------
# seeding: SplitMix64 (Steele, Lea, Flood, OOPSLA 2014), vectorised
# ---------------------------------------------------------------------------------------------
def splitmix64(x) -> np.ndarray:
    """SplitMix64 finaliser of ``x + golden`` (uint64 in, uint64 out; wraps mod 2**64)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def mix_seed(*parts: int) -> int:
    """One 64-bit seed from several non-negative ints (order matters)."""
    h = np.uint64(0x6A09E667F3BCC909)
    for p in parts:
        h = splitmix64(h ^ np.uint64(int(p) & 0xFFFFFFFFFFFFFFFF))
    return int(h)


def _seed_words(seed: int, instances: int, count: int) -> np.ndarray:
    """``(count, instances)`` uint64 words, distinct per instance, from one seed."""
    base = np.uint64(mix_seed(seed))
    idx = np.arange(instances * count, dtype=np.uint64).reshape(count, instances)
    return splitmix64(base ^ splitmix64(idx))


# ---------------------------------------------------------------------------------------------
# uniform sources: each returns (clocks, instances, spc) arrays of W-bit integers (uint64)
# ---------------------------------------------------------------------------------------------
_LFSR_TAPS = (63, 62, 60, 59)  # taps 64,63,61,60 (1-based), XNOR, Xilinx XAPP052


def lfsr_step1(s: int) -> int:
    """One bit-serial step of the 64-bit XNOR LFSR (reference for tests; mirrors the RTL)."""
    fb = 1 ^ (((s >> 63) ^ (s >> 62) ^ (s >> 60) ^ (s >> 59)) & 1)
    return ((s << 1) | fb) & 0xFFFFFFFFFFFFFFFF


def _lfsr_leap(s, j: int, xp):
    """Advance the XNOR LFSR by ``j`` <= 60 bit-steps at once (word-parallel).

    After i single steps the feedback bit reads original bits 63-i, 62-i, 60-i, 59-i as long as
    59 - i >= i... (all taps stay in the original state for i < 60), so the j new bits are bits
    63..64-j of ~(s ^ s<<1 ^ s<<3 ^ s<<4), in order.
    """
    t = s ^ (s << xp.uint64(1)) ^ (s << xp.uint64(3)) ^ (s << xp.uint64(4))
    new = (~t) >> xp.uint64(64 - j)
    return (s << xp.uint64(j)) | new


def _lfsr_words(seed: int, instances: int, clocks: int, w: int, xp) -> np.ndarray:
    if not 1 <= w <= 32:
        raise ValueError(f"bits={w}: the lfsr model leaps W bits per clock; allowed 1..32")
    s = xp.asarray(_seed_words(seed, instances, 1)[0])
    # all-ones is the XNOR lock-up state; SplitMix never yields it in practice, but be exact
    s = xp.where(s == _M64, xp.uint64(0), s)
    j = 60 // w  # clocks per super-step
    steps = -(-clocks // j)
    states = xp.empty((steps, instances), dtype=xp.uint64)
    for k in range(steps):
        s = _lfsr_leap(s, j * w, xp)
        states[k] = s
    if w in (8, 16, 32) and np.little_endian:
        # clock i of a super-step is byte/half/word (j-1-i) of the state: a zero-copy view
        dt = {8: xp.uint8, 16: xp.uint16, 32: xp.uint32}[w]
        v = states.view(dt).reshape(steps, instances, 64 // w)[:, :, j - 1::-1] if j < 64 // w \
            else states.view(dt).reshape(steps, instances, 64 // w)[:, :, ::-1]
        out = xp.transpose(v, (0, 2, 1))
    else:
        shifts = xp.asarray([(j - 1 - i) * w for i in range(j)], dtype=xp.uint64)
        out = (states[:, None, :] >> shifts[None, :, None]) & xp.uint64((1 << w) - 1)
    return out.reshape(steps * j, instances)[:clocks, :, None]


_LUTSR_LAGS = (32, 24, 18, 11, 5)
_LUTSR_ROTS = (1, 7, 13, 19, 27)


def _rotl32(x, r: int, xp):
    return ((x << xp.uint32(r)) | (x >> xp.uint32(32 - r))) if r else x


def _lutsr_words(seed: int, instances: int, clocks: int, xp) -> np.ndarray:
    depth = _LUTSR_LAGS[0]
    init = (_seed_words(seed, instances, depth) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    x = xp.empty((depth + clocks + 5, instances), dtype=xp.uint32)
    x[:depth] = xp.asarray(init)
    t = depth
    blk = _LUTSR_LAGS[-1]  # the smallest lag: this many rows can be computed at once
    while t < depth + clocks:
        acc = None
        for lag, rot in zip(_LUTSR_LAGS, _LUTSR_ROTS, strict=True):
            term = _rotl32(x[t - lag:t - lag + blk], rot, xp)
            acc = term if acc is None else acc ^ term
        x[t:t + blk] = acc
        t += blk
    return x[depth:depth + clocks].astype(xp.uint64)[:, :, None]


def _taus88_words(seed: int, instances: int, clocks: int, xp) -> np.ndarray:
    init = _seed_words(seed, instances, 3)
    # component seeds must exceed 1, 7, 15 (L'Ecuyer 1996)
    s1, s2, s3 = ((xp.asarray(init[i] & np.uint64(0xFFFFFFFF)).astype(xp.uint32) | xp.uint32(m))
                  for i, m in enumerate((2, 8, 16)))
    out = xp.empty((clocks, instances), dtype=xp.uint32)
    u = xp.uint32
    for c in range(clocks):
        b = ((s1 << u(13)) ^ s1) >> u(19)
        s1 = ((s1 & u(0xFFFFFFFE)) << u(12)) ^ b
        b = ((s2 << u(2)) ^ s2) >> u(25)
        s2 = ((s2 & u(0xFFFFFFF8)) << u(4)) ^ b
        b = ((s3 << u(3)) ^ s3) >> u(11)
        s3 = ((s3 & u(0xFFFFFFF0)) << u(17)) ^ b
        out[c] = s1 ^ s2 ^ s3
    return out.astype(xp.uint64)[:, :, None]


def _xoshiro_words(seed: int, instances: int, clocks: int, xp) -> np.ndarray:
    init = _seed_words(seed, instances, 4) & np.uint64(0xFFFFFFFF)
    init[0] |= np.uint64(1)  # the all-zero state is the only forbidden one
    s0, s1, s2, s3 = (xp.asarray(init[i]).astype(xp.uint32) for i in range(4))
    out = xp.empty((clocks, instances), dtype=xp.uint32)
    u = xp.uint32
    for c in range(clocks):
        out[c] = _rotl32(s1 * u(5), 7, xp) * u(9)
        t = s1 << u(9)
        s2 = s2 ^ s0
        s3 = s3 ^ s1
        s1 = s1 ^ s2
        s0 = s0 ^ s3
        s2 = s2 ^ t
        s3 = _rotl32(s3, 11, xp)
    return out.astype(xp.uint64)[:, :, None]


PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int, xp=np):
    """Philox4x32-10 on uint64 arrays holding 32-bit values; returns 4 arrays."""
    m32 = xp.uint64(0xFFFFFFFF)
    c = [xp.asarray(v, dtype=xp.uint64) & m32 for v in (c0, c1, c2, c3)]
    for _ in range(10):
        p0 = xp.uint64(PHILOX_M[0]) * c[0]
        p1 = xp.uint64(PHILOX_M[1]) * c[2]
        c = [(p1 >> xp.uint64(32)) ^ c[1] ^ xp.uint64(k0), p1 & m32,
             (p0 >> xp.uint64(32)) ^ c[3] ^ xp.uint64(k1), p0 & m32]
        k0 = (k0 + PHILOX_W[0]) & 0xFFFFFFFF
        k1 = (k1 + PHILOX_W[1]) & 0xFFFFFFFF
    return c


def _philox_words(seed: int, instances: int, clocks: int, xp) -> np.ndarray:
    key = mix_seed(seed)
    clk = xp.arange(clocks, dtype=xp.uint64)[:, None]
    inst = xp.arange(instances, dtype=xp.uint64)[None, :]
    shape = (clocks, instances)
    c0 = xp.broadcast_to(clk & xp.uint64(0xFFFFFFFF), shape)
    c1 = xp.broadcast_to(clk >> xp.uint64(32), shape)
    c2 = xp.broadcast_to(inst, shape)
    w = philox4x32_10(c0, c1, c2, xp.zeros(shape, dtype=xp.uint64),
                      key & 0xFFFFFFFF, key >> 32, xp)
    return xp.stack(w, axis=-1)  # (clocks, instances, 4) 32-bit words


def source_words(source: str, *, seed: int, instances: int, clocks: int, bits: int,
                 device: str = "cpu") -> np.ndarray:
    """``(clocks, instances, spc)`` W-bit unsigned integers from ``instances`` copies of a source.

    ``spc`` (samples per clock per instance) is 1 for ``lfsr`` (it leaps W bits per clock) and
    ``source_bits // W`` for the word-oriented sources, whose words are cut MSB first.
    """
    xp = _xp(device)
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: must be one of {SOURCES}")
    for name, v, lo in (("instances", instances, 1), ("clocks", clocks, 0), ("bits", bits, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}={v!r}: must be an int >= {lo}")
    if source == "lfsr":
        return _lfsr_words(seed, instances, clocks, bits, xp)
    if bits > 32:
        raise ValueError(f"bits={bits}: {source} words are 32 bits; allowed 1..32")
    words = {"lutsr": _lutsr_words, "taus88": _taus88_words, "xoshiro128ss": _xoshiro_words,
             "philox": _philox_words}[source](seed, instances, clocks, xp)
    per = 32 // bits
    shifts = xp.asarray([32 - (i + 1) * bits for i in range(per)], dtype=xp.uint64)
    cut = (words[..., None] >> shifts) & xp.uint64((1 << bits) - 1)  # (C, I, words, per)
    return cut.reshape(clocks, instances, -1)


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


# ---------------------------------------------------------------------------------------------
# specs and streams
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamSpec:
    """A parsed ``hw:`` noise spec: source, W, distribution and reuse."""

    source: str
    bits: int
    dist: str
    reuse: str = "none"
    n_generators: int = 16
    lanes: int = 256
    pool_size: int = 65536

    def __str__(self) -> str:
        r = {"none": "", "otf": f"-otf{self.n_generators}x{self.lanes}",
             "pool": f"-pool{self.pool_size}"}[self.reuse]
        return f"hw:{self.source}-w{self.bits}-{self.dist}{r}"


_REUSE_RE = re.compile(r"^(?:otf(\d+)x(\d+)|pool(\d+))$")


def parse_spec(spec: str, *, bits: int = 8) -> StreamSpec:
    """Parse ``[hw:]<source>[<W>][-w<W>]-<dist>[-otf<n>x<L>|-pool<P>]``.

    Examples: ``hw:lfsr-uniform``, ``hw:lfsr32-uniform``, ``hw:taus88-w8-clt4``,
    ``hw:lfsr8-uniform-otf16x256``, ``hw:philox-w16-icdf10``, ``hw:lfsr-uniform-pool65536``.
    """
    if not isinstance(spec, str):
        raise ValueError(f"spec={spec!r}: must be a string like 'hw:lfsr-uniform'")
    body = spec[3:] if spec.startswith("hw:") else spec
    toks = body.split("-")
    head = toks[0]
    src = next((s for s in sorted(SOURCES, key=len, reverse=True) if head.startswith(s)), None)
    if src is None:
        raise ValueError(f"spec={spec!r}: unknown generator {head!r}; allowed sources {SOURCES}")
    rest = head[len(src):]
    if rest:
        if not rest.isdigit():
            raise ValueError(f"spec={spec!r}: {head!r} must be a source name plus an optional "
                             f"bit width, e.g. 'lfsr8'")
        bits = int(rest)
    toks = toks[1:]
    if toks and re.fullmatch(r"w\d+", toks[0]):
        bits = int(toks[0][1:])
        toks = toks[1:]
    if not toks:
        raise ValueError(f"spec={spec!r}: missing distribution; allowed {DISTS}")
    dist = toks[0]
    try:
        _parse_dist(dist)
    except ValueError as exc:
        raise ValueError(f"spec={spec!r}: {exc}") from None
    if not 1 <= bits <= 32:
        raise ValueError(f"spec={spec!r}: bit width {bits} outside 1..32")
    if dist.startswith("icdf") and bits < 5:
        raise ValueError(f"spec={spec!r}: icdf needs W >= 5 output bits")
    reuse, n, lanes, pool = "none", 16, 256, 65536
    if len(toks) > 1:
        m = _REUSE_RE.match(toks[1])
        if not m or len(toks) > 2:
            raise ValueError(f"spec={spec!r}: reuse part {'-'.join(toks[1:])!r} must be "
                             f"'otf<n>x<lanes>' or 'pool<P>'")
        if m.group(3):
            reuse, pool = "pool", int(m.group(3))
            if pool < 1:
                raise ValueError(f"spec={spec!r}: pool size must be >= 1")
        else:
            reuse, n, lanes = "otf", int(m.group(1)), int(m.group(2))
            if not 1 <= n <= lanes:
                raise ValueError(f"spec={spec!r}: on-the-fly needs 1 <= n_generators <= lanes "
                                 f"(got n={n}, lanes={lanes})")
    return StreamSpec(src, bits, dist, reuse, n, lanes, pool)


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

