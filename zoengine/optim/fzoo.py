"""FZOO (Dang et al. 2025, arXiv 2506.09034): batched one-sided estimates, normalised by the
standard deviation of the perturbed losses, on zoengine's noise contract."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from zoengine.kernels.philox import DISTRIBUTIONS
from zoengine.optim.base import check_choice
from zoengine.optim.docs import shared_docs
from zoengine.optim.functional import (
    NonFiniteLossError,
    NonFiniteUpdateError,
    ZOGroup,
    check_update,
    z_bound,
)
from zoengine.optim.loss_probe import (
    LossProbe,
    NonFiniteLoss,
    check_exchange,
    refuse_update_rule,
    restore_report,
    with_passes,
)
from zoengine.optim.registry import register_method
from zoengine.optim.zo import ZO, ZO_OWN


def fzoo_coefficients(centre: float, losses: Sequence[float], *,
                      unbiased_std: bool = False) -> tuple[list[float], float]:
    """The update's per-direction coefficients a_i = (ℓ_i − ℓ₀) / (n σ) and σ, the standard
    deviation of ℓ_1..ℓ_n (population, ddof 0, as the reference code's ``torch.std(...,
    unbiased=False)``; ``unbiased_std``: ddof 1, as the paper writes σ). σ = 0 (all n losses
    equal, so the directions cannot be told apart) gives a_i = 0: no update. float64."""
    n = len(losses)
    mean = math.fsum(losses) / n
    var = math.fsum((v - mean) ** 2 for v in losses) / (n - 1 if unbiased_std else n)
    sigma = math.sqrt(var)
    if sigma == 0.0:
        return [0.0] * n, 0.0
    return [(v - centre) / (n * sigma) for v in losses], sigma


@shared_docs
class FZOO(ZO):
    r"""FZOO: n one-sided perturbations around one centre evaluation, step normalised by the
    standard deviation of the n perturbed losses.

    .. math::
        \ell_0 = \mathcal{L}(\theta),\quad \ell_i = \mathcal{L}(\theta + \epsilon u_i),\quad
        \sigma = \operatorname{std}(\ell_1, \dots, \ell_n), \qquad
        \theta \leftarrow \theta - \eta\Big(\frac{1}{n\sigma}\sum_{i=1}^{n}(\ell_i - \ell_0)\,u_i
              + \lambda\theta\Big)

    u_i are Rademacher (±1) vectors from the noise contract (seed, step, sample i, tensor key,
    element index). A step costs n + 1 forward passes. The coefficient follows the authors'
    code (``trainer.py``: ``(loss1s - loss_tensor) / (perturbTimes * std)``, std with
    ``unbiased=False``): no 1/ε, so η is a step length in weight units (their scripts use
    η = 1e-5…5e-5). The paper writes g = (1/(εn))Σ(ℓ_i − ℓ₀)u_i and θ ← θ − η g/σ: the same
    direction, with η/ε in place of η (docs/methods/fzoo.md). ``state["zo"]["projected_grads"]``
    holds g_i = (ℓ_i − ℓ₀)/ε, the one-sided directional derivatives, and
    ``state["zo"]["fzoo_std"]`` the step's σ. σ = 0 makes no update.

    Args:
        {args: params lr eps weight_decay seed}
        n_samples (int): n, perturbations a step (>= 2; default 8, the authors' ``N``).
        dist (str): ``"rademacher"`` (FZOO's), ``"normal"`` or ``"uniform"``.
        unbiased_std (bool): σ with n − 1 (the paper's formula) instead of n (the code's).
        {args: backend nonfinite masks stochastic_rounding}

    {engine}

    Example:
        >>> opt = zoengine.FZOO(model.named_parameters(), lr=1e-5, eps=1e-3, n_samples=8)
        >>> loss = opt.step(lambda: model(**batch).loss)  # 9 forwards: the mean of them
    """

    def __init__(self, params, lr: float = 1e-5, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, n_samples: int = 8, dist: str = "rademacher", unbiased_std: bool = False,
                 seed: int = 0, backend: str | None = None, nonfinite: str = "raise",
                 masks=None, stochastic_rounding: bool = False, **kwargs):
        refuse_update_rule(kwargs, "FZOO")
        check_choice("dist", dist, DISTRIBUTIONS)
        if not isinstance(unbiased_std, bool):
            raise ValueError(f"unbiased_std={unbiased_std!r}: must be True or False")
        if isinstance(n_samples, int) and not isinstance(n_samples, bool) and n_samples == 1:
            raise ValueError("n_samples=1: FZOO needs >= 2 (its step is normalised by the "
                             "standard deviation of the n perturbed losses)")
        self.unbiased_std = unbiased_std
        super().__init__(params, lr, eps, weight_decay, noise=dist, estimator="spsa",
                         seed=seed, n_samples=n_samples, backend=backend, nonfinite=nonfinite,
                         masks=masks, stochastic_rounding=stochastic_rounding, **kwargs)

    def hyperparameters(self) -> dict:
        """As :class:`ZO`'s, in FZOO's terms: ``dist`` and ``unbiased_std``."""
        h = super().hyperparameters()
        for k in ZO_OWN:
            h.pop(k, None)
        return {**h, "dist": self.noise, "unbiased_std": self.unbiased_std}

    def _run_config(self) -> dict:
        return {**super()._run_config(), "unbiased_std": self.unbiased_std}

    def _zo_step(self, closure: Callable, exchange=None) -> torch.Tensor:
        zo = self.state["zo"]
        groups = self.zo_groups()
        if not groups:
            raise ValueError("no trainable parameters: every tensor has requires_grad=False")
        exchange = exchange or self._exchange
        check_exchange(exchange, "FZOO")
        self._check_perturbation_fits(groups)
        result, sigma = fzoo_step(groups, closure, self._ops(groups), seed=zo["seed"],
                                  step=zo["step"], n_samples=self.n_samples, dist=self.dist,
                                  nonfinite=self.nonfinite, unbiased_std=self.unbiased_std,
                                  stochastic_rounding=self.stochastic_rounding,
                                  exchange=exchange)
        zo["step"] += 1
        if self._exchange is not None:
            self._exchange.after_step(zo["step"], (p for g in groups for p in g.params))
        if not result.skipped:
            zo["fzoo_std"] = sigma
        self._record(result, groups)
        return result.loss_tensor()

    # ---- accounting ---------------------------------------------------------------------
    @staticmethod
    def _passes(n: int, perturbation: str) -> int:
        """In place: n perturbations, n − 1 restores, the fused pass's n streams (3n − 1);
        virtual: one per perturbed evaluation and the update's n (2n)."""
        return 2 * n if perturbation == "virtual" else 3 * n - 1

    @classmethod
    def rng_accounting(cls, numels: Sequence[int], *, half_numels: Sequence[int] = (),
                       **options) -> dict:
        counts = super().rng_accounting(numels, half_numels=half_numels, **options)
        n = options.get("n_samples", 8)
        return with_passes({**counts, "n_samples": n}, numels,
                           cls._passes(n, options.get("perturbation", "inplace")))

    @classmethod
    def zo_options(cls, *, dist: str = "rademacher", n_samples: int = 8, **options) -> dict:
        options.pop("unbiased_std", None)
        return super().zo_options(noise=dist, estimator="spsa", n_samples=n_samples, **options)

    def rng_budget(self) -> dict:
        """As :meth:`ZO.rng_budget`, for FZOO's 3n − 1 passes over z (2n virtual)."""
        numels = [p.numel() for g in self.zo_groups() for p in g.params]
        return with_passes(super().rng_budget(), numels,
                           self._passes(self.n_samples, self.perturbation))


def _move(groups, ops, *, seed, step, sample, units, dist) -> None:
    for g in groups:
        ops.perturb_(g.params, g.keys, seed=seed, step=step, sample=sample,
                     scale=units * g.eps, dist=dist, masks=g.masks,
                     **({"offsets": g.offsets} if g.offsets else {}))


def fzoo_step(groups: Sequence[ZOGroup], closure: Callable, ops, *, seed: int, step: int,
              n_samples: int, dist: str = "rademacher", nonfinite: str = "raise",
              unbiased_std: bool = False, stochastic_rounding: bool = False, exchange=None):
    """One FZOO step in place; returns (StepResult, σ). ℓ₀ first, then ℓ_i at θ + εu_i for
    i = 0..n−1 (each undone before the next; the last undone by the fused update pass). A
    NaN/inf loss or an exception in the closure undoes the perturbation in place first; then,
    as ``zo_step``: ``NonFiniteLossError`` or a skipped result (``nonfinite="skip"``)."""
    probe, applied = LossProbe(closure, exchange), None
    losses: list[float] = []
    try:
        centre = probe.evaluate("θ (FZOO centre)")
        for k in range(n_samples):
            _move(groups, ops, seed=seed, step=step, sample=k, units=1.0, dist=dist)
            applied = k
            losses.append(probe.evaluate(f"θ+εu (sample {k})"))
            if k != n_samples - 1:
                _move(groups, ops, seed=seed, step=step, sample=k, units=-1.0, dist=dist)
                applied = None
    except BaseException as exc:
        if applied is not None:
            _move(groups, ops, seed=seed, step=step, sample=applied, units=-1.0, dist=dist)
        if not isinstance(exc, NonFiniteLoss):
            raise
        report = restore_report(groups)
        if nonfinite == "skip" and report == "weights restored":
            return probe.result([], skipped=True), float("nan")
        raise NonFiniteLossError(f"{exc} (step {step}); {report}") from None
    coef, sigma = fzoo_coefficients(centre, losses, unbiased_std=unbiased_std)
    try:
        check_update(groups, [coef] * len(groups), 1.0, 1, z_bound(ops, dist), step)
    except NonFiniteUpdateError as exc:
        _move(groups, ops, seed=seed, step=step, sample=n_samples - 1, units=-1.0, dist=dist)
        raise NonFiniteUpdateError(f"{exc}; {restore_report(groups)}", lr=exc.lr,
                                   group=exc.group) from None
    for g in groups:  # θ₁ = θ − εu_last (restore), θ₂ = θ₁ − lr(Σ a_i u_i + λθ₁)
        ops.restore_update_(g.params, g.keys, seed=seed, step=step, eps=-g.eps, lr=g.lr,
                            grads=coef, restore_sample=n_samples - 1,
                            weight_decay=g.weight_decay, dist=dist, masks=g.masks,
                            **({"offsets": g.offsets} if g.offsets else {}),
                            **({"stochastic_rounding": True} if stochastic_rounding else {}))
    grads = [[(v - centre) / g.eps for v in losses] for g in groups]
    return probe.result(grads), sigma


register_method("fzoo", FZOO)
