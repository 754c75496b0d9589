"""Low-rank perturbations (LOZO, Chen et al., ICLR 2025) as ZO ops: z_W = U·Vᵀ/√r.

For a 2-D tensor W (m × n) the perturbation is z = U·Vᵀ/√r with U (m × r) and V (n × r) of
standard normals from the noise contract (docs/lowrank.md):

* U: Philox key ``stream_key(seed, step, sample)``, counter word 2 = the tensor key, word 3 =
  ``STREAM_WORDS["lowrank_u"]``; element (i, k) is element i·r + k of that stream. Fresh for
  every (step, sample).
* V: key ``stream_key(seed, step // resample_every, 0)``, word 3 = ``STREAM_WORDS["lowrank_v"]``;
  the same for every step and sample of a block of ``resample_every`` steps (LOZO's lazy
  sampling), new at each block.

E[z_ij z_kl] = δ_ik δ_jl (Σ_k E[U²]E[V²]/r = 1): unit variance per element and uncorrelated
elements, the covariance of the full-rank contract. Every other tensor (norms, biases, 3-D
experts) gets the contract's full-rank stream (word 0), exactly MeZO's numbers.

z is never materialised beyond a chunk of rows (``CHUNK_ELEMENTS`` elements): a row chunk of
c·z is (c·U[rows])·V_sᵀ (V_s = V·fp32(1/√r)), one BLAS product; every pass over a tensor uses
the same row chunks, so the perturbation, the restore and a virtual copy add the same numbers.
The update of n samples is one rank-r product, (lr·Σ_k g_k U_k)·V_sᵀ, because V is shared.

``LowRankFactors`` keeps the current U (per tensor and sample, for one step) and V (per tensor,
for one block): generated once, read by every pass (perturb, restore, update, the virtual
forward). It is a cache of pure functions of the contract, never saved: a resumed run
regenerates the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from zoengine.kernels import reference
from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import STREAM_WORDS, noise_blocks
from zoengine.kernels.reference import (
    _rounding_words,
    compute_dtype,
    restore_index,
    stochastic_round,
)

CHUNK_ELEMENTS = 1 << 16
STREAM_U, STREAM_V = STREAM_WORDS["lowrank_u"], STREAM_WORDS["lowrank_v"]
_CUT = math.sqrt(50 * math.log(2))  # the contract's largest |normal|


def z_max(rank: int) -> float:
    """An upper bound of |z| = |Σ_k U_ik V_jk|/√r: r·5.89²/√r = √r·5.89² (the contract's cut)."""
    return math.sqrt(rank) * _CUT * _CUT * (1 + 2**-20)


def inv_sqrt_rank(rank: int) -> float:
    """fp32(1/√r), the scale folded into V (exact for r = 1 and 4)."""
    return float(torch.tensor(1.0 / math.sqrt(rank), dtype=torch.float32))


def factor(rows: int, rank: int, *, key64: int, tensor_key: int, stream_word: int,
           device) -> torch.Tensor:
    """(rows, rank) fp32 standard normals: element (i, k) is element i·rank + k of the stream."""
    count = rows * rank
    z = noise_blocks(0, -(-count // 4), key64=key64, tensor_key=tensor_key, dist="normal",
                     stream_word=stream_word, device=device)
    return z[:count].view(rows, rank)


def lowrank_rows(a: torch.Tensor, vs: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of a·vsᵀ: one (rows × r)·(r × n) BLAS product (5× faster than r
    broadcast multiply-adds on CPU, measured at 6144 × 576, r = 2). Every pass over a tensor
    uses the same row chunks, so an element gets the same value in each."""
    return a[r0:r1] @ vs.T


class LowRankFactors:
    """U and V of a run, generated once while current (a cache of the contract's numbers).

    ``generated`` counts the numbers made (whole Philox blocks), for the rng accounting tests.
    """

    def __init__(self, rank: int, resample_every: int):
        self.rank, self.every = rank, resample_every
        self._u: dict = {}
        self._v: dict = {}
        self._u_at = self._v_at = None
        self.generated = 0

    def _make(self, rows, key64, key, word, device):
        self.generated += 4 * -(-rows * self.rank // 4)
        return factor(rows, self.rank, key64=key64, tensor_key=key, stream_word=word,
                      device=device)

    def u(self, key: int, m: int, *, seed: int, step: int, sample: int, device) -> torch.Tensor:
        if self._u_at != (seed, step):
            self._u, self._u_at = {}, (seed, step)
        slot = (key, m, sample, str(device))
        if slot not in self._u:
            self._u[slot] = self._make(m, stream_key(seed, step, sample), key, STREAM_U, device)
        return self._u[slot]

    def v(self, key: int, n: int, *, seed: int, step: int, device) -> torch.Tensor:
        """V·fp32(1/√r) of the block holding ``step``."""
        block = step // self.every
        if self._v_at != (seed, block):
            self._v, self._v_at = {}, (seed, block)
        slot = (key, n, str(device))
        if slot not in self._v:
            v = self._make(n, stream_key(seed, block, 0), key, STREAM_V, device)
            self._v[slot] = v * inv_sqrt_rank(self.rank)
        return self._v[slot]


def _add_(x: torch.Tensor, z: torch.Tensor, ct: torch.dtype) -> None:
    """x ← x + z, rounded once to x's dtype (in place when x is of the compute dtype)."""
    if x.dtype == ct:
        x.add_(z)
    else:
        x.copy_(x.to(ct) + z)


def _row_chunks(m: int, n: int):
    rows = max(1, CHUNK_ELEMENTS // max(n, 1))
    for r0 in range(0, m, rows):
        yield r0, min(r0 + rows, m)


def _mask(masks, i, p):
    m = None if masks is None else masks[i]
    return None if m is None else m.reshape(p.shape)


class LowRankOps:
    """``perturb_`` / ``restore_update_`` of the reference backend with low-rank z on 2-D
    tensors (same signatures; ``dist`` applies to the full-rank tensors only)."""

    def __init__(self, factors: LowRankFactors):
        self.factors = factors
        self.z_max = z_max(factors.rank)  # read by functional.z_bound

    def _split(self, params, keys, masks):
        low = [i for i, p in enumerate(params) if p.dim() == 2 and p.numel()]
        full = [i for i in range(len(params)) if i not in low]
        return low, full

    @staticmethod
    def _sub(idx, params, keys, masks):
        ms = None if masks is None else [masks[i] for i in idx]
        return [params[i] for i in idx], [keys[i] for i in idx], ms

    def uv(self, p, key, *, seed, step, sample):
        """(U, V_s) of ``p`` for (step, sample): U (m × r), V·fp32(1/√r) (n × r), fp32."""
        f = self.factors
        return (f.u(key, p.shape[0], seed=seed, step=step, sample=sample, device=p.device),
                f.v(key, p.shape[1], seed=seed, step=step, device=p.device))

    def perturb_(self, params: Sequence[torch.Tensor], keys: Sequence[int], *, seed: int,
                 step: int, sample: int = 0, scale: float, dist: str = "normal", masks=None,
                 offsets=None) -> None:
        """θ ← θ + scale·z, z = U·Vᵀ/√r on 2-D tensors (masked elements untouched)."""
        _no_offsets(offsets)
        low, full = self._split(params, keys, masks)
        if full:
            ps, ks, ms = self._sub(full, params, keys, masks)
            reference.perturb_(ps, ks, seed=seed, step=step, sample=sample, scale=scale,
                               dist=dist, masks=ms)
        for i in low:
            p = params[i]
            m = _mask(masks, i, p)
            u, vs = self.uv(p, keys[i], seed=seed, step=step, sample=sample)
            ct = compute_dtype(p.dtype)
            u, vs = u.to(ct) * scale, vs.to(ct)  # the scale folded into U: m·r products
            for r0, r1 in _row_chunks(*p.shape):
                z = lowrank_rows(u, vs, r0, r1)
                if m is not None:
                    z.mul_(m[r0:r1])
                _add_(p[r0:r1], z, ct)

    def restore_update_(self, params: Sequence[torch.Tensor], keys: Sequence[int], *,
                        seed: int, step: int, eps: float, lr: float, grads: Sequence[float],
                        restore_sample: int | None = None, weight_decay: float = 0.0,
                        dist: str = "normal", masks=None, stochastic_rounding: bool = False,
                        offsets=None) -> None:
        """θ₁ = θ + eps·z_r; θ₂ = θ₁ − lr·(Σ_k grads[k]·z_k + wd·θ₁), with Σ_k g_k z_k computed
        as (Σ_k g_k U_k)·V_sᵀ (one rank-r product whatever n), row chunk by row chunk."""
        _no_offsets(offsets)
        r = restore_index(grads, restore_sample)
        low, full = self._split(params, keys, masks)
        if full:
            ps, ks, ms = self._sub(full, params, keys, masks)
            reference.restore_update_(ps, ks, seed=seed, step=step, eps=eps, lr=lr,
                                      grads=grads, restore_sample=r, weight_decay=weight_decay,
                                      dist=dist, masks=ms,
                                      stochastic_rounding=stochastic_rounding)
        for i in low:
            self._restore_update_2d(params[i], keys[i], _mask(masks, i, params[i]), seed=seed,
                                    step=step, eps=eps, lr=lr, grads=grads, r=r,
                                    wd=weight_decay, sr=stochastic_rounding)

    def _restore_update_2d(self, p, key, m, *, seed, step, eps, lr, grads, r, wd, sr):
        ct = compute_dtype(p.dtype)
        us = [self.uv(p, key, seed=seed, step=step, sample=k)[0].to(ct)
              for k in range(len(grads))]
        vs = self.uv(p, key, seed=seed, step=step, sample=r)[1].to(ct)
        g = None
        for k, uk in enumerate(us):  # G = Σ_k g_k U_k, in k order, then ·lr
            term = uk * float(grads[k])
            g = term if g is None else g + term
        g, ur = g * lr, us[r] * eps  # lr and eps folded into the factors: m·r products
        sr = sr and p.dtype in (torch.float16, torch.bfloat16)
        if wd == 0.0 and not sr:  # θ + (ε·U_r − lr·G)·V_sᵀ: one product, one pass
            both = ur - g  # lr = 0: exactly ε·U_r, so θ returns as the perturbations left it
            for r0, r1 in _row_chunks(*p.shape):
                z = lowrank_rows(both, vs, r0, r1)
                _add_(p[r0:r1], z if m is None else z.mul_(m[r0:r1]), ct)
            return
        key0, n = stream_key(seed, step, 0), p.shape[1]
        for r0, r1 in _row_chunks(*p.shape):
            x, acc = p[r0:r1], lowrank_rows(g, vs, r0, r1)
            theta = x.to(ct) if sr or x.dtype != ct else x  # fp32/fp64: updated in place
            if eps != 0.0:  # θ₁ = θ + ε·z_r (eps = 0: the virtual update, ĝ estimates)
                zr = lowrank_rows(ur, vs, r0, r1)
                theta = theta.add_(zr if m is None else zr.mul_(m[r0:r1])) \
                    if theta is x else theta + (zr if m is None else zr * m[r0:r1])
            if m is not None:
                acc.mul_(m[r0:r1])
            if wd != 0.0:  # masked too: a masked element gets no update at all
                decay = theta * (wd * lr)
                acc.add_(decay if m is None else decay.mul_(m[r0:r1]))
            if sr:
                words = _rounding_words(r0 * n, r1 * n, key0, key, p.device).view(r1 - r0, n)
                x.copy_(stochastic_round(theta - acc, p.dtype, words))
            elif theta is x:
                x.sub_(acc)
            else:
                x.copy_(theta - acc)

    def linear_term(self, x: torch.Tensor, w: torch.Tensor, key: int, *, seed: int, step: int,
                    sample: int, scale: float) -> torch.Tensor:
        """scale·x·zᵀ for z of ``w`` (m × n): scale·(x·V_s)·Uᵀ, in x's dtype. Temporaries: the
        (…, r) product and the (…, m) output; no m × n tensor."""
        u, vs = self.uv(w, key, seed=seed, step=step, sample=sample)
        t = (x @ vs.to(x.dtype)) * scale
        return t @ u.to(x.dtype).T

    def conv1d_term(self, x: torch.Tensor, w: torch.Tensor, key: int, *, seed: int, step: int,
                    sample: int, scale: float) -> torch.Tensor:
        """scale·x·z for z of a Conv1D weight ``w`` stored (in × out) = (m × n):
        scale·(x·U)·V_sᵀ, in x's dtype; no m × n tensor."""
        u, vs = self.uv(w, key, seed=seed, step=step, sample=sample)
        t = (x @ u.to(x.dtype)) * scale
        return t @ vs.to(x.dtype).T

    def embedding_rows(self, ids: torch.Tensor, w: torch.Tensor, key: int, *, seed: int,
                       step: int, sample: int) -> torch.Tensor:
        """Rows ``ids`` of z (…, n) in fp32: U[ids]·V_sᵀ, only the looked-up rows."""
        u, vs = self.uv(w, key, seed=seed, step=step, sample=sample)
        rows = u[ids.reshape(-1).to(torch.int64)]
        return lowrank_rows(rows, vs, 0, rows.shape[0]).view(*ids.shape, w.shape[1])


def _no_offsets(offsets) -> None:
    if offsets is not None and any(int(o) != 0 for o in offsets):
        raise ValueError(f"offsets={list(offsets)[:4]}: noise='lowrank' cannot train sharded "
                         "tensors (shard_offsets): U and V span whole rows and columns")


def lowrank_counts(shapes: Sequence[tuple], rank: int) -> dict:
    """Numbers (whole Philox blocks of 4) one step's factors need: ``u`` per sample (Σ over
    2-D tensors of m·r), ``v`` per block (Σ n·r), ``full`` per pass (the other tensors'
    streams), ``blocks_*`` the Philox calls, ``product_elements``: Σ m·n of the 2-D tensors."""
    out = dict(u=0, v=0, full=0, blocks_u=0, blocks_v=0, blocks_full=0, product_elements=0)
    for s in shapes:
        numel = math.prod(s)
        if len(s) == 2 and numel:
            bu, bv = -(-s[0] * rank // 4), -(-s[1] * rank // 4)
            out["blocks_u"] += bu
            out["blocks_v"] += bv
            out["product_elements"] += numel
        else:
            out["blocks_full"] += -(-numel // 4)
    for k in ("u", "v", "full"):
        out[k] = 4 * out[f"blocks_{k}"]
    return out
