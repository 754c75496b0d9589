"""``opt.step_batched(closure)``: the 2n evaluations of a step in one forward (docs/lowrank.md).

The closure takes the number of perturbation groups G = 2n and returns G losses, evaluating a
batch repeated G times along its first dimension (``tile_batch``); rows of group j see
θ + c_j·z_{k_j} (``optim/population.py``). To the step (``functional.zo_step``) the G losses
look like the 2n calls of a one-group closure, in the same order, so the update, the journal,
replay, resume and the distributed loss exchange are those of ``opt.step``. Pays with
low-rank noise (one product x·Wᵀ for every group, plus a rank-r term per group); any other
noise is evaluated correctly, one perturbed copy per group and module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from zoengine.optim.population import BatchedEvaluationError, grouped, population_of

# The first batched step is compared with G one-group forwards. Both evaluate the same points;
# they differ by the rounding of the forward (other product shapes, the bias added after the
# product): relative ~1e-6 of each loss in fp32, while the half differences (ℓ₊ − ℓ₋)/2 they
# yield are ε·|gᵀz| ~ 1e-4..1e-2 of the loss at ε = 1e-3. Rows given the wrong perturbation
# make the half differences disagree by their own size. Agreement within a quarter of their norm
# (plus 64 ulps of the loss, when ε is so small that the differences are rounding themselves)
# separates the two by an order of magnitude each side, as the virtual probe's 0.25 does.
CHECK_TOLERANCE = 0.25


class BatchedEvaluations:
    """The closure ``zo_step`` calls: its first call runs the batched forward, each call
    returns the next of the G losses; a call beyond G (an update rule's evaluation at θ) runs
    one group."""

    def __init__(self, opt, batched: Callable[[int], object], check: bool):
        self.opt, self.batched, self.check = opt, batched, check
        self.groups = self.radii = None
        self.values: list | None = None
        self.calls = 0

    def bind(self, groups, radius: Callable[[int], float]) -> None:
        """The step's ZOGroups and radii (deterministic per (step, sample): KerZOO's r_k)."""
        self.groups = groups
        self.radii = [radius(k) for k in range(self.opt.n_samples)]

    def __call__(self):
        if self.values is None:
            self.values = self._evaluate()
        i, self.calls = self.calls, self.calls + 1
        if i < len(self.values):
            return self.values[i]
        return _losses(self.batched(1), 1)[0]

    def _evaluate(self) -> list:
        virtual = self.opt._virtual
        pop = population_of(virtual, self.groups, self.radii)
        with grouped(virtual, pop):
            values = _losses(self.batched(pop.groups), pop.groups)
        if self.check:
            compare_one_group(virtual, pop, self.batched, values)
            virtual.batched_checked = True
        return values


def _losses(out, groups: int) -> list:
    """The closure's G losses as 0-dim tensors (or floats), or a ValueError saying why not."""
    if isinstance(out, torch.Tensor):
        if out.numel() != groups:
            raise ValueError(f"step_batched: the closure returned shape {tuple(out.shape)} for "
                             f"groups={groups}; it must return one loss per group ({groups} "
                             "values, group j = rows [j·B, (j+1)·B) of the tiled batch)")
        return list(out.detach().reshape(groups).unbind(0))
    if isinstance(out, list | tuple) and len(out) == groups:
        return list(out)
    raise ValueError(f"step_batched: the closure returned {type(out).__name__} for "
                     f"groups={groups}; it must return a tensor of {groups} losses")


def compare_one_group(virtual, pop, batched, values: list) -> None:
    """Evaluate each group alone (the one-group forward of ``opt.step``) and raise
    ``BatchedEvaluationError`` when the batched half differences disagree (CHECK_TOLERANCE)."""
    alone = []
    for j in range(pop.groups):
        virtual.population = pop  # without grouped()'s overrides: the hooks of opt.step
        try:
            with pop.one(j):
                alone.append(float(_losses(batched(1), 1)[0]))
        finally:
            virtual.population = None
    mine = [float(v) for v in values]
    half_b = [(mine[i] - mine[i + 1]) / 2 for i in range(0, len(mine), 2)]
    half_a = [(alone[i] - alone[i + 1]) / 2 for i in range(0, len(alone), 2)]
    gap = math.dist(half_b, half_a)
    floor = 64 * _unit_roundoff(values[0]) * max(abs(v) for v in alone)
    if not gap <= CHECK_TOLERANCE * math.hypot(*half_a) + floor:
        raise BatchedEvaluationError(
            f"step_batched: the batched forward disagrees with one forward per perturbation "
            f"(half differences {_fmt(half_b)} against {_fmt(half_a)}): this model mixes rows "
            "of different groups (a module whose first dimension is not the batch, or one "
            "that couples rows); use opt.step(closure) for it. The weights were not changed")


def _unit_roundoff(v) -> float:
    dtype = v.dtype if isinstance(v, torch.Tensor) and v.is_floating_point() else torch.float64
    return torch.finfo(dtype).eps / 2


def _fmt(xs) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"


def batched_refusal(cls) -> str | None:
    """Why optimizer class ``cls`` has no ``step_batched``, or None: a subclass replacing
    ``step`` or ``_zo_step`` runs evaluations other than the two-point loop's 2n (DiZO's γ
    search, FZOO's one-sided batch, HiZOO's three points, Sparse-MeZO's masks per step)."""
    if any(getattr(cls, a).__qualname__ != f"ZO.{a}" for a in ("step", "_zo_step")):
        return f"{cls.__name__} has a step of its own (not the two-point loop's 2n evaluations)"
    return None


class BatchedSteps:
    """``step_batched`` for ``optim.zo.ZO`` (a mixin; needs its ``_zo_step``, journal tap,
    virtual model and exchange)."""

    @torch.no_grad()
    def step_batched(self, closure: Callable[[int], object], *,
                     check: bool = True) -> torch.Tensor:
        """One step whose 2n loss evaluations run as one forward.

        ``closure(groups)`` evaluates its batch repeated ``groups`` times along the first
        dimension (``tile_batch``) and returns the ``groups`` losses, group j being rows
        [j·B, (j+1)·B) (``group_losses`` computes a causal LM's). The step calls it with
        groups = 2n (group 2k at θ + εr_k z_k, 2k + 1 at θ − εr_k z_k), and with groups = 1
        for the first step's virtual probe and an update rule's evaluation at θ. Needs
        ``attach_virtual(model)`` (rows see different weights, so none may be written). Same
        update, journal, replay and resume as :meth:`step`, whose closure is ``closure(1)``.

        ``check``: the first batched step also evaluates each group alone and refuses
        (``BatchedEvaluationError``, weights unchanged) when the two disagree, e.g. on a model
        whose modules do not keep the batch as their first dimension. Returns the mean of the
        2n losses, as :meth:`step`."""
        self._check_batched(closure, check)
        one = lambda: _losses(closure(1), 1)[0]  # noqa: E731 (the probe's one-group closure)
        self.probe_virtual(one)
        if self.inplace_fallback:
            raise BatchedEvaluationError(
                f"step_batched: {len(self.inplace_fallback)} tensor(s) are perturbed in place "
                f"(e.g. {self.inplace_fallback[0]!r}; opt.virtual_report() says why), which "
                "every group would see; use opt.step(closure)")
        evaluations = BatchedEvaluations(
            self, closure, check and not getattr(self._virtual, "batched_checked", False))
        return self._journaled_step(evaluations, batched=evaluations)

    def _check_batched(self, closure, check) -> None:
        refused = batched_refusal(type(self))
        if refused:
            raise ValueError(f"step_batched: {refused}; use opt.step(closure)")
        if not callable(closure):
            raise ValueError(f"step_batched(closure={closure!r}): must be a callable "
                             "closure(groups) returning one loss per group")
        if not isinstance(check, bool):
            raise ValueError(f"step_batched(check={check!r}): must be True or False")
        if self._virtual is None or self._virtual.replay:
            raise ValueError("step_batched: needs opt.attach_virtual(model): the groups of one "
                             "forward see different weights, so none may be written in place")
        if self._exchange is not None and self._exchange.mode != "losses":
            raise ValueError(f"step_batched with set_distributed({self._exchange.mode!r}): "
                             "every rank evaluates every group; use set_distributed('losses')")


def tile_batch(batch, groups: int):
    """``batch`` (a tensor, or a dict/list/tuple of them; other values kept) with every
    tensor repeated ``groups`` times along its first dimension: rows [j·B, (j+1)·B) are copy
    j, the layout ``step_batched`` expects."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"tile_batch(groups={groups!r}): must be an int >= 1")
    if isinstance(batch, torch.Tensor):
        return batch if groups == 1 else batch.repeat(groups, *([1] * (batch.dim() - 1)))
    if isinstance(batch, dict):
        return {k: tile_batch(v, groups) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(tile_batch(v, groups) for v in batch)
    return batch


def group_losses(logits: torch.Tensor, labels: torch.Tensor, groups: int, *,
                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Per group, the mean next-token cross-entropy of a causal LM over its rows (what
    transformers' ``model(**batch).loss`` is for that group's rows alone; labels are shifted
    here, as there), in fp32 (float64 logits stay float64): a tensor of ``groups`` losses.
    ``reduction="sum"``: the sums instead (transformers divides them by ``num_items_in_batch``
    under gradient accumulation)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"group_losses(reduction={reduction!r}): must be 'mean' or 'sum'")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"group_losses: logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)}: expected (N, T, vocab) and (N, T)")
    if logits.shape[0] % groups:
        raise ValueError(f"group_losses: {logits.shape[0]} rows are not {groups} equal groups")
    target = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    wide = torch.promote_types(logits.dtype, torch.float32)
    rows, sums = logits.shape[0] // groups, []
    for j in range(groups):  # one group's log-softmax at a time: 1/groups of the logits' size
        part = slice(j * rows, (j + 1) * rows)
        sums.append(F.cross_entropy(logits[part].to(wide).flatten(0, 1), target[part].flatten(),
                                    ignore_index=ignore_index, reduction="sum"))
    total = torch.stack(sums)
    if reduction == "sum":
        return total
    counted = (target != ignore_index).view(groups, -1)
    return total / counted.sum(1).clamp(min=1)
