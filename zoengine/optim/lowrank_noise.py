"""``noise="lowrank"`` on ZO: its checks, its ops and its random-number count (docs/lowrank.md).

The numbers and the arithmetic live in ``zoengine.kernels.lowrank``; here ZO's options become
those ops. Defaults follow LOZO's released script (rank 1, V resampled every 100 steps).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from zoengine.kernels.lowrank import LowRankFactors, LowRankOps, lowrank_counts, z_max
from zoengine.kernels.philox import DISTRIBUTIONS
from zoengine.optim.arguments import check_int

LOWRANK = "lowrank"
CONTRACT_NOISES = DISTRIBUTIONS + (LOWRANK,)  # numbers of the noise contract (Philox streams)
LOWRANK_DEFAULTS = {"rank": 1, "resample_every": 100}


def check_lowrank(noise, rank, resample_every, backend) -> None:
    """``rank`` and ``resample_every`` are ints >= 1 (checked whatever the noise); low-rank
    noise runs on the reference arithmetic only (the compiled kernels draw full-rank z)."""
    check_int("rank", rank, low=1)
    check_int("resample_every", resample_every, low=1)
    if noise == LOWRANK and backend not in (None, "auto", "reference"):
        raise ValueError(f"backend={backend!r} with noise='lowrank': the native and Triton "
                         "kernels draw full-rank z; low-rank noise runs on PyTorch ops (rank-r "
                         "products); pass backend='reference' or None")


def lowrank_ops(opt, groups) -> LowRankOps:
    """The step's ops for ``opt`` (a ZO with ``noise="lowrank"``); its factors (the current U
    and V, a cache of contract numbers) persist on the optimizer between steps."""
    if any(g.offsets for g in groups):
        raise ValueError("noise='lowrank' cannot train sharded tensors (shard_offsets): U and "
                         "V span whole rows and columns of a weight")
    f = getattr(opt, "_lowrank_factors", None)
    if f is None or (f.rank, f.every) != (opt.rank, opt.resample_every):
        f = opt._lowrank_factors = LowRankFactors(opt.rank, opt.resample_every)
    return LowRankOps(f)


def lowrank_z_bound(rank: int) -> float:
    return z_max(rank)


def lowrank_rng(shapes: Sequence[tuple], passes: int, rounding: int, opts: dict) -> dict:
    """The low-rank keys of ``rng_budget()``: U (m·r a 2-D tensor) per sample per step, V (n·r)
    once per ``resample_every`` steps (amortised into the per-step counts), the other tensors'
    full-rank streams every pass; ``lowrank_products_per_step``: the rank-r products formed
    (r multiply-adds per element per pass over a 2-D tensor, in place)."""
    if shapes is None:
        raise ValueError("noise='lowrank': the count needs the tensor shapes (shapes=[(m, n), "
                         "...]); the numbers depend on each matrix's rows and columns")
    n, r, every = opts["n_samples"], opts["rank"], opts["resample_every"]
    c = lowrank_counts(shapes, r)
    kernel = opts["estimator"] == "kernel" and opts["kernel_order"] is not None
    generated = c["full"] * passes + n * c["u"] + c["v"] / every
    blocks = c["blocks_full"] * passes + n * c["blocks_u"] + c["blocks_v"] / every
    return {"numbers_generated_per_step": generated,
            "philox_blocks_per_step": blocks + (rounding + (n if kernel else 0)),
            "rank": r, "resample_every": every,
            "lowrank_u_numbers_per_step": n * c["u"],
            "lowrank_v_numbers_per_block": c["v"],
            "full_rank_numbers_per_step": c["full"] * passes,
            "lowrank_products_per_step": c["product_elements"] * passes}


# ---- virtual perturbation: x·(W + c·U·Vᵀ/√r)ᵀ = x·Wᵀ + c·(x·V_s)·Uᵀ -------------------------
def is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` itself (GPT-2's projections: weight stored in × out, forward
    x·W + b); a subclass may compute something else."""
    t = type(module)
    return t.__name__ == "Conv1D" and t.__module__ == "transformers.pytorch_utils"


def term(ops, module, x, w, key, **kw):
    """c·x·zᵀ of an ``nn.Linear`` weight, or c·x·z of a Conv1D one (stored transposed)."""
    return (ops.conv1d_term if is_conv1d(module) else ops.linear_term)(x, w, key, **kw)


def lowrank_reads(virtual, module) -> frozenset:
    """The ids of ``module``'s displaced weight when its forward adds the perturbation as a
    rank-r term instead of reading a perturbed copy: an exact ``nn.Linear`` or ``Conv1D``
    (the forward zoengine overrides), low-rank ops, an unmasked, unsharded weight, and
    ``ZOENGINE_VIRTUAL_LINEAR`` left at ``"fused"`` (``"copy"`` materialises, for benchmarks)."""
    if not virtual.displaced or virtual.internal or virtual.context is None \
            or not isinstance(virtual.context[0], LowRankOps) \
            or getattr(vars(module).get("forward"), "func", None) != virtual._linear_forward \
            or os.environ.get("ZOENGINE_VIRTUAL_LINEAR", "fused") != "fused":
        return frozenset()
    w = module._parameters.get("weight")
    d = None if w is None else virtual.displaced.get(id(w))
    if d is None or d.mask is not None or d.offset or w.dim() != 2:
        return frozenset()
    return frozenset({id(w)})


def lowrank_forward(virtual, module, original, x):
    """``module``'s output at W + Σ_k c_k·z_k via rank-r terms, or None when
    ``lowrank_reads`` says no (the caller then runs the forward on a perturbed copy). The
    pre-hook left W in place and swapped a displaced bias, so ``original(x)`` is x·Wᵀ + b'."""
    if not lowrank_reads(virtual, module):
        return None
    w = module._parameters["weight"]
    d = virtual.displaced[id(w)]
    ops, seed, step, _ = virtual.context
    out = original(x)
    virtual.consumed.add(id(w))
    with virtual.inside():
        for k, c in virtual.scales_of(id(w)).items():
            out = out + term(ops, module, x, w, d.key, seed=seed, step=step, sample=k,
                             scale=c).to(out.dtype)
    return out
