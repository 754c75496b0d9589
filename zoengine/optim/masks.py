"""Sparsity masks as the optimizers hold them: one bit per weight.

A keep-mask is True where a weight lives and False where it was pruned (and is exactly 0).
Optimizers store it packed (``pack_mask``): 1/32 of an fp32 weight, 1/16 of a bf16 one, and
unpack one tensor's mask only while a kernel reads it (``LazyMask``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


_GATHER = 0x0102040810204080  # times 8 little-endian 0/1 bytes: bit j of the top byte = byte j


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A keep-mask as bits: uint8 of ceil(numel / 8) bytes, element i in bit i % 8 of byte i // 8."""
    flat = mask.reshape(-1).to(torch.bool)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if flat.storage_offset() % 8:
        flat = flat.clone()  # an int64 view needs 8-byte alignment
    if sys.byteorder != "little":
        return (flat.view(-1, 8).to(torch.uint8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)
    # one multiply gathers each 8-byte word's 0/1 bytes into its top byte: 4x faster than a
    # sum over a last dimension of 8 (0.08 vs 0.29 s for 10M elements on this CPU)
    words = flat.view(torch.uint8).view(torch.int64)
    return (((words * _GATHER) >> 56) & 0xFF).to(torch.uint8)


def unpack_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of ``pack_mask``: a bool tensor of ``shape``."""
    shape = torch.Size(shape)
    n = shape.numel()
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = (bits.to(torch.uint8).unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)[:n]
    return flat.view(torch.bool).view(shape)  # 0/1 bytes are valid bools: no copy


class LazyMask(Sequence):
    """A one-tensor ``masks`` list whose bool mask is unpacked from bits when a kernel reads it."""

    def __init__(self, bits: torch.Tensor, shape):
        self.bits, self.shape = bits, shape

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        if i not in (0, -1):
            raise IndexError(i)
        return unpack_mask(self.bits, self.shape)
