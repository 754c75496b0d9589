"""Host side of the multi-tensor Triton launch of zoengine/kernels/triton_ops.py: argument checks, uint8
mask views, launch geometry and the pointer table each program reads its tensor from.

Nothing here is ``@triton.jit``, so this module means the same with or without
``TRITON_INTERPRET``; where the two differ the caller says which kind its kernels are
(``interpreted``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

__all__ = ["DTYPE_CODE", "block_size", "build_table", "check_tensors", "launch_options",
           "table_ident", "uint8_masks"]

# Table row 5 (triton_ops._ROW_DTYPE): how the kernels read and write each tensor.
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# GPU: 1024 elements per program (256 Philox calls), 4 warps -- a common elementwise choice,
# not yet tuned on a device. Interpreter: one program per tensor up to 64Ki elements, because
# its cost is mostly per program (offline.md §3: 1e5 elements take 1.0 s at BLOCK 1024 and
# 0.04 s at 65536).
_GPU_BLOCK = 1024
_GPU_WARPS = 4
_INTERP_MAX_BLOCK = 1 << 16
_INTERP_MIN_BLOCK = 64


def block_size(params: Sequence[torch.Tensor], interpreted: bool) -> int:
    """Elements per program."""
    if not interpreted:
        return _GPU_BLOCK
    largest = max(p.numel() for p in params)
    return max(_INTERP_MIN_BLOCK, min(_INTERP_MAX_BLOCK, triton.next_power_of_2(largest)))


def launch_options(interpreted: bool) -> dict:
    # fp fusion off: p + s*z must round twice, as in the eager reference (style.md §2.3).
    return {} if interpreted else {"enable_fp_fusion": False, "num_warps": _GPU_WARPS}


def uint8_masks(params, masks) -> list[torch.Tensor | None]:
    """Masks as uint8 views (bool masks: no copy; others: ``m != 0``, a 0/1 copy per call)."""
    out: list[torch.Tensor | None] = []
    for i, p in enumerate(params):
        m = None if masks is None else masks[i]
        if m is not None:
            if m.numel() != p.numel():
                raise ValueError(f"masks[{i}] has {m.numel()} elements for a tensor of "
                                 f"{p.numel()}")
            if m.device != p.device:
                raise ValueError(f"masks[{i}] is on {m.device}, its tensor on {p.device}")
            m = m.reshape(-1)
            m = m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
            m = m.contiguous()
        out.append(m)
    return out


def check_tensors(params: Sequence[torch.Tensor], interpreted: bool) -> None:
    """One device, a supported dtype, and the device kind the kernels can reach."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"all tensors of one call must share a device; got {sorted(map(str, devices))}")
    for i, p in enumerate(params):
        if p.dtype not in DTYPE_CODE:
            raise ValueError(f"params[{i}] has dtype {p.dtype}; the Triton kernels take "
                             "float32, float16 and bfloat16 (float64 goes to the reference "
                             "ops)")
    device = next(iter(devices))
    if interpreted and device.type != "cpu":
        raise RuntimeError(
            f"zoengine.kernels.triton_ops was imported under TRITON_INTERPRET=1, so its kernels "
            f"run in the interpreter, which reaches tensors through host addresses; got "
            f"{device} tensors. Unset TRITON_INTERPRET (before import) to launch on the GPU.")
    if not interpreted and device.type != "cuda":
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device}); for CPU tensors set "
            "TRITON_INTERPRET=1 before importing zoengine.kernels.triton_ops, or use the "
            "reference backend")


def table_ident(params, keys, masks8, block: int) -> tuple:
    """What a table depends on: block size, device, and each non-empty tensor's address, size,
    dtype, key and mask address (the cache key of ``build_table``)."""
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    return (block, params[0].device, tuple(
        (params[i].data_ptr(), params[i].numel(), params[i].dtype, int(keys[i]),
         0 if masks8[i] is None else masks8[i].data_ptr()) for i in live))


def build_table(params, keys, masks8, block: int):
    """(table int64[6, T], program -> tensor int32[P], P) for the non-empty tensors.

    Table rows, in triton_ops' ``_ROW_*`` order: address, numel, 32-bit key, first program id,
    mask address (0 = none), dtype code.
    """
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    rows = [[], [], [], [], [], []]
    programs, first = [], 0
    for i in live:
        p, m = params[i], masks8[i]
        nprog = triton.cdiv(p.numel(), block)
        for row, value in zip(rows, (p.data_ptr(), p.numel(), int(keys[i]) & 0xFFFFFFFF, first,
                                     0 if m is None else m.data_ptr(), DTYPE_CODE[p.dtype]), strict=True):
            row.append(value)
        programs.append(nprog)
        first += nprog
    device = params[0].device
    tab = torch.tensor(rows, dtype=torch.int64, device=device)
    prog = torch.repeat_interleave(torch.arange(len(live), dtype=torch.int32),
                                   torch.tensor(programs, dtype=torch.int64)).to(device)
    return tab, prog, first


def split_wide(params, keys, masks):
    """(triton part, float64 part) of (params, keys, masks): the kernels compute in fp32, so
    float64 tensors go to the reference ops (pure PyTorch, fp64 arithmetic, runs on CUDA);
    z is the same stream either way (the noise contract)."""
    narrow: tuple[list, list, list] = ([], [], [])
    wide: tuple[list, list, list] = ([], [], [])
    for i, (p, k) in enumerate(zip(params, keys)):
        side = wide if p.dtype == torch.float64 else narrow
        side[0].append(p)
        side[1].append(k)
        side[2].append(None if masks is None else masks[i])
    return narrow, wide
