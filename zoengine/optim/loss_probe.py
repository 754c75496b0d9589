"""Loss evaluations for steps that are not the two-point loop of ``functional.zo_step``.

FZOO (a centre evaluation and n one-sided ones) and HiZOO (a centre evaluation and a two-point
pair) walk the weights themselves; :class:`LossProbe` evaluates the closure for them the way
``zo_step`` does (the crash point, the closure's dtype and device, data-parallel loss
averaging), and :func:`restore_report` says whether undone weights are finite again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from zoengine.kernels.reference import philox_blocks
from zoengine.optim.functional import StepResult, ZOGroup, evaluate_into


class NonFiniteLoss(Exception):
    """Internal: a loss was NaN/inf (the caller undoes its perturbation, then decides)."""


def check_exchange(exchange, method: str) -> None:
    """Only ``set_distributed("losses")`` fits a method whose evaluations are not pairs."""
    if exchange is not None and exchange.mode != "losses":
        raise ValueError(f"set_distributed({exchange.mode!r}) with {method}: not supported "
                         "(its evaluations are not independent two-point samples to share out); "
                         "use set_distributed('losses') or True")


def refuse_update_rule(options: dict, method: str) -> None:
    """FZOO and HiZOO apply their own update (a normalised or preconditioned step): another
    update rule cannot be stacked on it."""
    update = options.get("update")
    if update not in (None, "sgd"):
        raise ValueError(f"update={update!r} with {method}: {method} applies its own update "
                         "rule; pass update='sgd' or leave it out")


class LossProbe:
    """Evaluates the closure, keeps every value (``losses``) and the closure's dtype/device."""

    def __init__(self, closure: Callable, exchange=None):
        self.closure, self.exchange = closure, exchange
        self.losses: list[float] = []
        self.like: tuple | None = None

    def evaluate(self, where: str, *, check: bool = True) -> float:
        value = evaluate_into(self, where)
        if check and not math.isfinite(value):
            raise NonFiniteLoss(f"closure returned a non-finite loss ({value}) at {where}")
        return value

    def result(self, grads: list, *, skipped: bool = False) -> StepResult:
        dtype, device = self.like or (torch.float64, torch.device("cpu"))
        loss = float("nan") if skipped else sum(self.losses) / len(self.losses)
        return StepResult(loss=loss, half_diffs=[], losses=self.losses, skipped=skipped,
                          grads=grads, dtype=dtype, device=device)


def restore_report(groups: Sequence[ZOGroup]) -> str:
    """"weights restored", or how many elements are NaN/inf after undoing a perturbation."""
    bad = sum(int((~torch.isfinite(p)).sum()) for g in groups for p in g.params)
    if bad == 0:
        return "weights restored"
    total = sum(p.numel() for g in groups for p in g.params)
    return (f"the weights are NOT restored: {bad} of {total} elements are NaN/inf after undoing "
            "the perturbation (ε·z overflowed the parameter dtype, or the weights were not "
            "finite before this step)")


def with_passes(counts: dict, numels: Sequence[int], passes: int) -> dict:
    """``counts`` (an ``rng_count`` result for fresh contract streams) recounted for a step that
    makes ``passes`` passes over z instead of the two-point loop's."""
    blocks = sum(philox_blocks(m) for m in numels)
    rounding = counts["rounding_numbers_per_step"] // 4
    d = counts["d"]
    out = dict(counts)
    out.update(stream_passes_per_step=passes, numbers_used_per_step=d * passes,
               numbers_generated_per_step=4 * blocks * passes,
               numbers_reused_per_step=max(0, d * passes - 4 * blocks * passes),
               philox_blocks_per_step=blocks * passes + rounding)
    return out
