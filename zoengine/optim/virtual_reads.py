"""Where a parameter is *read*: torch-function modes used by virtual perturbation.

Two modes, both ``torch.overrides.TorchFunctionMode`` (they see every torch function and
tensor method a forward calls):

- :class:`EmbeddingReads`, active during an embedding's forward (``nn.Embedding`` or any
  subclass: Gemma's scaled embedding, OPT's learned positions): ``F.embedding(ids, θ, ...)``
  becomes the looked-up rows of θ + c·z (only those rows get noise), any other read of θ gets
  the whole perturbed table. So the substitution happens where the module reads its weight,
  whatever the subclass does with the result (scale it, shift the indices first).
- :class:`RawReads`, active during the probe forward (``VirtualModel.probe``): records every
  value read of a virtualised parameter that happens outside a forward that substitutes it
  (a parent reading ``child.weight``, a tied weight used by functional code). Such a tensor
  would be evaluated unperturbed, so the probe moves it to in-place perturbation.

Metadata reads (``.shape``, ``.dtype``, ``.device``, ``size()``...) are not value reads.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import noise_at
from zoengine.kernels.reference import compute_dtype

_PROPERTIES = ("dtype", "shape", "device", "ndim", "requires_grad", "is_cuda", "layout",
               "is_sparse", "is_quantized", "is_meta", "is_leaf", "grad_fn", "names",
               "is_nested", "itemsize", "nbytes", "is_mps", "is_xpu", "is_cpu")
_METHODS = ("size", "dim", "numel", "nelement", "element_size", "is_floating_point",
            "is_complex", "is_contiguous", "stride", "data_ptr", "get_device", "__len__",
            "storage_offset", "__hash__", "is_signed", "is_inference")


def _metadata() -> frozenset:
    out = set()
    for name in _PROPERTIES:
        attr = getattr(torch.Tensor, name, None)
        if attr is not None and hasattr(attr, "__get__"):
            out.add(attr.__get__)
    for name in _METHODS:
        attr = getattr(torch.Tensor, name, None)
        if attr is not None:
            out.add(attr)
    return frozenset(out)


METADATA = _metadata()
_EMBEDDING = inspect.signature(F.embedding)


def func_name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def reads(t: torch.Tensor, args, kwargs) -> bool:
    """True when ``t`` itself is among the arguments of a call."""
    return any(x is t for x in tree_leaves((args, kwargs)))


def substitute(t: torch.Tensor, w: torch.Tensor, args, kwargs):
    """``args``/``kwargs`` with every occurrence of ``t`` replaced by ``w``."""
    return tree_map(lambda x: w if x is t else x, (args, kwargs))


class EmbeddingReads(TorchFunctionMode):
    """Active during one embedding module's forward while its weight is displaced."""

    def __init__(self, virtual, weight: torch.Tensor):
        super().__init__()
        self.virtual, self.weight = virtual, weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        v, p = self.virtual, self.weight
        if v.internal or func in METADATA or not reads(p, args, kwargs):
            return func(*args, **kwargs)
        with v.inside():
            if func is F.embedding:
                bound = _EMBEDDING.bind(*args, **kwargs)
                a = bound.arguments
                if a.get("weight") is p and a.get("max_norm") is None:
                    if v.population is not None and v.population.active is None:
                        from zoengine.optim.population import grouped_embedding

                        return grouped_embedding(v, p, a, lambda b: embedding_rows(v, p, b))
                    return embedding_rows(v, p, a)
            # any other read (or max_norm, which renormalises the table in place): the whole
            # perturbed table for this call
            w = v.perturbed(p)
            args, kwargs = substitute(p, w, args, kwargs)
            return func(*args, **kwargs)


class RawReads(TorchFunctionMode):
    """Active during the probe forward: which virtualised tensors are read unsubstituted."""

    def __init__(self, virtual):
        super().__init__()
        self.virtual = virtual
        self.raw: dict[int, str] = {}  # id(tensor) -> the first function that read it raw

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        v = self.virtual
        if not v.internal and func not in METADATA:
            for x in tree_leaves((args, kwargs)):
                if isinstance(x, torch.Tensor) and v.owned_tensor(x) and not v.reading(x):
                    self.raw.setdefault(id(x), func_name(func))
        return func(*args, **kwargs)


def embedding_rows(v, p: torch.Tensor, a: dict) -> torch.Tensor:
    """``F.embedding`` with arguments ``a`` (weight ``p``) read from θ + c·z: only the
    looked-up rows get noise (z of those elements from the contract, or the low-rank ops'
    rows U[ids]·Vᵀ); another non-contract source (PeZO's pool/lanes, hardware models)
    defines z through its ops only, so the perturbed table is built whole."""
    d = v.displaced[id(p)]
    ops, seed, step, dist = v.context
    rows = getattr(ops, "embedding_rows", None)  # low-rank noise: U[ids]·Vᵀ, those rows only
    if not isinstance(ops, types.ModuleType) and rows is None:
        return F.embedding(**{**a, "weight": v._perturbed(p)})
    v.consumed.add(id(p))
    ids = a["input"]
    out = F.embedding(**a)
    index = ids.to(torch.int64).unsqueeze(-1) * p.shape[1] \
        + torch.arange(p.shape[1], device=ids.device) + d.offset
    mask = None if d.mask is None else d.mask().reshape(p.shape)[ids]
    ct = compute_dtype(p.dtype)
    out = out.to(ct)
    for k, c in v.scales_of(id(p)).items():
        z = (noise_at(index, key64=stream_key(seed, step, k), tensor_key=d.key, dist=dist)
             if rows is None else rows(ids, p, d.key, seed=seed, step=step, sample=k))
        z = z.to(device=out.device, dtype=ct)
        if mask is not None:
            z = z * mask
        out = (out + z * c).to(p.dtype).to(ct)  # rounded per sample, as perturb_ chains
    return out.to(p.dtype)
