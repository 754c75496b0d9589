"""Pure-PyTorch reference of the in-place ZO ops: the test oracle and the portable CPU path.

Both ops walk each tensor in chunks of ``CHUNK_ELEMENTS``, regenerate z for the chunk from the
noise contract, and write the chunk back: memory beyond the parameters is O(one chunk).
Arithmetic is in max(fp32, parameter dtype) (``compute_dtype``: fp32 for fp32/fp16/bf16,
fp64 for float64 weights, so an fp64 restore or a 1e-9 update is exact to fp64 rounding), with
each operation rounded separately (no fused multiply-add), and the result is rounded once to the
parameter dtype on store. z itself is the contract's fp32 value, widened exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import MASK32, STREAM_ROUNDING, noise_blocks, philox4x32

CHUNK_ELEMENTS = 1 << 16
_TWO_POW_M24 = 2.0**-24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for weights of ``dtype``: max(fp32, dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def philox_blocks(numel: int) -> int:
    """Philox blocks one pass of a stream over a tensor of ``numel`` elements generates: whole
    blocks of 4 values (chunks are multiples of 4, so no block is made twice)."""
    return -(-numel // 4)


def _flat_chunks(p: torch.Tensor):
    """Yield (start, end, view) over a contiguous 1-D view of ``p``."""
    flat = p.view(-1)
    for s in range(0, flat.numel(), CHUNK_ELEMENTS):
        e = min(s + CHUNK_ELEMENTS, flat.numel())
        yield s, e, flat[s:e]


def _chunk_noise(s: int, e: int, key64: int, key: int, dist: str, device) -> torch.Tensor:
    b0, b1 = s // 4, (e - 1) // 4 + 1
    z = noise_blocks(b0, b1 - b0, key64=key64, tensor_key=key, dist=dist, device=device)
    return z[s - 4 * b0 : e - 4 * b0]


def _rounding_words(s: int, e: int, key64: int, key: int, device) -> torch.Tensor:
    """Elements [s, e) of the stochastic-rounding stream: raw Philox words (int64, uint32 values).

    Same block/lane indexing as z (block b = i // 4, lane i % 4), counter word 3 = 1.
    """
    b0, b1 = s // 4, (e - 1) // 4 + 1
    blocks = torch.arange(b0, b1, dtype=torch.int64, device=device)
    words = philox4x32(blocks & MASK32, blocks >> 32, key, STREAM_ROUNDING,
                       key64 & MASK32, key64 >> 32)
    return torch.stack(words, dim=1).reshape(-1)[s - 4 * b0 : e - 4 * b0]


def stochastic_round(v: torch.Tensor, dtype: torch.dtype, words: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``v`` to ``dtype`` (fp16/bf16) stochastically with uint32 ``words``.

    n = RNE(v); if n == v (or either is not finite) the result is n. Otherwise let o be the
    ``dtype`` neighbour of n on v's side (one step of the 16-bit magnitude), q = |o - n| and
    d = |v - n| (both exact in fp32), and U = (word >> 8) * 2**-24 in [0, 1). The result is o
    if U*q < d, else n: P(o) = d/q, so E[result] = v exactly whenever d/q is a multiple of
    2**-24 (always in the normal range: fp32 has 13 (fp16) or 16 (bf16) bits below q).
    """
    n = v.to(dtype)
    nf = n.to(torch.float32)
    bits = n.view(torch.int16).to(torch.int32) & 0xFFFF
    sign, mag = bits & 0x8000, bits & 0x7FFF
    away = v.abs() > nf.abs()  # o lies one step farther from zero than n
    o_bits = sign | torch.where(away, mag + 1, (mag - 1).clamp(min=0))
    of = o_bits.to(torch.int16).view(dtype).to(torch.float32)
    q = (of - nf).abs()
    d = (v - nf).abs()
    u = (words >> 8).to(torch.float32) * _TWO_POW_M24
    take_o = (u * q) < d
    keep = (nf == v) | ~torch.isfinite(v) | ~torch.isfinite(nf)
    out = torch.where(take_o & ~keep, of, nf)
    return out.to(dtype)  # exact: out holds a dtype value


def _check_lists(params, keys, masks):
    if len(keys) != len(params):
        raise ValueError(f"keys has {len(keys)} entries for {len(params)} tensors")
    if masks is not None and len(masks) != len(params):
        raise ValueError(f"masks has {len(masks)} entries for {len(params)} tensors")
    for i, p in enumerate(params):
        if not p.is_contiguous():
            raise ValueError(f"params[{i}] is not contiguous; ZO ops update tensors in place")


def no_offsets(offsets, backend: str) -> None:
    """The compiled backends take whole tensors only: shard offsets need the reference ops."""
    if offsets is not None and any(int(o) != 0 for o in offsets):
        raise ValueError(f"offsets={list(offsets)[:4]}: the {backend} backend takes no shard "
                         "offsets; sharded tensors run on the reference backend "
                         "(backend=None or 'reference')")


def _check_offsets(offsets, n: int) -> list[int]:
    if offsets is None:
        return [0] * n
    if len(offsets) != n:
        raise ValueError(f"offsets has {len(offsets)} entries for {n} tensors")
    for i, o in enumerate(offsets):
        if not isinstance(o, int) or isinstance(o, bool) or o < 0:
            raise ValueError(f"offsets[{i}]={o!r}: must be an int >= 0")
    return list(offsets)


def restore_index(grads: Sequence[float], restore_sample: int | None) -> int:
    """The sample restore_update_ restores (default: the last), validated against ``grads``."""
    n = len(grads)
    if n == 0:
        raise ValueError("grads is empty: need one projected gradient per sample")
    r = n - 1 if restore_sample is None else restore_sample
    if not 0 <= r < n:
        raise ValueError(f"restore_sample={restore_sample}: must be in [0, {n})")
    return r


def perturb_(
    params: Sequence[torch.Tensor],
    keys: Sequence[int],
    *,
    seed: int,
    step: int,
    sample: int = 0,
    scale: float,
    dist: str = "normal",
    masks: Sequence[torch.Tensor | None] | None = None,
    offsets: Sequence[int] | None = None,
) -> None:
    """θ ← θ + scale·z for every tensor, z from the noise contract (in place, chunked).

    ``masks[i]`` (bool or 0/1, same shape as ``params[i]``) zeroes z where it is 0, so masked
    elements are left exactly as they are. ``offsets[i]``: ``params[i]`` is a shard whose
    element 0 is element ``offsets[i]`` of the full tensor (key ``keys[i]``), so it gets
    exactly that slice of the full tensor's z (docs/distributed.md).
    """
    _check_lists(params, keys, masks)
    offs = _check_offsets(offsets, len(params))
    key64 = stream_key(seed, step, sample)
    for i, (p, key, o) in enumerate(zip(params, keys, offs)):
        m = None if masks is None or masks[i] is None else masks[i].reshape(-1)
        ct = compute_dtype(p.dtype)
        for s, e, x in _flat_chunks(p):
            z = _chunk_noise(s + o, e + o, key64, key, dist, p.device).to(ct)
            if m is not None:
                z = z * m[s:e]
            x.copy_(x.to(ct) + z * scale)


def restore_update_(
    params: Sequence[torch.Tensor],
    keys: Sequence[int],
    *,
    seed: int,
    step: int,
    eps: float,
    lr: float,
    grads: Sequence[float],
    restore_sample: int | None = None,
    weight_decay: float = 0.0,
    dist: str = "normal",
    masks: Sequence[torch.Tensor | None] | None = None,
    stochastic_rounding: bool = False,
    offsets: Sequence[int] | None = None,
) -> None:
    """Restore the last perturbation and apply the update, in one pass over the weights.

    With z_k the stream of sample k at this step and r = ``restore_sample`` (default: the last
    sample, ``len(grads) - 1``), every element becomes

        θ₁ = θ + eps·z_r
        θ₂ = θ₁ − lr·(Σ_k grads[k]·z_k + weight_decay·θ₁)

    so a one-sample MeZO step regenerates z three times (perturb +ε, perturb −2ε, this pass)
    instead of the reference code's four. ``eps=0`` gives a pure update.

    ``stochastic_rounding=True`` rounds θ₂ of fp16/bf16 tensors with ``stochastic_round``,
    the random words taken from the stream of (seed, step, sample 0) with Philox counter word
    3 = 1 (same block/lane indexing as z); fp32 tensors are unaffected. Unbiased: E[θ₂ stored]
    equals the fp32 θ₂, so updates below half an ulp are not lost on average. ``offsets``:
    as in ``perturb_`` (a shard's z and rounding words are its slice of the full tensor's).
    """
    _check_lists(params, keys, masks)
    offs = _check_offsets(offsets, len(params))
    n = len(grads)
    r = restore_index(grads, restore_sample)
    key64s = [stream_key(seed, step, k) for k in range(n)]
    for i, (p, key, o) in enumerate(zip(params, keys, offs)):
        sr = stochastic_rounding and p.dtype in (torch.float16, torch.bfloat16)
        m = None if masks is None or masks[i] is None else masks[i].reshape(-1)
        ct = compute_dtype(p.dtype)
        for s, e, x in _flat_chunks(p):
            zr = _chunk_noise(s + o, e + o, key64s[r], key, dist, p.device).to(ct)
            acc = None
            for k in range(n):
                zk = (zr if k == r else
                      _chunk_noise(s + o, e + o, key64s[k], key, dist, p.device).to(ct))
                term = zk * float(grads[k])
                acc = term if acc is None else acc + term
            if m is not None:
                zr, acc = zr * m[s:e], acc * m[s:e]
            theta = x.to(ct) + zr * eps
            if weight_decay != 0.0:  # masked too: a masked element gets no update at all
                decay = theta * weight_decay
                acc = acc + (decay if m is None else decay * m[s:e])
            words = _rounding_words(s + o, e + o, key64s[0], key, p.device) if sr else None
            x.copy_(theta - acc * lr if words is None else
                    stochastic_round(theta - acc * lr, p.dtype, words))
