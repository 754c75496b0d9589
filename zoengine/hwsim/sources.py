"""Bit-accurate, vectorised models of hardware uniform random-number sources.

Every source here produces the exact integer words the RTL of ``zoengine.hwsim.rtl`` (or the
cited reference algorithm) produces clock by clock, from states seeded by SplitMix64.

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
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PHILOX_M",
    "PHILOX_W",
    "SOURCES",
    "SOURCE_BITS",
    "cupy_available",
    "lfsr_step1",
    "mix_seed",
    "philox4x32_10",
    "source_words",
    "splitmix64",
]

SOURCES = ("lfsr", "lutsr", "taus88", "xoshiro128ss", "philox")
# bits one instance of each source delivers per clock (lfsr: W, i.e. leap = sample width)
SOURCE_BITS = {"lutsr": 32, "taus88": 32, "xoshiro128ss": 32, "philox": 128}

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
