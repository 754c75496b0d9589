"""An optimizer's ``rng_budget()`` from parameter counts, without torch or a model.

zoengine's optimizers count what one step generates (``ZO.rng_budget()`` /
``ZO.rng_accounting(numels)`` in zoengine/optim/zo.py, table in docs/methods/pezo.md). hwsim may
not import them (it is a numpy-only leaf), so ``rng_budget`` below restates the same counting
on a list of tensor sizes; tests/test_hwsim_budget.py checks it key by key against a real
optimizer's ``rng_budget()``. ``MODELS`` gives the tensor sizes of SmolLM2-135M and a
Llama-2-7B-sized model in ``model.parameters()`` order, so a 7B run is priced without
instantiating 27 GB of fp32 weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["CHUNK", "MODELS", "WINDOW", "llama_numels", "llama_shapes", "model_numels",
           "model_shapes", "pool_stride", "rng_budget"]

CHUNK = 1 << 16  # elements per request of the reuse ops (zoengine/kernels/reuse.py CHUNK_ELEMENTS)
WINDOW = 1 << 14  # adaptive-scaling window of the rotate source (RotateSource.window)
NOISES = ("normal", "uniform", "rademacher", "pool", "rotate", "lowrank")

# Llama-architecture configs (HF config.json fields); parameter order of LlamaForCausalLM.
MODELS = {
    "smollm2-135m": dict(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9,
                         kv_heads=3, tie=True,
                         source="HuggingFaceTB/SmolLM2-135M config.json (the embedded model; "
                                "134,515,008 parameters)"),
    "llama-7b": dict(vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32,
                     kv_heads=32, tie=False,
                     source="meta-llama/Llama-2-7b-hf config.json (6,738,415,616 parameters)"),
}


def llama_shapes(vocab: int, hidden: int, intermediate: int, layers: int, heads: int,
                 kv_heads: int, tie: bool, **_) -> list[tuple[int, ...]]:
    """Tensor shapes of a LlamaForCausalLM in ``parameters()`` order: embedding; per layer
    q, k, v, o, gate, up, down (out × in), input and post-attention norms; final norm;
    lm_head if untied."""
    kv = hidden // heads * kv_heads
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
             (intermediate, hidden), (intermediate, hidden), (hidden, intermediate),
             (hidden,), (hidden,)]
    out = [(vocab, hidden)] + layer * layers + [(hidden,)]
    return out if tie else out + [(vocab, hidden)]


def llama_numels(**config) -> list[int]:
    """Tensor sizes of a LlamaForCausalLM in ``parameters()`` order (``llama_shapes``)."""
    return [math.prod(s) for s in llama_shapes(**config)]


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Tensor shapes of a named model (``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"model={name!r}: must be one of {tuple(MODELS)}")
    return llama_shapes(**MODELS[name])


def model_numels(name: str) -> list[int]:
    """Tensor sizes of a named model (``MODELS``)."""
    return [math.prod(s) for s in model_shapes(name)]


def pool_stride(d: int, pool_size: int) -> int:
    """The pool pointer's advance per perturbation: the smallest s >= d coprime with N."""
    s = max(1, d)
    while math.gcd(s, pool_size) != 1:
        s += 1
    return s


def _philox_blocks(numel: int) -> int:
    return -(-numel // 4)


def _rotate_numbers(numels: Sequence[int], scaling: str) -> int:
    """Numbers one pass of the rotate source generates: d (static), or every WINDOW-number
    window each request (a CHUNK of one tensor, at its global offset) touches, whole."""
    if scaling == "static":
        return int(sum(numels))
    total, base = 0, 0
    for m in numels:
        s = np.arange(0, m, CHUNK, dtype=np.int64) + base
        e = np.minimum(s + CHUNK, base + m)
        total += int((-(-e // WINDOW) - s // WINDOW).sum()) * WINDOW
        base += m
    return total


def rng_budget(numels: Sequence[int], *, noise: str = "normal", n_samples: int = 1,
               lanes: int = 64, scaling: str = "adaptive", pool_size: int = 1 << 16,
               estimator: str = "spsa", kernel_order: int | None = 3,
               half_numels: Sequence[int] = (), stochastic_rounding: bool = False,
               method: str = "ZO", rank: int = 1, resample_every: int = 100,
               shapes: Sequence[tuple] | None = None) -> dict:
    """The keys of ``ZO.rng_budget()`` for tensors of ``numels`` (optimizer order) and ZO's
    options (PeZO's ``reuse="pool"|"rotate"`` is ``noise="pool"|"rotate"``); ``"lowrank"``
    needs the tensors' ``shapes`` (U: m·r per sample and step, V: n·r per ``resample_every``
    steps, per 2-D tensor; docs/lowrank.md)."""
    if noise not in NOISES:
        raise ValueError(f"noise={noise!r}: must be one of {NOISES}")
    if scaling not in ("adaptive", "static"):
        raise ValueError(f"scaling={scaling!r}: must be 'adaptive' or 'static'")
    n, d = int(n_samples), int(sum(numels))
    passes, pool = 4 * n - 1, noise == "pool"
    if noise == "rotate":
        numbers = _rotate_numbers(numels, scaling)
        blocks = numbers
    elif pool:
        numbers = blocks = 0
    else:
        blocks = sum(_philox_blocks(m) for m in numels)
        numbers = 4 * blocks
    rounding = sum(_philox_blocks(m) for m in half_numels) if stochastic_rounding else 0
    kernel = estimator == "kernel" and kernel_order is not None
    uses, generated = d * passes, numbers * passes
    out = {"method": method, "noise": noise, "estimator": estimator, "d": d,
           "n_samples": n, "stream_passes_per_step": passes, "numbers_used_per_step": uses,
           "numbers_generated_per_step": generated,
           "numbers_reused_per_step": max(0, uses - generated),
           "philox_blocks_per_step": blocks * passes + rounding + (n if kernel else 0),
           "rounding_numbers_per_step": 4 * rounding,
           "pool_size": pool_size if pool else None,
           "numbers_generated_once": pool_size if pool else 0,
           "philox_blocks_once": pool_size if pool else 0,
           "pool_stride": pool_stride(d, pool_size) if pool else None,
           "pool_period": pool_size if pool else None,
           "lanes": lanes if noise == "rotate" else None,
           "window": WINDOW if noise == "rotate" and scaling == "adaptive" else None,
           "scalars_per_step": n * (2 if estimator == "kernel" else 1)}
    if noise == "lowrank":
        if shapes is None or [math.prod(s) for s in shapes] != [int(m) for m in numels]:
            raise ValueError("noise='lowrank': shapes=[(m, n), ...] must give the shape of "
                             "each tensor of numels (the count depends on rows and columns)")
        out.update(_lowrank(shapes, n, passes, rounding + (n if kernel else 0), rank,
                            resample_every))
        out["numbers_reused_per_step"] = max(0, uses - out["numbers_generated_per_step"])
    return out


def _lowrank(shapes, n, passes, extra_blocks, r, every) -> dict:
    """U (m·r) per sample per step, V (n·r) per block of ``every`` steps for each 2-D tensor,
    whole Philox blocks; the other tensors' full-rank streams every pass."""
    bu = sum(_philox_blocks(s[0] * r) for s in shapes if len(s) == 2 and math.prod(s))
    bv = sum(_philox_blocks(s[1] * r) for s in shapes if len(s) == 2 and math.prod(s))
    bf = sum(_philox_blocks(math.prod(s)) for s in shapes if len(s) != 2 or not math.prod(s))
    prod = sum(math.prod(s) for s in shapes if len(s) == 2)
    return {"numbers_generated_per_step": 4 * (bf * passes + n * bu) + 4 * bv / every,
            "philox_blocks_per_step": bf * passes + n * bu + bv / every + extra_blocks,
            "rank": r, "resample_every": every, "lowrank_u_numbers_per_step": 4 * n * bu,
            "lowrank_v_numbers_per_block": 4 * bv, "full_rank_numbers_per_step": 4 * bf * passes,
            "lowrank_products_per_step": prod * passes}
