"""What one step of a ZO method generates, counted as the software does it (read by hwsim)."""

from __future__ import annotations

from collections.abc import Sequence

from zoengine.kernels.philox import DISTRIBUTIONS
from zoengine.kernels.reference import philox_blocks
from zoengine.kernels.reuse import RotateSource, pass_cost, pool_stride
from zoengine.optim.lowrank_noise import lowrank_rng


def stream_passes(n: int, perturbation: str) -> int:
    """Passes over z per step: in place 4n − 1 (2n perturbations, n − 1 restores, the fused
    pass's n streams); virtual 3n (one per evaluation, the update's n; nothing restored)."""
    return 3 * n if perturbation == "virtual" else 4 * n - 1


def rng_count(numels: Sequence[int], half_numels: Sequence[int], opts: dict, *,
              method: str) -> dict:
    """The body of ``ZO.rng_accounting`` / ``rng_budget`` on ZO-level options."""
    n, noise, d = opts["n_samples"], opts["noise"], sum(numels)
    passes = stream_passes(n, opts.get("perturbation", "inplace"))
    pool = noise == "pool"
    if noise in DISTRIBUTIONS:
        blocks = sum(philox_blocks(m) for m in numels)
        numbers = 4 * blocks
    elif noise == "rotate":
        numbers, blocks = pass_cost(RotateSource(opts["lanes"], opts["scaling"]), numels)
    else:  # the pool is only read; a hardware model makes d numbers a pass, no Philox
        numbers, blocks = (0, 0) if pool else (d, 0)
    rounding = sum(philox_blocks(m) for m in half_numels) if opts["stochastic_rounding"] else 0
    kernel = opts["estimator"] == "kernel" and opts["kernel_order"] is not None
    uses, generated = d * passes, numbers * passes
    out = {"method": method, "noise": noise, "estimator": opts["estimator"], "d": d,
           "n_samples": n, "stream_passes_per_step": passes, "numbers_used_per_step": uses,
           "numbers_generated_per_step": generated,
           "numbers_reused_per_step": max(0, uses - generated),
           "philox_blocks_per_step": blocks * passes + rounding + (n if kernel else 0),
           "rounding_numbers_per_step": 4 * rounding,
           "pool_size": opts["pool_size"] if pool else None,
           "numbers_generated_once": opts["pool_size"] if pool else 0,
           "philox_blocks_once": opts["pool_size"] if pool else 0,
           "pool_stride": pool_stride(d, opts["pool_size"]) if pool else None,
           "pool_period": opts["pool_size"] if pool else None,
           "lanes": opts["lanes"] if noise == "rotate" else None,
           "window": (RotateSource(1, "adaptive").window
                      if noise == "rotate" and opts["scaling"] == "adaptive" else None),
           "scalars_per_step": n * (2 if opts["estimator"] == "kernel" else 1)}
    if noise == "lowrank":  # U per sample and step, V per block: not a pass of d numbers
        out.update(lowrank_rng(opts.get("shapes"), passes, rounding, opts))
        out["numbers_reused_per_step"] = max(0, uses - out["numbers_generated_per_step"])
    return out

