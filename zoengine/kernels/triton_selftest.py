"""First-use self-test of the Triton kernels, for ``backend="auto"`` on CUDA.

Until a real-GPU run has passed, auto dispatch must not silently pick an unverified path: the
first time auto would choose Triton for a device, ``triton_verified(device)`` runs
``triton_ops.perturb_`` and ``restore_update_`` on six small tensors on that device and compares
them with the reference ops on clones (docs/backends.md, "First-use self-test on CUDA"). If
anything differs or raises, auto dispatch warns (``TritonSelfTestWarning``) and uses the
reference backend. The outcome is cached per (process, device). An explicit
``backend="triton"`` is never self-tested. ``ZOENGINE_TRITON_SELFTEST=0`` skips the test.

What runs: tensors of 1,031 (two GPU programs) and 3 x 37 elements in fp32, fp16 and bf16
(6 tensors, one launch per op), one with a bool mask; for each dist: ``perturb_`` (scale
1e-2), then ``restore_update_`` with n = 2 samples, restore_sample 0, weight decay 0.1 and, for
uniform and rademacher, stochastic rounding. Tolerances are tests/test_triton_ops.py's:
uniform and rademacher bit-exact, normal within one ulp of the dtype + |scale|·2e-6.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence

import torch

__all__ = ["TritonSelfTestWarning", "auto_cuda_choice", "clear_cache", "triton_verified"]

ENV_VAR = "ZOENGINE_TRITON_SELFTEST"
Z_ATOL = 2e-6  # |z_triton - z_reference| for normal noise (tests/test_triton_ops.py)
_SHAPES = [(1031,), (3, 37)]
_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_KEYS = [0x0, 0x12345678, 0xFFFFFFFF, 0x9E3779B9, 7, 0x50A09EB9]
_PERTURB = dict(seed=3, step=5, sample=1, scale=1e-2)
_UPDATE = dict(seed=3, step=5, eps=1e-2, lr=1e-2, grads=[0.75, -2.0], restore_sample=0,
               weight_decay=0.1)

_RESULTS: dict[str, tuple[bool, str]] = {}
_WARNED: set[str] = set()
_LOCK = threading.Lock()


class TritonSelfTestWarning(UserWarning):
    """The Triton kernels failed their first-use self-test; auto dispatch uses the reference."""


def clear_cache() -> None:
    """Forget the cached outcomes (and which devices were warned about): for tests."""
    with _LOCK:
        _RESULTS.clear()
        _WARNED.clear()


def _device_id(device) -> str:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


def _tensors(device):
    g = torch.Generator().manual_seed(0)
    ps, masks = [], []
    for dtype in _DTYPES:
        for shape in _SHAPES:
            ps.append((torch.randn(shape, generator=g) * 0.5).to(dtype))
            masks.append(None)
    masks[3] = torch.rand(_SHAPES[1], generator=g) > 0.5  # fp16 (3, 37): a bool mask
    ps[3].mul_(masks[3].to(ps[3].dtype))  # pruned weights are exactly zero
    return ([p.to(device) for p in ps], [None if m is None else m.to(device) for m in masks])


def _mismatch(got, want, dist: str, scale: float, what: str) -> str | None:
    """None if every tensor agrees within the tolerance, else a description of the first miss."""
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if dist != "normal":
            bad = a.reshape(-1) != b.reshape(-1)  # as torch.equal: bit-exact up to -0 == 0
        else:
            b32 = b.float().reshape(-1)
            up = torch.nextafter(b.abs(), torch.full_like(b, float("inf"))).float().reshape(-1)
            tol = (up - b32.abs()) + abs(scale) * Z_ATOL  # one ulp of the dtype + the z error
            bad = ~((a.float().reshape(-1) - b32).abs() <= tol)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            return (f"{what} dist={dist}: tensor {i} ({a.dtype}, {tuple(a.shape)}) differs "
                    f"from the reference at {int(bad.sum())} of {a.numel()} elements (first: "
                    f"element {j}, triton {a.reshape(-1)[j].item()!r} vs reference "
                    f"{b.reshape(-1)[j].item()!r})")
    return None


def _run_checks(T, R, device) -> str | None:
    """Run the ops on ``device``; None if all agree, else what failed."""
    for dist in ("normal", "uniform", "rademacher"):
        ps, masks = _tensors(device)
        qs = [p.clone() for p in ps]
        T.perturb_(ps, _KEYS, dist=dist, masks=masks, **_PERTURB)
        R.perturb_(qs, _KEYS, dist=dist, masks=masks, **_PERTURB)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous fault surfaces here
        miss = _mismatch(ps, qs, dist, _PERTURB["scale"], "perturb_")
        if miss:
            return miss
        sr = dist != "normal"
        T.restore_update_(ps, _KEYS, dist=dist, masks=masks, stochastic_rounding=sr, **_UPDATE)
        R.restore_update_(qs, _KEYS, dist=dist, masks=masks, stochastic_rounding=sr, **_UPDATE)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        scale = _UPDATE["eps"] + _UPDATE["lr"] * sum(abs(g) for g in _UPDATE["grads"])
        miss = _mismatch(ps, qs, dist, scale, f"restore_update_(n=2, sr={sr})")
        if miss:
            return miss
    return None


def _self_test(device: torch.device) -> tuple[bool, str]:
    try:
        from zoengine.kernels import reference as R
        from zoengine.kernels import triton_ops as T

        if device.type == "cpu" and not T.is_interpreted():
            return False, ("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set "
                           "before zoengine.kernels.triton_ops is imported)")
        miss = _run_checks(T, R, device)
    except Exception as exc:  # noqa: BLE001 -- any failure (compile, launch, illegal access)
        return False, f"{type(exc).__name__}: {str(exc)[:300]}"
    if miss:
        return False, miss
    return True, (f"perturb_ and restore_update_ matched the reference on {device} "
                  "(fp32/fp16/bf16, mask, n=2, stochastic rounding; 3 dists)")


def triton_verified(device) -> tuple[bool, str]:
    """(passed, reason) of the Triton kernels' self-test on ``device``, run once per process
    and device. CPU devices are accepted when triton_ops runs under the interpreter.
    ``ZOENGINE_TRITON_SELFTEST=0`` returns (True, ...) without running anything."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return True, f"self-test skipped ({ENV_VAR}=0)"
    ident = _device_id(device)
    with _LOCK:
        hit = _RESULTS.get(ident)
        if hit is None:
            hit = _RESULTS[ident] = _self_test(torch.device(ident))
    return hit


def auto_cuda_choice(tensors: Sequence[torch.Tensor]) -> str:
    """Auto dispatch on CUDA tensors: ``"triton"`` if the self-test passed on each of their
    devices, else ``"reference"`` with one ``TritonSelfTestWarning`` per device and process."""
    for ident in sorted({_device_id(t.device) for t in tensors}):
        ok, why = triton_verified(ident)
        if ok:
            continue
        with _LOCK:
            first = ident not in _WARNED
            _WARNED.add(ident)
        if first:
            warnings.warn(TritonSelfTestWarning(
                f"the Triton kernels failed their first-use self-test on {ident}: {why}. "
                f"backend='auto' uses the 'reference' backend (slower, same numbers); "
                f"backend='triton' forces the kernels, {ENV_VAR}=0 skips the test"),
                stacklevel=3)
        return "reference"
    return "triton"
