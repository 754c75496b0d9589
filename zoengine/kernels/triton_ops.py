"""Triton kernels for the in-place ZO ops: same names, signatures and numbers as reference.py.

One launch per op per call covers every tensor of the call (multi-tensor launch): a table of
raw addresses, sizes, tensor keys, mask addresses and dtype codes, plus a program -> tensor
map, built once per parameter set and cached. Inside a program, z is regenerated from the
noise contract (zoengine.noise) in registers: one Philox4x32-10 call per 4 elements, all four
words used. Arithmetic is fp32 with each operation rounded separately (launches pass
``enable_fp_fusion=False``) and one round-to-nearest-even store, as in the reference.

fp16/bf16 tensors are read and written as raw 16-bit words and converted with integer bit
operations (bf16) or a plain fp16 cast: the Triton interpreter truncates fp32 -> bf16 casts
(research/offline.md §3), so the bit trick keeps CPU tests and GPU results identical.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on CPU
tensors: the interpreter hands a kernel host memory, and CPU tensors' addresses in the table
are host addresses, so the pointer table works there as well (tests/test_triton_ops.py).

This module holds everything ``@triton.jit`` (so that one import decides compiled vs
interpreted for all of it) and the public launchers; the host-side checks, launch geometry and
table building are in zoengine/kernels/triton_launch.py.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.autograd.graph import increment_version

from zoengine.kernels import reference
from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import (
    DISTRIBUTIONS,
    SQRT3_F32,
    STREAM_ROUNDING,
    STREAM_Z,
    TWO_PI_F32,
)
from zoengine.kernels.reference import _check_lists, no_offsets, restore_index
from zoengine.kernels.triton_launch import (
    block_size,
    build_table,
    check_tensors,
    launch_options,
    split_wide,
    table_ident,
    uint8_masks,
)

__all__ = ["perturb_", "restore_update_", "is_interpreted", "clear_table_cache"]

# Distribution codes (constexpr: each gets its own compiled kernel).
_DIST_CODE = {"normal": 0, "uniform": 1, "rademacher": 2}
# Extension point, PeZO reuse pool (zoengine/kernels/reuse.py PoolSource, docs/kernels.md): code 3 would
# read z[j] = s * Q[(p_k + j) mod N], j = the tensor's global offset (a 7th table row) + element
# index, in `_noise_tile` below; Q's address, N and s become runtime args and p_k joins the
# sample table. Masks, restore, the n-sample sum and rounding stay as they are.

_SQRT3: tl.constexpr = tl.constexpr(SQRT3_F32)
_TWO_PI: tl.constexpr = tl.constexpr(TWO_PI_F32)
_TWO_POW_M24: tl.constexpr = tl.constexpr(2.0**-24)
_TWO_POW_M25: tl.constexpr = tl.constexpr(2.0**-25)
_INF: tl.constexpr = tl.constexpr(float("inf"))
_STREAM_Z: tl.constexpr = tl.constexpr(STREAM_Z)  # Philox counter word 3 of z
_STREAM_ROUNDING: tl.constexpr = tl.constexpr(STREAM_ROUNDING)  # ... of the rounding bits

# Table rows (int64, shape (6, T), built by triton_launch.build_table): what each program needs
# to find its tensor.
_ROW_ADDR: tl.constexpr = tl.constexpr(0)  # data_ptr of the tensor
_ROW_NUMEL: tl.constexpr = tl.constexpr(1)
_ROW_KEY: tl.constexpr = tl.constexpr(2)  # 32-bit tensor key (counter word 2)
_ROW_FIRST: tl.constexpr = tl.constexpr(3)  # first program id of the tensor
_ROW_MASK: tl.constexpr = tl.constexpr(4)  # data_ptr of its uint8 mask, 0 = none
_ROW_DTYPE: tl.constexpr = tl.constexpr(5)  # 0 fp32, 1 fp16, 2 bf16 (triton_launch.DTYPE_CODE)


# ------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------
@triton.jit
def _philox_words(key64, blk, tkey, stream: tl.constexpr):
    """Philox4x32-10, key = key64 (lo, hi), counter = (blk_lo, blk_hi, tkey, stream)."""
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + tkey
    c3 = zero + stream
    return tl.philox(key64, c0, c1, c2, c3)


@triton.jit
def _open_unit(w):
    # ((w >> 8) * 2 + 1) * 2**-25: < 2**25, so the int -> fp32 conversion is exact.
    return ((w >> 8) * 2 + 1).to(tl.float32) * _TWO_POW_M25


@triton.jit
def _uniform(w):
    v = (((w >> 8) * 2 + 1).to(tl.int32) - 16777216).to(tl.float32) * _TWO_POW_M24
    return v * _SQRT3


@triton.jit
def _rademacher(w):
    return (1 - 2 * (w >> 31).to(tl.int32)).to(tl.float32)


@triton.jit
def _box_muller(wa, wb):
    r = tl.sqrt_rn(tl.log(_open_unit(wa)) * -2.0)
    t = _open_unit(wb) * _TWO_PI
    return r * tl.cos(t), r * tl.sin(t)


@triton.jit
def _lanes(z0, z1, z2, z3):
    """(R,) x 4 lanes -> (R, 4) tile, element 4*row + lane (the contract's block/lane order)."""
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, z0[:, None], tl.where(lane == 1, z1[:, None],
                    tl.where(lane == 2, z2[:, None], z3[:, None])))


@triton.jit
def _noise_tile(key64, blk, tkey, DIST: tl.constexpr):
    """z for Philox blocks ``blk`` of one tensor as an (R, 4) fp32 tile."""
    w0, w1, w2, w3 = _philox_words(key64, blk, tkey, _STREAM_Z)
    if DIST == 0:
        z0, z1 = _box_muller(w0, w1)
        z2, z3 = _box_muller(w2, w3)
    elif DIST == 1:
        z0, z1, z2, z3 = _uniform(w0), _uniform(w1), _uniform(w2), _uniform(w3)
    else:
        z0, z1, z2, z3 = _rademacher(w0), _rademacher(w1), _rademacher(w2), _rademacher(w3)
    # DIST == 3 (PeZO pool) would go here: gather Q[(p_k + base + 4*blk + lane) % N] * s.
    return _lanes(z0, z1, z2, z3)


@triton.jit
def _bits16_to_f32(h, dt):
    """16-bit words (uint32 holding 0..0xFFFF) of an fp16 (dt 1) or bf16 (dt 2) -> fp32, exact."""
    if dt == 1:
        x = h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        x = (h << 16).to(tl.float32, bitcast=True)
    return x


@triton.jit
def _f32_to_bits16(v, dt):
    """fp32 -> round-to-nearest-even 16-bit word of fp16 (dt 1) or bf16 (dt 2), in a uint32.

    bf16 by integer arithmetic: the interpreter's fp32 -> bf16 cast truncates (offline.md §3),
    and this is the same RNE on the GPU. NaN maps to the canonical 0x7FC0.
    """
    if dt == 1:
        h = v.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        b = v.to(tl.uint32, bitcast=True)
        h = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        h = tl.where(v != v, 0x7FC0, h)
    return h


@triton.jit
def _stochastic_bits16(v, dt, w):
    """Stochastic rounding of fp32 v to fp16/bf16 with uint32 words w (reference.stochastic_round).

    n = RNE(v); o = the neighbour of n on v's side; q = |o - n|, d = |v - n| (exact);
    U = (w >> 8) * 2**-24; result o iff U*q < d, so P(o) = d/q and E[result] = v.
    """
    n = _f32_to_bits16(v, dt)
    nf = _bits16_to_f32(n, dt)
    sign = n & 0x8000
    mag = n & 0x7FFF
    away = tl.abs(v) > tl.abs(nf)
    o = sign | tl.where(away, mag + 1, tl.where(mag > 0, mag - 1, mag))
    of = _bits16_to_f32(o, dt)
    q = tl.abs(of - nf)
    d = tl.abs(v - nf)
    u = (w >> 8).to(tl.float32) * _TWO_POW_M24
    take_o = (u * q) < d
    keep = (nf == v) | (v != v) | (tl.abs(v) == _INF) | (tl.abs(nf) == _INF)
    return tl.where(take_o & (keep == 0), o, n)


@triton.jit
def _tensor_of_program(tab_ptr, prog_ptr, T, BLOCK: tl.constexpr):
    """This program's tensor row and its element offsets: (addr, numel, key, mask, dt, blk, offs)."""
    pid = tl.program_id(0)
    t = tl.load(prog_ptr + pid).to(tl.int64)
    addr = tl.load(tab_ptr + _ROW_ADDR * T + t)
    numel = tl.load(tab_ptr + _ROW_NUMEL * T + t)
    tkey = tl.load(tab_ptr + _ROW_KEY * T + t).to(tl.uint32)
    first = tl.load(tab_ptr + _ROW_FIRST * T + t)
    maddr = tl.load(tab_ptr + _ROW_MASK * T + t)
    dt = tl.load(tab_ptr + _ROW_DTYPE * T + t)
    start = (pid - first) * BLOCK  # int64: element offset of this program inside the tensor
    blk = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)  # (R,): one Philox call each
    offs = blk[:, None] * 4 + tl.arange(0, 4)[None, :]  # (R, 4): element indices
    return addr, numel, tkey, maddr, dt, blk, offs


@triton.jit
def _load_f32(addr, offs, inb, dt):
    if dt == 0:
        x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=inb, other=0.0)
    else:
        h = tl.load(addr.to(tl.pointer_type(tl.uint16)) + offs, mask=inb, other=0)
        x = _bits16_to_f32(h.to(tl.uint32), dt)
    return x


@triton.jit
def _apply_mask(z, maddr, offs, inb):
    # z * m (not a select), as the reference does, so even the sign of a masked zero agrees.
    if maddr != 0:
        m = tl.load(maddr.to(tl.pointer_type(tl.uint8)) + offs, mask=inb, other=0)
        z = z * m.to(tl.float32)
    return z


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "k_lo", "k_hi"])
def _perturb_kernel(tab_ptr, prog_ptr, T, k_lo, k_hi, scale,
                    DIST: tl.constexpr, BLOCK: tl.constexpr):
    addr, numel, tkey, maddr, dt, blk, offs = _tensor_of_program(tab_ptr, prog_ptr, T, BLOCK)
    inb = offs < numel
    key64 = (k_hi.to(tl.uint64) << 32) | k_lo.to(tl.uint64)
    z = _apply_mask(_noise_tile(key64, blk, tkey, DIST), maddr, offs, inb)
    x = _load_f32(addr, offs, inb, dt)
    v = x + z * scale
    if dt == 0:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, v, mask=inb)
    else:
        h = _f32_to_bits16(v, dt)
        tl.store(addr.to(tl.pointer_type(tl.uint16)) + offs, h.to(tl.uint16), mask=inb)


@triton.jit(do_not_specialize=["T", "n", "r"])
def _restore_update_kernel(tab_ptr, prog_ptr, T, samp_ptr, n, r, eps, lr, wd,
                           DIST: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr):
    """θ₁ = θ + eps·z_r;  θ₂ = θ₁ − lr·(Σ_k g_k z_k + wd·θ₁), the n streams made in registers.

    samp_ptr: int64[2n] = n stream keys (two's complement of the uint64), then the n fp32
    bit patterns of g_k (one small tensor, so one host -> device copy per call).
    """
    addr, numel, tkey, maddr, dt, blk, offs = _tensor_of_program(tab_ptr, prog_ptr, T, BLOCK)
    inb = offs < numel
    key0 = tl.load(samp_ptr).to(tl.uint64, bitcast=True)
    g0 = tl.load(samp_ptr + n).to(tl.int32).to(tl.float32, bitcast=True)
    z = _noise_tile(key0, blk, tkey, DIST)
    acc = z * g0  # sample 0 starts the sum (no 0 + ...: keeps -0 as the reference does)
    zr = z
    for k in range(1, n):
        keyk = tl.load(samp_ptr + k).to(tl.uint64, bitcast=True)
        gk = tl.load(samp_ptr + n + k).to(tl.int32).to(tl.float32, bitcast=True)
        zk = _noise_tile(keyk, blk, tkey, DIST)
        acc = acc + zk * gk
        zr = tl.where(k == r, zk, zr)
    zr = _apply_mask(zr, maddr, offs, inb)
    acc = _apply_mask(acc, maddr, offs, inb)
    x = _load_f32(addr, offs, inb, dt)
    theta = x + zr * eps
    if wd != 0.0:  # the decay term masked too: a masked element gets no update at all
        acc = acc + _apply_mask(theta * wd, maddr, offs, inb)
    v = theta - acc * lr
    if dt == 0:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, v, mask=inb)
    else:
        if SR:
            w0, w1, w2, w3 = _philox_words(key0, blk, tkey, _STREAM_ROUNDING)
            h = _stochastic_bits16(v, dt, _lanes(w0, w1, w2, w3))
        else:
            h = _f32_to_bits16(v, dt)
        tl.store(addr.to(tl.pointer_type(tl.uint16)) + offs, h.to(tl.uint16), mask=inb)


# ------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------
_INTERPRETED = type(_perturb_kernel).__name__ == "InterpretedFunction"


def is_interpreted() -> bool:
    """Whether this module's kernels run in the Triton interpreter (TRITON_INTERPRET=1 was set
    before import): then they take CPU tensors only."""
    return _INTERPRETED


_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 64  # parameter sets (groups x mask states) kept; a table is ~50 B/tensor


def clear_table_cache() -> None:
    _TABLE_CACHE.clear()


def _table(params, keys, masks8, block: int):
    """(table int64[6, T], program -> tensor int32[P], P) for these tensors, cached."""
    ident = table_ident(params, keys, masks8, block)
    hit = _TABLE_CACHE.get(ident)
    if hit is not None:
        _TABLE_CACHE.move_to_end(ident)
        return hit
    entry = build_table(params, keys, masks8, block)
    _TABLE_CACHE[ident] = entry
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return entry


def _check_dist(dist: str) -> int:
    if dist not in _DIST_CODE:
        raise ValueError(f"dist={dist!r}: must be one of {DISTRIBUTIONS}")
    return _DIST_CODE[dist]


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
    """θ ← θ + scale·z for every tensor, in one kernel launch (see reference.perturb_)."""
    no_offsets(offsets, "Triton")
    _check_lists(params, keys, masks)
    code = _check_dist(dist)
    (params, keys, masks), wide = split_wide(params, keys, masks)
    if wide[0]:
        reference.perturb_(*wide[:2], seed=seed, step=step, sample=sample, scale=scale,
                           dist=dist, masks=wide[2])
    key64 = stream_key(seed, step, sample)
    if not params or all(p.numel() == 0 for p in params):
        return
    check_tensors(params, is_interpreted())
    masks8 = uint8_masks(params, masks)  # the table holds their addresses: keep them alive
    block = block_size(params, is_interpreted())
    tab, prog, nprog = _table(params, keys, masks8, block)
    _perturb_kernel[(nprog,)](tab, prog, tab.shape[1], key64 & 0xFFFFFFFF, key64 >> 32,
                              float(scale), DIST=code, BLOCK=block,
                              **launch_options(is_interpreted()))
    increment_version(params)  # writes through raw addresses: tell autograd, as copy_ would


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
    """Restore sample ``restore_sample`` and apply Σ_k g_k z_k in one launch over all tensors.

    Same semantics as ``reference.restore_update_``, including ``stochastic_rounding``
    (fp16/bf16 only; Philox counter word 3 = 1 with the key of sample 0).
    """
    no_offsets(offsets, "Triton")
    _check_lists(params, keys, masks)
    code = _check_dist(dist)
    n = len(grads)
    r = restore_index(grads, restore_sample)
    (params, keys, masks), wide = split_wide(params, keys, masks)
    if wide[0]:
        reference.restore_update_(*wide[:2], seed=seed, step=step, eps=eps, lr=lr, grads=grads,
                                  restore_sample=r, weight_decay=weight_decay, dist=dist,
                                  masks=wide[2])
    key64s = [stream_key(seed, step, k) for k in range(n)]
    if not params or all(p.numel() == 0 for p in params):
        return
    check_tensors(params, is_interpreted())
    masks8 = uint8_masks(params, masks)  # the table holds their addresses: keep them alive
    block = block_size(params, is_interpreted())
    tab, prog, nprog = _table(params, keys, masks8, block)
    signed = [k - (1 << 64) if k >= 1 << 63 else k for k in key64s]
    gbits = torch.tensor([float(g) for g in grads], dtype=torch.float32).view(torch.int32)
    samp = torch.tensor(signed + gbits.tolist(), dtype=torch.int64).to(params[0].device)
    _restore_update_kernel[(nprog,)](
        tab, prog, tab.shape[1], samp, n, r, float(eps), float(lr), float(weight_decay),
        DIST=code, SR=bool(stochastic_rounding), BLOCK=block, **launch_options(is_interpreted()))
    increment_version(params)
