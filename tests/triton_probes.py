"""Tiny Triton kernels that expose pieces of zoengine/kernels/triton_ops.py to tests.

Import this module only after TRITON_INTERPRET=1 is set (the test fixture does): a
``@triton.jit`` defined before that stays a compiled-only kernel and cannot run on CPU.
"""

import torch
import triton
import triton.language as tl

from zoengine.kernels import triton_ops as T


@triton.jit
def _philox_probe(blk_ptr, out_ptr, key_lo, key_hi, tkey, N, STREAM: tl.constexpr,
                  BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < N
    blk = tl.load(blk_ptr + i, mask=ok, other=0)
    key64 = (key_hi.to(tl.uint64) << 32) | key_lo.to(tl.uint64)
    w0, w1, w2, w3 = T._philox_words(key64, blk, tkey.to(tl.uint32), STREAM)
    tl.store(out_ptr + 4 * i, w0.to(tl.int64), mask=ok)
    tl.store(out_ptr + 4 * i + 1, w1.to(tl.int64), mask=ok)
    tl.store(out_ptr + 4 * i + 2, w2.to(tl.int64), mask=ok)
    tl.store(out_ptr + 4 * i + 3, w3.to(tl.int64), mask=ok)


@triton.jit
def _randint4x_probe(off_ptr, out_ptr, seed, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < N
    off = tl.load(off_ptr + i, mask=ok, other=0)
    w0, w1, w2, w3 = tl.randint4x(seed, off)
    tl.store(out_ptr + 4 * i, w0.to(tl.uint32).to(tl.int64), mask=ok)
    tl.store(out_ptr + 4 * i + 1, w1.to(tl.uint32).to(tl.int64), mask=ok)
    tl.store(out_ptr + 4 * i + 2, w2.to(tl.uint32).to(tl.int64), mask=ok)
    tl.store(out_ptr + 4 * i + 3, w3.to(tl.uint32).to(tl.int64), mask=ok)


@triton.jit
def _bits16_probe(x_ptr, out_ptr, N, dt, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < N
    x = tl.load(x_ptr + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, T._f32_to_bits16(x, dt).to(tl.int32), mask=ok)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def philox_words(blocks: torch.Tensor, key64: int, tkey: int, stream: int) -> torch.Tensor:
    """(n, 4) int64 words of triton_ops' Philox for int64 block indices ``blocks``."""
    out = torch.zeros(blocks.numel() * 4, dtype=torch.int64)
    _philox_probe[(1,)](blocks, out, key64 & 0xFFFFFFFF, key64 >> 32, tkey, blocks.numel(),
                        STREAM=stream, BLOCK=_block(blocks.numel()))
    return out.view(-1, 4)


def randint4x(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """(n, 4) int64 words of Triton's own ``tl.randint4x(seed, offsets)``."""
    out = torch.zeros(offsets.numel() * 4, dtype=torch.int64)
    _randint4x_probe[(1,)](offsets, out, seed, offsets.numel(), BLOCK=_block(offsets.numel()))
    return out.view(-1, 4)


def f32_to_bits16(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' fp32 -> fp16/bf16 RNE conversion, as the dtype."""
    out = torch.zeros(x.numel(), dtype=torch.int32)
    dt = {torch.float16: 1, torch.bfloat16: 2}[dtype]
    _bits16_probe[(1,)](x, out, x.numel(), dt, BLOCK=_block(x.numel()))
    return out.to(torch.int16).view(dtype)
