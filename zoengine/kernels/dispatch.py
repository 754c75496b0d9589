"""Choose the implementation of the ZO ops for a set of tensors.

``None``/``"auto"`` picks by the tensors' device (triton is importable on CPU-only Linux
machines, so importability says nothing); an explicit choice that cannot run raises and says
why, never falls back. ``ZOENGINE_BACKEND`` overrides ``None``/``"auto"``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "native", "triton")
_MODULES = {
    "reference": "zoengine.kernels.reference",  # pure PyTorch: the oracle, runs anywhere
    "native": "zoengine.kernels.native_ops",  # compiled C for CPU tensors (built on first use)
    "triton": "zoengine.kernels.triton_ops",  # CUDA tensors, or CPU under TRITON_INTERPRET=1
}


def _triton_problem(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the Triton backend cannot run on these tensors, or None if it can."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    devices = sorted({t.device.type for t in tensors})
    if not interpreting and devices != ["cuda"]:
        return f"it needs CUDA tensors (or TRITON_INTERPRET=1); got devices {devices}"
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    if importlib.util.find_spec(_MODULES["triton"]) is None:
        return "this zoengine build has no Triton kernels (zoengine/kernels/triton_ops.py)"
    return None


def resolve_backend(requested: str | None, tensors: Sequence[torch.Tensor]) -> str:
    """Return ``"reference"``, ``"native"`` or ``"triton"`` for ``requested`` on ``tensors``."""
    if requested is None or requested == "auto":
        requested = os.environ.get("ZOENGINE_BACKEND", "auto") or "auto"
        source = "ZOENGINE_BACKEND" if requested != "auto" else "backend"
    else:
        source = "backend"
    if requested not in BACKENDS:
        raise ValueError(f"{source}={requested!r}: must be one of {BACKENDS} (or None)")
    if requested == "reference":
        return "reference"
    if requested == "native":
        problem = _native_problem(tensors)
        if problem:
            raise RuntimeError(f"{source}='native' cannot run: {problem}")
        return "native"
    problem = _triton_problem(tensors)
    if requested == "triton":
        if problem:
            raise RuntimeError(f"{source}='triton' cannot run: {problem}")
        return "triton"
    # auto: Triton only for CUDA tensors; the interpreter is opt-in (~1e6 elements/s on CPU).
    on_cuda = bool(tensors) and all(t.device.type == "cuda" for t in tensors)
    if on_cuda and problem is None:  # unverified until its first-use self-test passes here
        from zoengine.kernels.triton_selftest import auto_cuda_choice

        return auto_cuda_choice(tensors)  # "triton", or "reference" + TritonSelfTestWarning
    return "native" if _native_problem(tensors) is None else "reference"


def _native_problem(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the compiled CPU backend cannot run on these tensors, or None if it can."""
    devices = sorted({t.device.type for t in tensors})
    if devices != ["cpu"]:
        return f"it needs CPU tensors; got devices {devices}"
    if importlib.util.find_spec(_MODULES["native"]) is None:
        return "this zoengine build has no native CPU kernels (zoengine/kernels/native_ops.py)"
    from zoengine.kernels import native_ops  # builds or loads the shared library once

    return native_ops.unavailable_reason(tensors)


def get_ops(backend: str) -> ModuleType:
    """The module holding ``perturb_`` and ``restore_update_`` for a resolved backend name."""
    return importlib.import_module(_MODULES[backend])
