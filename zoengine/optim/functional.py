"""The math of a ZO step, free of optimizer bookkeeping (as ``torch.optim.sgd`` is to ``SGD``).

A step perturbs every group jointly, so the functional form takes all groups at once:
``ZOGroup`` carries one group's tensors, their noise keys and its hyper-parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass
class ZOGroup:
    """One parameter group as the kernels see it."""

    params: list[torch.Tensor]
    keys: list[int]
    lr: float
    eps: float
    weight_decay: float = 0.0
    masks: list[torch.Tensor | None] | None = None


@dataclass
class StepResult:
    """What a step measured: the loss (mean of all evaluations), the per-sample half
    differences (ℓ₊ − ℓ₋)/2, every loss value, and whether the step was skipped."""

    loss: float
    half_diffs: list[float]
    losses: list[float]
    skipped: bool = False


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or inf; the weights were restored before this was raised."""


def loss_value(out, where: str) -> float:
    """The closure's output as a Python float, or a ValueError that says what was wrong."""
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise ValueError(
                f"closure returned a tensor of shape {tuple(out.shape)} at {where}; "
                "it must return the scalar loss (one element)")
        return float(out.detach().reshape(()).item())
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        return float(out)
    raise ValueError(f"closure returned {type(out).__name__} at {where}; it must return the "
                     "scalar loss as a tensor or a float")


def _perturb(groups: Sequence[ZOGroup], ops: ModuleType, *, seed: int, step: int,
             sample: int, units: float, dist: str) -> None:
    for g in groups:
        ops.perturb_(g.params, g.keys, seed=seed, step=step, sample=sample,
                     scale=units * g.eps, dist=dist, masks=g.masks)


def _unit(k: int) -> float:
    return 1.0


def _identity(k: int, g: float) -> float:
    return g


def zo_step(
    groups: Sequence[ZOGroup],
    closure: Callable[[], torch.Tensor | float],
    ops: ModuleType,
    *,
    seed: int,
    step: int,
    n_samples: int = 1,
    dist: str = "normal",
    nonfinite: str = "raise",
    radius: Callable[[int], float] = _unit,
    project: Callable[[int, float], float] = _identity,
    stochastic_rounding: bool = False,
) -> StepResult:
    """One two-point ZO step with n samples, in place.

    For each sample k, with r_k = ``radius(k)`` (1 for MeZO; KerZOO's scalar r):
    θ ← θ + ε r_k z_k, ℓ₊ = closure(); θ ← θ − 2ε r_k z_k, ℓ₋ = closure();
    g_k = ``project(k, (ℓ₊ − ℓ₋)/(2ε))`` (identity for MeZO; KerZOO: ·K(r_k), clipped).
    Then, in one pass, restore the last sample and apply θ ← θ − lr·(1/n·Σ_k g_k z_k + wd·θ).
    Earlier samples are restored by a plain pass. Only scalars survive between passes: no z,
    no copy of θ, no gradient buffer. ``ops`` provides ``perturb_``/``restore_update_``
    (a kernels backend, or a reuse source for PeZO). ``stochastic_rounding`` rounds the
    update of fp16/bf16 weights stochastically (Philox stream word 1), so updates smaller than
    half an ulp survive on average.

    If the closure raises, the perturbation in place is undone before the exception
    propagates. A NaN/inf loss restores the weights, then raises ``NonFiniteLossError``
    (``nonfinite="raise"``) or returns a skipped result (``nonfinite="skip"``).
    """
    half_diffs: list[float] = []
    losses: list[float] = []
    radii = [radius(k) for k in range(n_samples)]
    applied: tuple[int, float] | None = None  # (sample, units of ε) now written in the weights
    try:
        for k in range(n_samples):
            rk = radii[k]
            _perturb(groups, ops, seed=seed, step=step, sample=k, units=rk, dist=dist)
            applied = (k, rk)
            lp = loss_value(closure(), f"θ+εz (sample {k})")
            _perturb(groups, ops, seed=seed, step=step, sample=k, units=-2.0 * rk, dist=dist)
            applied = (k, -rk)
            lm = loss_value(closure(), f"θ−εz (sample {k})")
            losses += [lp, lm]
            if not (math.isfinite(lp) and math.isfinite(lm)):
                raise NonFiniteLossError(
                    f"closure returned a non-finite loss at step {step}, sample {k}: "
                    f"ℓ₊={lp}, ℓ₋={lm}; weights restored")
            half_diffs.append((lp - lm) / 2.0)
            if k < n_samples - 1:
                _perturb(groups, ops, seed=seed, step=step, sample=k, units=rk, dist=dist)
                applied = None
    except BaseException as exc:
        if applied is not None:
            k, units = applied
            _perturb(groups, ops, seed=seed, step=step, sample=k, units=-units, dist=dist)
        if isinstance(exc, NonFiniteLossError) and nonfinite == "skip":
            return StepResult(loss=float("nan"), half_diffs=[], losses=losses, skipped=True)
        raise
    last = n_samples - 1
    for g in groups:
        grads = [project(k, d / g.eps) / n_samples for k, d in enumerate(half_diffs)]
        ops.restore_update_(g.params, g.keys, seed=seed, step=step, eps=g.eps * radii[last],
                            lr=g.lr,
                            grads=grads, restore_sample=n_samples - 1,
                            weight_decay=g.weight_decay, dist=dist, masks=g.masks,
                            **({"stochastic_rounding": True} if stochastic_rounding else {}))
    return StepResult(loss=sum(losses) / len(losses), half_diffs=half_diffs, losses=losses)


mezo_step = zo_step  # MeZO is the two-point step with r = 1 and the identity projection
