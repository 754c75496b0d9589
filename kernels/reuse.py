"""PeZO's random-number reuse as ZO ops (pure PyTorch, chunked).

Two sources of perturbation numbers, both indexed by the *global* coordinate j of the
concatenated trainable parameters (tensor i starts at ``offsets[key_i]``):

* ``PoolSource`` — N numbers Q generated once; z[j] = s·Q[(p + j) mod N], where the pointer p
  of a perturbation advances by d (the number of perturbed coordinates) per perturbation.
* ``RotateSource`` — n on-the-fly uniform lanes; block c holds coordinates [c·n, (c+1)·n) and
  coordinate i of block c takes lane (i + c) mod n's c-th output. Lane outputs come from the
  noise contract (tensor key = lane, stream word 3), so every pass rebuilds identical numbers.

``ReuseOps(source, offsets)`` exposes ``perturb_`` and ``restore_update_`` with the signatures
of ``zoengine.kernels.reference`` (``dist`` is ignored: the source decides the numbers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import MASK32, STREAM_PEZO_LANES, philox4x32
from zoengine.kernels.reference import restore_index

CHUNK_ELEMENTS = 1 << 16


def lane_uniform(index: torch.Tensor, lane: torch.Tensor | int, key64: int) -> torch.Tensor:
    """Element ``index`` of lane ``lane``'s U(-1, 1) stream: odd multiples of 2^-24, exact.

    A lane is the noise contract's stream with counter word 2 = lane and word 3 =
    ``STREAM_PEZO_LANES``; the value is the contract's uniform map before its √3 scaling.
    """
    block = index >> 2
    words = torch.stack(philox4x32(block & MASK32, block >> 32, lane, STREAM_PEZO_LANES,
                                   key64 & MASK32, key64 >> 32), dim=1)
    w = words.gather(1, (index & 3).unsqueeze(1)).squeeze(1)
    return ((w >> 8) * 2 + 1 - (1 << 24)).to(torch.float32) * 2.0**-24


class PoolSource:
    """z[j] = scale·Q[(pointer + k·d + j) mod N] for sample k of a step."""

    def __init__(self, pool: torch.Tensor, scale: float, pointer: int, d: int):
        self.pool, self.scale, self.pointer, self.d = pool, scale, pointer, d

    def values(self, g0: int, g1: int, *, seed: int, step: int, sample: int, device):
        n = self.pool.numel()
        start = (self.pointer + sample * self.d + g0) % n
        idx = (torch.arange(g1 - g0, device=self.pool.device) + start) % n
        return (self.pool[idx] * self.scale).to(device)


class RotateSource:
    """n lanes; coordinate j = c·n + i reads lane (i + c) mod n at cycle c.

    ``scaling="static"`` multiplies by √3 (unit variance of U(-1, 1));
    ``"adaptive"`` divides each window of ``window`` consecutive global coordinates by the RMS
    of the numbers in it, so the numbers actually used have unit second moment.
    """

    def __init__(self, lanes: int, scaling: str, window: int = 1 << 14):
        self.lanes, self.scaling, self.window = lanes, scaling, window

    def _raw(self, g0: int, g1: int, key64: int, device) -> torch.Tensor:
        j = torch.arange(g0, g1, dtype=torch.int64, device=device)
        cycle, pos = j // self.lanes, j % self.lanes
        return lane_uniform(cycle, (pos + cycle) % self.lanes, key64)

    def values(self, g0: int, g1: int, *, seed: int, step: int, sample: int, device):
        key64 = stream_key(seed, step, sample)
        if self.scaling == "static":
            return self._raw(g0, g1, key64, device) * math.sqrt(3.0)
        w = self.window
        w0, w1 = (g0 // w) * w, -(-g1 // w) * w
        raw = self._raw(w0, w1, key64, device).view(-1, w)
        rms = raw.double().pow(2).mean(1, keepdim=True).sqrt().float()
        return (raw / rms).view(-1)[g0 - w0 : g1 - w0]


class HardwareSource:
    """Numbers from a bit-accurate hardware generator model (``zoengine.hwsim``), so training
    runs on exactly the numbers the priced hardware would produce (co-simulation).

    ``spec`` is hwsim's generator spec without the ``hw:`` prefix, e.g. ``lfsr32-uniform`` or
    ``lfsr-uniform-pool65536``; values are unit-variance and indexed by global coordinate.
    """

    def __init__(self, spec: str):
        from zoengine.hwsim.generators import parse_spec

        parse_spec(f"hw:{spec}")  # raises ValueError naming the spec
        self.spec = spec

    def values(self, g0: int, g1: int, *, seed: int, step: int, sample: int, device):
        from zoengine.hwsim.generators import hw_noise

        z = hw_noise(f"hw:{self.spec}", g1 - g0, seed=seed, step=step, key=0, sample=sample,
                     offset=g0)
        return torch.as_tensor(z, dtype=torch.float32).to(device)


class ReuseOps:
    """ZO ops whose z comes from a reuse source instead of fresh Philox numbers."""

    def __init__(self, source, offsets: dict[int, int]):
        self.source, self.offsets = source, offsets

    def _chunks(self, params, keys, masks, *, seed, step, sample):
        for i, (p, key) in enumerate(zip(params, keys)):
            flat = p.view(-1)
            base = self.offsets[key]
            m = None if masks is None or masks[i] is None else masks[i].reshape(-1)
            for s in range(0, flat.numel(), CHUNK_ELEMENTS):
                e = min(s + CHUNK_ELEMENTS, flat.numel())
                yield flat[s:e], base, s, e, m

    def _z(self, base, s, e, m, *, seed, step, sample, device):
        z = self.source.values(base + s, base + e, seed=seed, step=step, sample=sample,
                               device=device)
        return z if m is None else z * m[s:e]

    def perturb_(self, params: Sequence[torch.Tensor], keys: Sequence[int], *, seed: int,
                 step: int, sample: int = 0, scale: float, dist: str = "uniform",
                 masks=None) -> None:
        for x, base, s, e, m in self._chunks(params, keys, masks, seed=seed, step=step,
                                             sample=sample):
            z = self._z(base, s, e, m, seed=seed, step=step, sample=sample, device=x.device)
            x.copy_(x.to(torch.float32) + z * scale)

    def restore_update_(self, params: Sequence[torch.Tensor], keys: Sequence[int], *,
                        seed: int, step: int, eps: float, lr: float, grads: Sequence[float],
                        restore_sample: int | None = None, weight_decay: float = 0.0,
                        dist: str = "uniform", masks=None) -> None:
        n = len(grads)
        r = restore_index(grads, restore_sample)
        for x, base, s, e, m in self._chunks(params, keys, masks, seed=seed, step=step,
                                             sample=r):
            zs = [self._z(base, s, e, m, seed=seed, step=step, sample=k, device=x.device)
                  for k in range(n)]
            acc = zs[0] * float(grads[0])
            for k in range(1, n):
                acc = acc + zs[k] * float(grads[k])
            theta = x.to(torch.float32) + zs[r] * eps
            if weight_decay != 0.0:
                acc = acc + theta * weight_decay
            x.copy_(theta - acc * lr)
