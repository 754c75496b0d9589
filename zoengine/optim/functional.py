"""The math of a ZO step, free of optimizer bookkeeping (as ``torch.optim.sgd`` is to ``SGD``).

A step perturbs every group jointly, so the functional form takes all groups at once:
``ZOGroup`` carries one group's tensors, their noise keys and its hyper-parameters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch

from zoengine.faults import crashpoint


@dataclass
class ZOGroup:
    """One parameter group as the kernels see it (``index``: its position in the optimizer's
    ``param_groups``; a masked tensor gets a ZOGroup of its own with the same index)."""

    params: list[torch.Tensor]
    keys: list[int]
    lr: float
    eps: float
    weight_decay: float = 0.0
    masks: list[torch.Tensor | None] | None = None
    index: int = 0
    offsets: list[int] | None = None  # element offset of each (sharded) tensor in its full one


@dataclass
class StepResult:
    """What a step measured.

    ``loss``: the mean of the 2n evaluations (a float; ``loss_tensor()`` gives it in the
    closure's dtype and device); ``half_diffs``: (ℓ₊ − ℓ₋)/2 per sample; ``losses``: every
    value; ``grads``: per ZOGroup, the projected gradients g_k = project(k, (ℓ₊ − ℓ₋)/(2ε))
    the update applied with that group's ε (before the 1/n average); ``skipped``: NaN/inf
    with ``nonfinite="skip"``.
    """

    loss: float
    half_diffs: list[float]
    losses: list[float]
    skipped: bool = False
    grads: list[list[float]] = field(default_factory=list)
    dtype: torch.dtype = torch.float64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def loss_tensor(self) -> torch.Tensor:
        """``loss`` as a 0-dim tensor of the closure's dtype and device (NaN if skipped)."""
        return torch.tensor(self.loss, dtype=self.dtype, device=self.device)


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or inf. The message says whether the weights were restored
    (they are checked: a perturbation that overflowed cannot be undone)."""


class NonFiniteUpdateError(FloatingPointError):
    """The step's update would write NaN/inf into the weights (a projected gradient g that is
    not finite, or lr·g·z beyond the largest value of the parameter dtype, e.g. ``lr=1e308``
    or finite losses of ±1e38). The update was not applied; the message says whether the
    weights were restored. ``lr`` and ``group``: what to lower."""

    def __init__(self, message: str, *, lr: float | None = None, group: int | None = None):
        super().__init__(message)
        self.lr, self.group = lr, group


def loss_value(out, where: str) -> float:
    """The closure's output as a Python float, or a ValueError that says what was wrong."""
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise ValueError(
                f"closure returned a tensor of shape {tuple(out.shape)} at {where}; "
                "it must return the scalar loss (one element)")
        if out.is_complex():
            raise ValueError(f"closure returned a complex tensor at {where}; the loss must be "
                             "real")
        return float(out.detach().reshape(()).item())
    if isinstance(out, numbers.Real) and not isinstance(out, bool):  # numpy scalars too
        return float(out)
    raise ValueError(f"closure returned {type(out).__name__} at {where}; it must return the "
                     "scalar loss as a tensor or a float")


# max |z| of the contract's distributions (normal: its cut at sqrt(50 ln 2)); a source of
# other numbers (PeZO's pool and lanes, hardware models) is bounded in ``z_bound``
_CONTRACT_Z = {"normal": math.sqrt(50 * math.log(2)), "uniform": math.sqrt(3.0) * (1 + 2**-20),
               "rademacher": 1.0}
_LOOSE_Z = 64.0  # an unknown source: a loose bound (only ever decides near the dtype's max)


def z_bound(ops, dist: str) -> float:
    """An upper bound of |z| for the numbers ``ops`` perturbs with (``dist``: the contract's
    distribution; a ``ReuseOps`` source says its own; virtual ops wrap another backend)."""
    inner = getattr(ops, "inner", None)
    if inner is not None:  # VirtualOps: the displacement follows the wrapped backend's z
        return z_bound(inner, dist)
    if getattr(ops, "z_max", None) is not None:  # a source that states its bound (low rank)
        return float(ops.z_max)
    source = getattr(ops, "source", None)
    if source is None:  # a kernels backend (a module) draws the contract's numbers
        return _CONTRACT_Z.get(dist, _LOOSE_Z) if isinstance(ops, ModuleType) else _LOOSE_Z
    if hasattr(source, "pool"):  # PoolSource: scale · U(-1, 1)
        return float(source.scale)
    if hasattr(source, "window"):  # RotateSource: √3, or a window's RMS normalisation
        return (math.sqrt(3.0) * (1 + 2**-20) if source.scaling == "static"
                else math.sqrt(source.window))
    return _LOOSE_Z


def _compute_max(dtype: torch.dtype) -> float:
    """The largest finite value of the kernels' arithmetic dtype for weights of ``dtype``."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max


def check_finite_grads(groups: Sequence[ZOGroup], grads: list[list[float]], step: int) -> None:
    """Raise ``NonFiniteUpdateError`` when a projected gradient is NaN/inf (nothing written)."""
    for g, gk in zip(groups, grads):
        bad = [v for v in gk if not math.isfinite(v)]
        if bad:
            raise NonFiniteUpdateError(
                f"step {step}: the projected gradient g={bad[0]!r} (param_groups[{g.index}], "
                f"ε={g.eps!r}) is not finite; the update was not applied", lr=g.lr, group=g.index)


def check_update(groups: Sequence[ZOGroup], grads: list[list[float]], radius: float,
                 n_samples: int, zb: float, step: int) -> None:
    """Refuse an update that could write NaN/inf: g must be finite, lr must be representable
    in the kernels' arithmetic dtype, and |θ| + ε·r·|z| + lr·(Σ|g|/n·|z| + wd·|θ|) must stay
    below the largest value of every parameter's dtype (and of the arithmetic dtype, for the
    intermediates). max|θ| is scanned only when the bound without it is within 2^-10 of that
    value, or lr·wd >= 1 (never for sane hyper-parameters). Raises ``NonFiniteUpdateError``
    before anything is written."""
    check_finite_grads(groups, grads, step)
    for g, gk in zip(groups, grads):
        coef = sum(abs(v) for v in gk) / n_samples
        back = g.eps * abs(radius) * zb
        move = g.lr * coef * zb
        for p in g.params:
            if p.numel() == 0:
                continue
            big = min(torch.finfo(p.dtype).max, _compute_max(p.dtype))
            reach = back + move
            if not (g.lr < _compute_max(p.dtype) and coef * zb < _compute_max(p.dtype)
                    and math.isfinite(reach)):
                top = math.inf
            elif reach < big * 2.0**-10 and g.lr * g.weight_decay < 1.0:
                continue
            else:
                top = float(p.detach().abs().max())
            theta1 = top + back
            bound = theta1 + g.lr * (coef * zb + (g.weight_decay * theta1
                                                  if g.weight_decay else 0.0))
            if not bound < big:
                reach = f"{bound:.3g}" if math.isfinite(bound) else "beyond any float"
                raise NonFiniteUpdateError(
                    f"step {step}: the update of param_groups[{g.index}] would overflow "
                    f"{p.dtype}: lr={g.lr!r} x |g|={coef:.3g} x max|z|={zb:.3g} (+ |θ| and "
                    f"weight decay) reaches {reach}, the largest {p.dtype} is {big:.3g}; "
                    "the update was not applied. Lower lr (or the loss scale)",
                    lr=g.lr, group=g.index)


def _unit(k: int) -> float:
    return 1.0


def _identity(k: int, g: float) -> float:
    return g


def evaluate_into(walk, where: str) -> float:
    """One loss evaluation of a step: ``walk.closure()`` as a float (``loss_value``), averaged
    over ranks by ``walk.exchange`` (mode "losses") before any use, appended to
    ``walk.losses``; the first float tensor's dtype and device kept in ``walk.like``."""
    crashpoint("mid-step")  # the weights may be perturbed in memory now: a kill must not matter
    out = walk.closure()
    value = loss_value(out, where)
    if walk.exchange is not None:
        value = walk.exchange.reduce_loss(value)
    if walk.like is None and isinstance(out, torch.Tensor) and out.is_floating_point():
        walk.like = (out.dtype, out.device)
    walk.losses.append(value)
    return value


class _NonFinite(Exception):
    pass


class _Walk:
    """Moves the weights along ±ε r z_k and remembers what is written in them, so any exit
    (an exception, a NaN) can undo it."""

    def __init__(self, groups, ops, closure, *, seed: int, step: int, dist: str,
                 exchange=None):
        self.groups, self.ops, self.closure, self.exchange = groups, ops, closure, exchange
        self.seed, self.step, self.dist = seed, step, dist
        self.applied: tuple[int, float] | None = None  # (sample, units of ε) in the weights
        self.losses: list[float] = []
        self.like: tuple | None = None  # (dtype, device) of the first float tensor returned

    def move(self, k: int, units: float) -> None:
        for g in self.groups:
            self.ops.perturb_(g.params, g.keys, seed=self.seed, step=self.step, sample=k,
                              scale=units * g.eps, dist=self.dist, masks=g.masks,
                              **_offsets(g))
        now = (self.applied[1] if self.applied else 0.0) + units
        self.applied = (k, now) if now != 0.0 else None

    def evaluate(self, where: str) -> float:
        return evaluate_into(self, where)

    def sample(self, k: int, rk: float, *, last: bool, check: bool = True):
        """Evaluate ℓ± of sample k; return (ℓ₊, ℓ₋). Leaves θ − εr z_k in place if last."""
        self.move(k, rk)
        lp = self.evaluate(f"θ+εz (sample {k})")
        self.move(k, -2.0 * rk)
        lm = self.evaluate(f"θ−εz (sample {k})")
        if check:
            self.check(k, lp, lm)
        if not last:
            self.move(k, rk)
        return lp, lm

    def check(self, k: int, lp: float, lm: float) -> None:
        if not (math.isfinite(lp) and math.isfinite(lm)):
            raise _NonFinite(f"closure returned a non-finite loss at step {self.step}, "
                             f"sample {k}: ℓ₊={lp}, ℓ₋={lm}")

    def all_samples(self, radii: list[float], local: list[int]) -> list[float]:
        """(ℓ₊ − ℓ₋)/2 of every sample. Mode "samples": this rank evaluates its ``local``
        samples and only moves the weights through the others (no forward pass), so every
        rank's weights take the same rounding path; the pairs are all-gathered, and a
        non-finite loss on any rank raises on every rank."""
        gather = self.exchange is not None and self.exchange.mode == "samples"
        n, pairs = len(radii), []
        for k in range(n):
            if k in local:
                pairs.append(self.sample(k, radii[k], last=k == n - 1, check=not gather))
                continue
            self.move(k, radii[k])
            self.move(k, -2.0 * radii[k])
            if k != n - 1:
                self.move(k, radii[k])
        if gather:
            pairs = self.exchange.gather_pairs(pairs, n)
            self.losses = [v for pair in pairs for v in pair]
            for k, (lp, lm) in enumerate(pairs):
                self.check(k, lp, lm)
        return [(lp - lm) / 2.0 for lp, lm in pairs]

    def undo(self) -> None:
        if self.applied is not None:
            k, units = self.applied
            self.move(k, -units)

    def restore_report(self) -> str:
        """Check the undone weights and say what happened (only called after a NaN/inf)."""
        bad = sum(int((~torch.isfinite(p)).sum()) for g in self.groups for p in g.params)
        if bad == 0:
            return "weights restored"
        total = sum(p.numel() for g in self.groups for p in g.params)
        return (f"the weights are NOT restored: {bad} of {total} elements are NaN/inf after "
                "undoing the perturbation (ε·z overflowed the parameter dtype, or the weights "
                "were not finite before this step)")


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
    exchange=None,
    update=None,
) -> StepResult:
    """One two-point ZO step with n samples, in place.

    For each sample k, with r_k = ``radius(k)`` (1 for MeZO; KerZOO's scalar r):
    θ ← θ + ε r_k z_k, ℓ₊ = closure(); θ ← θ − 2ε r_k z_k, ℓ₋ = closure();
    g_k = ``project(k, (ℓ₊ − ℓ₋)/(2ε))`` (identity for MeZO; KerZOO: ·K(r_k), clipped),
    with each group's own ε. Then, in one pass, restore the last sample and apply
    θ ← θ − lr·(1/n·Σ_k g_k z_k + wd·θ). Earlier samples are restored by a plain pass. Only
    scalars survive between passes: no z, no copy of θ, no gradient buffer. ``ops`` provides
    ``perturb_``/``restore_update_`` (a kernels backend, or a reuse source for PeZO);
    ``stochastic_rounding``: fp16/bf16 updates rounded stochastically (Philox word 1);
    ``exchange`` (``optim.exchange.ScalarExchange``) shares the loss scalars between ranks;
    ``update``: an ``optim.updates.RuleStep`` instead of the fused SGD update.

    If the closure raises, the perturbation in place is undone before the exception
    propagates. A NaN/inf loss undoes it, checks that the weights are finite again, then raises
    ``NonFiniteLossError`` (``nonfinite="raise"``, or whenever the weights could not be
    restored) or returns a skipped result (``nonfinite="skip"``). An update that would write
    NaN/inf (g not finite, or lr·g·z beyond the dtype: ``check_update``) is never applied: the
    perturbation is undone as after a NaN loss and ``NonFiniteUpdateError`` is raised, whatever
    ``nonfinite`` says.
    """
    _refuse_lr(groups, step)  # an lr the arithmetic cannot hold: refused before θ is touched
    radii = [radius(k) for k in range(n_samples)]
    local = exchange.local_samples(n_samples) if exchange else list(range(n_samples))
    walk = _Walk(groups, ops, closure, seed=seed, step=step, dist=dist, exchange=exchange)
    try:
        half = walk.all_samples(radii, local)
    except BaseException as exc:
        walk.undo()
        if not isinstance(exc, _NonFinite):
            raise
        report = walk.restore_report()
        if nonfinite == "skip" and report == "weights restored":
            return _result(walk, float("nan"), [], [], skipped=True)
        raise NonFiniteLossError(f"{exc}; {report}") from None
    grads = [[project(k, d / g.eps) for k, d in enumerate(half)] for g in groups]
    loss = sum(walk.losses) / len(walk.losses)  # the 2n evaluations, not a rule's extra
    applied = _apply_update(walk, grads, seed=seed, radius=radii[-1], n_samples=n_samples,
                            stochastic_rounding=stochastic_rounding, update=update)
    if not applied and nonfinite != "skip":
        raise NonFiniteLossError(f"closure returned a non-finite loss at θ (step {step}, the "
                                 "update rule's evaluation); weights restored")
    return _result(walk, loss, half, grads) if applied else _result(
        walk, float("nan"), [], [], skipped=True)


def _refuse_lr(groups: Sequence[ZOGroup], step: int) -> None:
    """Raise ``NonFiniteUpdateError`` for an lr beyond the largest value the update's
    arithmetic holds (the kernels' dtype for the group's weights): lr·g·z would be inf/NaN."""
    for g in groups:
        big = min((_compute_max(p.dtype) for p in g.params), default=math.inf)
        if not g.lr < big:
            raise NonFiniteUpdateError(
                f"step {step}: lr={g.lr!r} (param_groups[{g.index}]) is beyond the largest "
                f"value the update's arithmetic holds ({big:.3g}), so lr·g·z would be inf/NaN; "
                "the weights were not changed. Lower lr", lr=g.lr, group=g.index)


def _apply_update(walk: _Walk, grads: list[list[float]], *, seed: int, radius: float,
                  n_samples: int, stochastic_rounding: bool, update=None) -> bool:
    """The step's update, checked, then applied: an update ``check_update`` refuses undoes the
    last sample's −εr z (as after a NaN loss) and raises ``NonFiniteUpdateError``; otherwise
    one pass per group restores the last sample and applies θ ← θ − lr·(1/n·Σ_k g_k z_k +
    wd·θ), or ``update`` (an update rule) restores and applies its own. Returns False when
    the rule applied nothing (a non-finite loss at θ in its own evaluations)."""
    groups, ops, step, dist = walk.groups, walk.ops, walk.step, walk.dist
    try:
        if update is None:
            check_update(groups, grads, radius, n_samples, z_bound(ops, dist), step)
        else:
            update.check(walk, grads, radius, z_bound(ops, dist))
    except NonFiniteUpdateError as exc:
        walk.undo()  # the last sample's −εz, as after a NaN loss
        raise NonFiniteUpdateError(f"{exc}; {walk.restore_report()}", lr=exc.lr,
                                   group=exc.group) from None
    if update is not None:
        return update.apply(walk, grads, radius)
    for g, gk in zip(groups, grads):
        ops.restore_update_(g.params, g.keys, seed=seed, step=step,
                            eps=g.eps * radius, lr=g.lr,
                            grads=[v / n_samples for v in gk], restore_sample=n_samples - 1,
                            weight_decay=g.weight_decay, dist=dist, masks=g.masks, **_offsets(g),
                            **({"stochastic_rounding": True} if stochastic_rounding else {}))
    return True


def _offsets(g: ZOGroup) -> dict:
    """``offsets=`` for the ops only when a tensor is a shard (other ops keep their calls)."""
    return {"offsets": g.offsets} if g.offsets and any(g.offsets) else {}


def _result(walk: _Walk, loss: float, half: list[float], grads: list, *,
            skipped: bool = False) -> StepResult:
    dtype, device = walk.like or (torch.float64, torch.device("cpu"))
    return StepResult(loss=loss, half_diffs=half, losses=walk.losses, skipped=skipped,
                      grads=grads, dtype=dtype, device=device)


mezo_step = zo_step  # MeZO is the two-point step with r = 1 and the identity projection
