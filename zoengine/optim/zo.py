"""ZO: the composable zeroth-order optimizer; MeZO, KerZOO and PeZO are presets of it.

A step is (noise source) x (estimator) on the two-point loop of ``functional.zo_step``
(research/algorithms.md §5): the noise source says what z is (fresh Philox numbers of a
distribution, PeZO's pool, PeZO's rotating lanes); the estimator says how the loss difference
becomes the scalar of the update (SPSA, or KerZOO's kernel-weighted difference with radius r).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import DISTRIBUTIONS, POOL_LANE
from zoengine.kernels.reuse import (
    HardwareSource,
    PoolSource,
    ReuseOps,
    RotateSource,
    lane_uniform,
)
from zoengine.optim.base import ZOOptimizer, check_choice, check_float, check_int
from zoengine.optim.estimators import KERNELS, clip_value, kernel_weight, scalar_uniform
from zoengine.optim.functional import zo_step

NOISES = DISTRIBUTIONS + ("pool", "rotate")
ESTIMATORS = ("spsa", "kernel")
SCALINGS = ("adaptive", "static")


class ZO(ZOOptimizer):
    r"""Two-point zeroth-order optimizer with a pluggable noise source and estimator.

    .. math::
        g_k = \frac{\mathcal{L}(\theta + \epsilon r_k z_k) - \mathcal{L}(\theta - \epsilon r_k z_k)}
              {2\epsilon}\, w_k, \qquad
        \theta \leftarrow \theta - \eta\Big(\frac1n\sum_k g_k z_k + \lambda\theta\Big)

    with r_k = 1, w_k = 1 for ``estimator="spsa"`` (MeZO) and r_k ~ U(-a, a),
    w_k = K_a(r_k) for ``estimator="kernel"`` (KerZOO).

    Args:
        params: parameters, named parameters or param groups (as ``torch.optim``).
        lr, eps, weight_decay: η, ε, λ (per group).
        noise: ``"normal"``, ``"uniform"``, ``"rademacher"`` (fresh numbers from the noise
            contract), ``"pool"`` (PeZO pre-generated pool), ``"rotate"`` (PeZO lanes) or
            ``"hw:<spec>"`` (a bit-accurate hardware generator from ``zoengine.hwsim``, e.g.
            ``"hw:lfsr32-uniform"``: training and hardware cost on the same numbers).
        estimator: ``"spsa"`` or ``"kernel"``.
        kernel_order: 1, 3 or 5 (kernel estimator), or None for r ≡ 1, K ≡ 1 (= SPSA).
        r_range: a of r ~ U(-a, a) (kernel estimator).
        clip: clip |g_k| to this value (None: no clipping).
        pool_size: N of the pool (noise="pool").
        lanes: number of generator lanes (noise="rotate").
        scaling: ``"adaptive"`` (1/RMS of the numbers used) or ``"static"`` (√3), for the
            pool and rotate sources.
        seed, n_samples, backend, nonfinite: as in :class:`zoengine.MeZO`.
        masks: sparsity masks (None, ``"zeros"``, or a dict parameter/name -> bool tensor);
            masked weights are never perturbed or updated, so pruned zeros stay exactly zero.
        stochastic_rounding: round fp16/bf16 updates stochastically (unbiased), so updates
            below half an ulp are not lost; fp32 weights are unaffected.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, noise: str = "normal", estimator: str = "spsa", kernel_order: int | None = 3,
                 r_range: float = 1.0, clip: float | None = None, pool_size: int = 1 << 16,
                 lanes: int = 64, scaling: str = "adaptive", seed: int = 0, n_samples: int = 1,
                 backend: str | None = None, nonfinite: str = "raise", masks=None,
                 stochastic_rounding: bool = False):
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"stochastic_rounding={stochastic_rounding!r}: must be True or False")
        if stochastic_rounding and noise not in DISTRIBUTIONS:
            raise ValueError(f"stochastic_rounding=True with noise={noise!r}: only the noise "
                             f"contract's streams {DISTRIBUTIONS} support it")
        self.stochastic_rounding = stochastic_rounding
        if isinstance(noise, str) and noise.startswith("hw:"):
            try:
                self._hw = HardwareSource(noise[3:])
            except ValueError as exc:
                raise ValueError(f"noise={noise!r}: not a hardware generator spec ({exc})") from None
        else:
            check_choice("noise", noise, NOISES + ("hw:<generator spec>",))
        check_choice("estimator", estimator, ESTIMATORS)
        if kernel_order is not None:
            check_choice("kernel_order", kernel_order, tuple(KERNELS))
        check_float("r_range", r_range, low=0.0, strict=True)
        if clip is not None:
            check_float("clip", clip, low=0.0, strict=True)
        check_int("pool_size", pool_size, low=1)
        check_int("lanes", lanes, low=1)
        check_choice("scaling", scaling, SCALINGS)
        defaults = dict(lr=check_float("lr", lr, low=0.0, strict=False),
                        eps=check_float("eps", eps, low=0.0, strict=True),
                        weight_decay=check_float("weight_decay", weight_decay, low=0.0,
                                                 strict=False))
        dist = noise if noise in DISTRIBUTIONS else "uniform"
        super().__init__(params, defaults, seed=seed, n_samples=n_samples, dist=dist,
                         backend=backend, nonfinite=nonfinite, masks=masks)
        self.noise, self.estimator = noise, estimator
        self.kernel_order, self.r_range, self.clip = kernel_order, r_range, clip
        self.pool_size, self.lanes, self.scaling = pool_size, lanes, scaling
        if noise == "pool":
            self.state["zo"].update(self._make_pool(seed))

    def add_param_group(self, param_group: dict) -> None:
        for name, strict in (("lr", False), ("eps", True), ("weight_decay", False)):
            if name in param_group:
                check_float(name, param_group[name], low=0.0, strict=strict)
        super().add_param_group(param_group)

    # ---- noise sources ----------------------------------------------------------------
    def _make_pool(self, seed: int) -> dict:
        """N numbers of U(-1, 1) from the noise contract, drawn once for the whole run."""
        idx = torch.arange(self.pool_size, dtype=torch.int64)
        q = lane_uniform(idx, POOL_LANE, stream_key(seed, 0, 0))
        scale = (1.0 / math.sqrt(float(q.double().pow(2).mean())) if self.scaling == "adaptive"
                 else math.sqrt(3.0))
        return {"pool": q, "pool_scale": scale, "pool_pointer": 0}

    def trainable_numel(self, groups=None) -> int:
        groups = self.zo_groups() if groups is None else groups
        return sum(p.numel() for g in groups for p in g.params)

    def _ops(self, groups):
        if self.noise in DISTRIBUTIONS:
            return self.ops_for(groups)
        offsets, total = {}, 0
        for g in groups:
            for p, k in zip(g.params, g.keys):
                offsets[k] = total
                total += p.numel()
        zo = self.state["zo"]
        if self.noise.startswith("hw:"):
            return ReuseOps(self._hw, offsets)
        if self.noise == "pool":
            pool = zo["pool"]
            if total % pool.numel() == 0:
                warnings.warn(f"pool_size={pool.numel()} divides d={total}: the pointer never "
                              "moves, so every perturbation is identical", stacklevel=3)
            source = PoolSource(pool, zo["pool_scale"], zo["pool_pointer"], total)
        else:
            source = RotateSource(self.lanes, self.scaling)
        return ReuseOps(source, offsets)

    # ---- estimator --------------------------------------------------------------------
    def _estimator_hooks(self, seed: int, step: int) -> tuple[Callable, Callable]:
        if self.estimator == "spsa" or self.kernel_order is None:
            return (lambda k: 1.0), (lambda k, g: clip_value(g, self.clip))
        a, order = self.r_range, self.kernel_order
        radii = {}

        def radius(k: int) -> float:
            radii[k] = a * scalar_uniform(seed, step, k)
            return radii[k]

        def project(k: int, g: float) -> float:
            return clip_value(g * kernel_weight(radii[k], order, a), self.clip)

        return radius, project

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor:
        """Take one step; ``closure`` returns the loss. Returns the mean of the evaluations."""
        closure = self.require_closure(type(self).__name__, closure)
        zo = self.state["zo"]
        groups = self.zo_groups()
        if not groups:
            raise ValueError("no trainable parameters: every tensor has requires_grad=False")
        radius, project = self._estimator_hooks(zo["seed"], zo["step"])
        result = zo_step(groups, closure, self._ops(groups), seed=zo["seed"], step=zo["step"],
                         n_samples=self.n_samples, dist=self.dist, nonfinite=self.nonfinite,
                         radius=radius, project=project,
                         stochastic_rounding=self.stochastic_rounding)
        zo["step"] += 1
        if self.noise == "pool":  # the pointer advances by d per perturbation
            d = self.trainable_numel(groups)
            zo["pool_pointer"] = (zo["pool_pointer"] + self.n_samples * d) % self.pool_size
        if result.skipped:
            zo["skipped_steps"] += 1
        else:
            eps0 = groups[0].eps
            zo["projected_grads"] = [project(k, d / eps0) for k, d in
                                     enumerate(result.half_diffs)]
        return torch.tensor(result.loss)

    # ---- accounting for hwsim -----------------------------------------------------------
    def rng_budget(self) -> dict:
        """Random numbers per step: generated fresh vs reused (read by zoengine.hwsim)."""
        d, n = self.trainable_numel(), self.n_samples
        uses = d * (4 * n - 1)  # 2 perturbations + (n-1) restores + the fused pass's n streams
        generated = 0 if self.noise == "pool" else uses
        return {"method": type(self).__name__, "noise": self.noise, "estimator": self.estimator,
                "d": d, "n_samples": n, "numbers_used_per_step": uses,
                "numbers_generated_per_step": generated,
                "numbers_reused_per_step": uses - generated,
                "pool_size": self.pool_size if self.noise == "pool" else None,
                "numbers_generated_once": self.pool_size if self.noise == "pool" else 0,
                "lanes": self.lanes if self.noise == "rotate" else None,
                "scalars_per_step": n * (2 if self.estimator == "kernel" else 1)}
