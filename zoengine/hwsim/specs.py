"""``hw:`` noise specs: the parsed form (source, W, distribution, reuse) and its parser."""

from __future__ import annotations

import re
from dataclasses import dataclass

from zoengine.hwsim.distributions import DISTS, _parse_dist
from zoengine.hwsim.sources import SOURCES

__all__ = ["REUSE_MODES", "StreamSpec", "parse_spec"]

REUSE_MODES = ("none", "otf", "pool")


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
