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

__all__ = ["CHUNK", "MODELS", "WINDOW", "llama_numels", "model_numels", "pool_stride",
           "rng_budget"]

CHUNK = 1 << 16  # elements per request of the reuse ops (zoengine/kernels/reuse.py CHUNK_ELEMENTS)
WINDOW = 1 << 14  # adaptive-scaling window of the rotate source (RotateSource.window)
NOISES = ("normal", "uniform", "rademacher", "pool", "rotate")

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


def llama_numels(vocab: int, hidden: int, intermediate: int, layers: int, heads: int,
                 kv_heads: int, tie: bool, **_) -> list[int]:
    """Tensor sizes of a LlamaForCausalLM in ``parameters()`` order: embedding; per layer
    q, k, v, o, gate, up, down, input and post-attention norms; final norm; lm_head if untied."""
    kv = hidden // heads * kv_heads
    layer = [hidden * hidden, hidden * kv, hidden * kv, hidden * hidden,
             hidden * intermediate, hidden * intermediate, intermediate * hidden, hidden, hidden]
    out = [vocab * hidden] + layer * layers + [hidden]
    return out if tie else out + [vocab * hidden]


def model_numels(name: str) -> list[int]:
    """Tensor sizes of a named model (``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"model={name!r}: must be one of {tuple(MODELS)}")
    return llama_numels(**MODELS[name])


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
               method: str = "ZO") -> dict:
    """The keys of ``ZO.rng_budget()`` for tensors of ``numels`` (optimizer order) and ZO's
    options (PeZO's ``reuse="pool"|"rotate"`` is ``noise="pool"|"rotate"``)."""
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
    return {"method": method, "noise": noise, "estimator": estimator, "d": d,
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
