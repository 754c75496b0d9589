"""Fused "noisy linear": y = x @ (W + scale·z_W)ᵀ + (b + scale·z_b) without materialising W + scale·z.

The GPU path of virtual perturbation (issue 14): a forward pass through a perturbed linear
layer that never writes the perturbed weight. A Triton matmul over tiles BLOCK_M x BLOCK_N x
BLOCK_K of x (M, K) and W (N, K) regenerates, for every W tile it loads, the contract noise of
that tile in registers (docs/noise_contract.md: element n·K + k of the weight's stream, tensor
key ``key``), adds scale·z (times the mask) in fp32 and accumulates x·W'ᵀ in fp32.

Noise per tile, two paths (``K4``, a compile-time flag):

* K % 4 == 0 (every LLM shape): a W row segment k0 .. k0+BLOCK_K (k0 a multiple of 4) is
  BLOCK_K / 4 whole Philox blocks, so the tile is made by ``triton_ops._noise_tile``: one
  Philox4x32-10 call per 4 elements, all four words used (the minimal Philox work), values
  identical to ``triton_ops.perturb_``'s.
* otherwise: per element, block = idx // 4 and lane = idx % 4; the whole 4-word block is
  computed per element and the lane's word(s) selected: 4x the minimal Philox work (and, for
  ``normal``, one log/sqrt/cos/sin per element instead of half of one).

Either way the noise of a W tile is regenerated once per M tile: ceil(M / BLOCK_M) times per
forward, the price of never storing W' (docs/kernels.md, "Noisy linear").

The bias (tiny) is perturbed in the same kernel's epilogue with the per-element path, in fp32.

Numbers. W' = W + scale·z is kept in fp32 (not rounded to the weight dtype); the materialised
path (``noisy_linear_reference``: ``reference.perturb_`` on a clone, then ``F.linear``) rounds W'
to the weight dtype first, so for bf16/fp16 weights the two differ by up to half an ulp of the
weight dtype per element of W' (times |x|). Products: IEEE fp32 by default
(``dot_precision="ieee"``); ``"tf32"`` uses tensor cores and rounds both operands to 10
mantissa bits (exact for fp16/bf16 x; W' to 10 bits, finer than bf16's 7). The GPU launch keeps
fp fusion on, so W + scale·z may be one fma (one rounding instead of the reference's two:
<= 0.5 fp32 ulp of W', far below the matmul's own rounding). Output in x's dtype, rounded once
(round to nearest even). No autograd: this is a forward for ZO, the result has no grad_fn.

Under ``TRITON_INTERPRET=1`` (set before ``triton_ops`` and this module are imported) the
kernel runs on CPU tensors; the interpreter ignores ``dot_precision`` (numpy fp32 matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zoengine.kernels import reference
from zoengine.kernels import triton_ops as T
from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import STREAM_Z, TWO_PI_F32
from zoengine.kernels.triton_launch import DTYPE_CODE, check_tensors, uint8_masks

__all__ = ["noisy_linear", "noisy_linear_reference", "is_interpreted"]

_WORD_Z: tl.constexpr = tl.constexpr(STREAM_Z)  # Philox counter word 3 of z
_TWO_PI: tl.constexpr = tl.constexpr(TWO_PI_F32)
PRECISIONS = ("ieee", "tf32")

# GPU tiles: a common fp32/tf32 matmul shape, not yet tuned on a device. Interpreter: 16 in
# every dimension (the smallest tl.dot accepts), so tiny test shapes still span several tiles.
_GPU_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
# fp fusion stays on (explicitly: Triton 3.9 warns when it is left unset): with it off, the
# fp32 FMA dot would become a mul and an add per product.
_GPU_OPTIONS = {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": True}
_INTERP_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


# ------------------------------------------------------------------------------------------
# jit helpers
# ------------------------------------------------------------------------------------------
@triton.jit
def _pick(lane, w0, w1, w2, w3):
    return tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))


@triton.jit
def _noise_at(key64, idx, tkey, DIST: tl.constexpr):
    """z of flat element indices ``idx`` (int64, any shape): Philox block idx // 4, lane idx % 4.

    One Philox call per element (4x the minimal work); the same operations as
    ``triton_ops._noise_tile`` on the selected lane, so the same values.
    """
    lane = (idx % 4).to(tl.int32)
    w0, w1, w2, w3 = T._philox_words(key64, idx // 4, tkey, _WORD_Z)
    if DIST == 0:  # lanes 0/1 from (w0, w1), lanes 2/3 from (w2, w3); even: cos, odd: sin
        r = tl.sqrt_rn(tl.log(T._open_unit(tl.where(lane < 2, w0, w2))) * -2.0)
        t = T._open_unit(tl.where(lane < 2, w1, w3)) * _TWO_PI
        z = tl.where((lane & 1) == 0, r * tl.cos(t), r * tl.sin(t))
    elif DIST == 1:
        z = T._uniform(_pick(lane, w0, w1, w2, w3))
    else:
        z = T._rademacher(_pick(lane, w0, w1, w2, w3))
    return z


@triton.jit
def _noise_rows(key64, rn, k0, K, tkey, DIST: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """z of W[rn, k0:k0+BLOCK_K] when K % 4 == 0 and k0 % 4 == 0: whole Philox blocks, one
    call per 4 elements (``_noise_tile``), reshaped (R, 4) -> (BLOCK_N, BLOCK_K) row-major."""
    j = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    blk = rn.to(tl.int64)[:, None] * (K // 4) + j[None, :]
    z = T._noise_tile(key64, tl.reshape(blk, (BLOCK_N * (BLOCK_K // 4),)), tkey, DIST)
    return tl.reshape(z, (BLOCK_N, BLOCK_K))


@triton.jit
def _load_tile(ptr, offs, inb, DT: tl.constexpr):
    """fp32 values of a tile: fp32 directly, fp16/bf16 from their 16-bit words (int16 view)."""
    if DT == 0:
        v = tl.load(ptr + offs, mask=inb, other=0.0)
    else:
        h = tl.load(ptr + offs, mask=inb, other=0)
        v = T._bits16_to_f32(h.to(tl.uint16, bitcast=True).to(tl.uint32), DT)
    return v


@triton.jit
def _noisy_w_tile(w_ptr, wm_ptr, rn, k0, N, K, key64, wkey, scale, W_DT: tl.constexpr,
                  DIST: tl.constexpr, K4: tl.constexpr, HAS_WMASK: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W'[rn, k0:k0+BLOCK_K] = W + scale·z·m in fp32, 0 outside the weight."""
    rk = k0 + tl.arange(0, BLOCK_K)
    idx = rn.to(tl.int64)[:, None] * K + rk[None, :]  # flat index into the (N, K) weight
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    w = _load_tile(w_ptr, idx, inb, W_DT)
    if K4:
        z = _noise_rows(key64, rn, k0, K, wkey, DIST, BLOCK_N, BLOCK_K)
    else:
        z = _noise_at(key64, idx, wkey, DIST)
    if HAS_WMASK:  # z * m, as the reference does (not a select)
        z = z * tl.load(wm_ptr + idx, mask=inb, other=0).to(tl.float32)
    return tl.where(inb, w + z * scale, 0.0)


@triton.jit
def _noisy_bias(b_ptr, bm_ptr, rn, N, key64, bkey, scale, DIST: tl.constexpr,
                HAS_BMASK: tl.constexpr):
    """b'[rn] = b + scale·z_b·m in fp32 (b passed as fp32), 0 outside."""
    inb = rn < N
    b = tl.load(b_ptr + rn, mask=inb, other=0.0)
    z = _noise_at(key64, rn.to(tl.int64), bkey, DIST)
    if HAS_BMASK:
        z = z * tl.load(bm_ptr + rn, mask=inb, other=0).to(tl.float32)
    return tl.where(inb, b + z * scale, 0.0)


# ------------------------------------------------------------------------------------------
# kernel
# ------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["k_lo", "k_hi", "wkey", "bkey"])
def _noisy_linear_kernel(x_ptr, w_ptr, wm_ptr, b_ptr, bm_ptr, out_ptr, M, N, K,
                         k_lo, k_hi, wkey, bkey, scale,
                         X_DT: tl.constexpr, W_DT: tl.constexpr, DIST: tl.constexpr,
                         K4: tl.constexpr, HAS_WMASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_BMASK: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rm, rn] = Σ_k x[rm, k]·W'[rn, k] + b'[rn]; W' tile made in registers per K step."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    key64 = (k_hi.to(tl.uint64) << 32) | k_lo.to(tl.uint64)
    wk = wkey.to(tl.uint32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xin = (rm[:, None] < M) & (rk[None, :] < K)
        xt = _load_tile(x_ptr, rm.to(tl.int64)[:, None] * K + rk[None, :], xin, X_DT)
        wt = _noisy_w_tile(w_ptr, wm_ptr, rn, k0, N, K, key64, wk, scale, W_DT, DIST, K4,
                           HAS_WMASK, BLOCK_N, BLOCK_K)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    if HAS_BIAS:
        bk = bkey.to(tl.uint32)
        acc = acc + _noisy_bias(b_ptr, bm_ptr, rn, N, key64, bk, scale, DIST, HAS_BMASK)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    inb = (rm[:, None] < M) & (rn[None, :] < N)
    if X_DT == 0:
        tl.store(out_ptr + offs, acc, mask=inb)
    else:
        h = T._f32_to_bits16(acc, X_DT)  # round to nearest even (not the interpreter's cast)
        tl.store(out_ptr + offs, h.to(tl.uint16).to(tl.int16, bitcast=True), mask=inb)


# ------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------
_INTERPRETED = type(_noisy_linear_kernel).__name__ == "InterpretedFunction"


def is_interpreted() -> bool:
    """Whether this module's kernel runs in the Triton interpreter (CPU tensors only)."""
    return _INTERPRETED


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """fp32 as is; fp16/bf16 as their int16 words (the kernel converts the bits itself)."""
    return t if t.dtype == torch.float32 else t.view(torch.int16)


def _check(x, weight, bias, mask, bias_key, bias_mask, dist, dot_precision):
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in); got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be the "
                         f"weight's in_features = {weight.shape[1]}")
    if not weight.is_contiguous():
        raise ValueError("weight is not contiguous: z is indexed by its row-major flat index")
    if dot_precision not in PRECISIONS:
        raise ValueError(f"dot_precision={dot_precision!r}: must be one of {PRECISIONS}")
    T._check_dist(dist)
    named = [("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        if t.dtype not in DTYPE_CODE:
            raise ValueError(f"{name} has dtype {t.dtype}; noisy_linear takes float32, "
                             "float16 and bfloat16 (use noisy_linear_reference otherwise)")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected "
                             f"({weight.shape[0]},)")
        if bias_key is None:
            raise ValueError("bias is given but bias_key is None: the bias needs its own "
                             "tensor key")
    elif bias_mask is not None:
        raise ValueError("bias_mask given without a bias")
    check_tensors([t for _, t in named], is_interpreted())
    for m in (mask, bias_mask):
        if m is not None and m.device != x.device:
            raise ValueError(f"a mask is on {m.device}, the tensors on {x.device}")


def noisy_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    key: int,
    seed: int,
    step: int,
    sample: int = 0,
    scale: float,
    dist: str = "normal",
    mask: torch.Tensor | None = None,
    bias_key: int | None = None,
    bias_mask: torch.Tensor | None = None,
    dot_precision: str = "ieee",
) -> torch.Tensor:
    """``x @ (W + scale·z_W)ᵀ + (b + scale·z_b)`` in one launch, W + scale·z never stored.

    z_W is the contract noise of ``weight`` (tensor key ``key``, element = row-major flat
    index) at (seed, step, sample), z_b that of ``bias`` (key ``bias_key``); ``mask`` /
    ``bias_mask`` zero z where they are 0, exactly as ``reference.perturb_`` does. x is
    (..., K); the result is (..., N) in x's dtype. W' and b' are fp32 (not rounded to the
    weight dtype, unlike ``noisy_linear_reference``); the bias is perturbed in the kernel's
    epilogue (per element, it is tiny), not on the host. See the module docstring for the
    numbers and the cost.
    """
    _check(x, weight, bias, mask, bias_key, bias_mask, dist, dot_precision)
    N, K = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M == 0 or N == 0 or K == 0:  # nothing to tile: the oracle is exact enough here
        return noisy_linear_reference(x, weight, bias, key=key, seed=seed, step=step,
                                      sample=sample, scale=scale, dist=dist, mask=mask,
                                      bias_key=bias_key, bias_mask=bias_mask)
    wm8 = uint8_masks([weight], [mask])[0]
    b32 = bm8 = None
    if bias is not None:
        b32 = bias.detach().to(torch.float32).contiguous()
        bm8 = uint8_masks([bias], [bias_mask])[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    key64 = stream_key(seed, step, sample)
    tiles = _INTERP_TILES if is_interpreted() else _GPU_TILES
    options = {} if is_interpreted() else _GPU_OPTIONS
    grid = (triton.cdiv(M, tiles["BLOCK_M"]), triton.cdiv(N, tiles["BLOCK_N"]))
    xv, wv, ov = _bits_view(x2), _bits_view(weight.detach()), _bits_view(out)
    _noisy_linear_kernel[grid](
        xv, wv, wm8 if wm8 is not None else xv, b32 if b32 is not None else xv,
        bm8 if bm8 is not None else xv, ov, M, N, K,
        key64 & 0xFFFFFFFF, key64 >> 32, int(key) & 0xFFFFFFFF,
        int(bias_key or 0) & 0xFFFFFFFF, float(scale),
        X_DT=DTYPE_CODE[x.dtype], W_DT=DTYPE_CODE[weight.dtype], DIST=T._check_dist(dist),
        K4=K % 4 == 0, HAS_WMASK=wm8 is not None, HAS_BIAS=b32 is not None,
        HAS_BMASK=bm8 is not None, PRECISION=dot_precision, **tiles, **options)
    return out.reshape(*lead, N)


def noisy_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    key: int,
    seed: int,
    step: int,
    sample: int = 0,
    scale: float,
    dist: str = "normal",
    mask: torch.Tensor | None = None,
    bias_key: int | None = None,
    bias_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: materialise W + scale·z (and b + scale·z_b) with ``reference.perturb_`` on
    clones, in the weight's dtype, then ``F.linear`` in x's dtype. Any device and dtype."""
    w = weight.detach().clone(memory_format=torch.contiguous_format)
    reference.perturb_([w], [key], seed=seed, step=step, sample=sample, scale=scale, dist=dist,
                       masks=[mask])
    b = None
    if bias is not None:
        if bias_key is None:
            raise ValueError("bias is given but bias_key is None")
        b = bias.detach().clone(memory_format=torch.contiguous_format)
        reference.perturb_([b], [bias_key], seed=seed, step=step, sample=sample, scale=scale,
                           dist=dist, masks=[bias_mask])
        b = b.to(x.dtype)
    return F.linear(x, w.to(x.dtype), b)
