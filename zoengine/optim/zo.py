"""ZO: the composable zeroth-order optimizer; MeZO, KerZOO and PeZO are presets of it.

A step is (noise source) x (estimator) on the two-point loop of ``functional.zo_step``
(research/algorithms.md §5): the noise source says what z is (fresh Philox numbers of a
distribution, PeZO's pool, PeZO's rotating lanes); the estimator says how the loss difference
becomes the scalar of the update (SPSA, or KerZOO's kernel-weighted difference with radius r).

Accounting lives on the class (``memory_extras``, ``rng_accounting``), so the memory planner
and hwsim ask the method class with its options, not a method name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from zoengine.kernels.philox import DISTRIBUTIONS, SQRT3_F32
from zoengine.kernels.reuse import (
    HardwareSource,
    PoolSource,
    ReuseOps,
    RotateSource,
    make_pool,
    pool_stride,
)
from zoengine.optim.accounting import rng_count
from zoengine.optim.arguments import check_eps_floor, check_journal, check_perturbation_fits
from zoengine.optim.arguments import check_saved_pool
from zoengine.optim.base import ZOOptimizer, check_choice, check_float, check_int
from zoengine.optim.batched import BatchedSteps
from zoengine.optim.deprecations import engine_keywords
from zoengine.optim.docs import shared_docs
from zoengine.optim.estimators import KERNELS, clip_value, kernel_weight, scalar_uniform
from zoengine.optim.exchange import RecordedExchange
from zoengine.optim.functional import StepResult, ZOGroup, zo_step
from zoengine.optim.lowrank_noise import (
    CONTRACT_NOISES,
    LOWRANK_DEFAULTS,
    check_lowrank,
    lowrank_ops,
    lowrank_z_bound,
)
from zoengine.optim.update_api import UpdateRules, check_update_options
from zoengine.optim.updates import update_bytes
from zoengine.optim.virtual import VirtualModel, check_perturbation
from zoengine.optim.virtual_api import VirtualPerturbation
from zoengine.optim.virtual_ops import VirtualOps

NOISES = DISTRIBUTIONS + ("pool", "rotate", "lowrank")
ESTIMATORS = ("spsa", "kernel")
SCALINGS = ("adaptive", "static")
# ZO's options that decide z, the estimator and the accounting (``ZO.zo_options``).
ZO_DEFAULTS = dict(noise="normal", estimator="spsa", kernel_order=3, r_range=1.0, clip=None,
                   pool_size=1 << 16, lanes=64, scaling="adaptive", n_samples=1,
                   stochastic_rounding=False, update="sgd", momentum=0.9, betas=(0.9, 0.999),
                   adam_eps=1e-8, **LOWRANK_DEFAULTS)
# ZO's own keywords beyond the base's (presets translate them: MeZO's ``dist`` is ``noise``)
UPDATE_OWN = ("update", "momentum", "betas", "adam_eps")
ZO_OWN = ("noise", "estimator", "kernel_order", "r_range", "clip", "pool_size", "lanes",
          "scaling", *UPDATE_OWN)
# max |z| of each source (normal: the contract's cut at sqrt(50 ln 2); adaptive rotate: a
# window's RMS normalisation bounds |z| by sqrt(window); hardware models: a loose bound).
_Z_BOUND = {"normal": math.sqrt(50 * math.log(2)), "uniform": SQRT3_F32, "rademacher": 1.0,
            "hw": 64.0}
_HALF = (torch.float16, torch.bfloat16)


@shared_docs
class ZO(BatchedSteps, UpdateRules, VirtualPerturbation, ZOOptimizer):
    r"""Two-point zeroth-order optimizer with a pluggable noise source and estimator.

    .. math::
        g_k = \frac{\mathcal{L}(\theta + \epsilon r_k z_k) - \mathcal{L}(\theta - \epsilon r_k z_k)}
              {2\epsilon}\, w_k, \qquad
        \theta \leftarrow \theta - \eta\Big(\frac1n\sum_k g_k z_k + \lambda\theta\Big)

    with r_k = 1, w_k = 1 for ``estimator="spsa"`` (MeZO) and r_k ~ U(-a, a),
    w_k = K_a(r_k) for ``estimator="kernel"`` (KerZOO).

    Args:
        {args: params lr eps weight_decay noise estimator kernel_order r_range clip}
        {args: pool_size lanes scaling seed n_samples backend nonfinite masks}
        {args: stochastic_rounding update momentum betas adam_eps rank resample_every}

    {engine}

    ``n_samples``, ``noise``, ``estimator``, ``clip``, the source's options and ``backend``
    are saved by ``state_dict()`` and checked by ``load_state_dict()``. After a step,
    ``state["zo"]["projected_grads"]`` holds the n values g_k computed with the ε of the first
    group that has trainable tensors, and ``state["zo"]["projected_grads_per_group"][i]``
    those computed with ``param_groups[i]``'s own ε (what its update applied; None for a
    group without trainable tensors). float64 weights are updated in float64.

    Example:
        >>> opt = ZO(model.named_parameters(), lr=1e-6, noise="pool", estimator="kernel")
        >>> loss = opt.step(lambda: model(**batch).loss)  # closure's dtype and device
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, noise: str = "normal", estimator: str = "spsa", kernel_order: int | None = 3,
                 r_range: float = 1.0, clip: float | None = None, pool_size: int = 1 << 16,
                 lanes: int = 64, scaling: str = "adaptive", seed: int = 0, n_samples: int = 1,
                 backend: str | None = None, nonfinite: str = "raise", masks=None,
                 stochastic_rounding: bool = False, update: str = "sgd", momentum: float = 0.9,
                 betas=(0.9, 0.999), adam_eps: float = 1e-8, rank: int = 1,
                 resample_every: int = 100, **deprecated):
        engine = engine_keywords(type(self).__name__, deprecated)
        check_lowrank(noise, rank, resample_every, backend)
        self.rank, self.resample_every = rank, resample_every
        self.update = check_update_options(update, momentum, betas, adam_eps,
                                           stochastic_rounding=stochastic_rounding,
                                           weight_decay=weight_decay)
        self._hw = self._check_options(noise, estimator, kernel_order, r_range, clip,
                                       pool_size, lanes, scaling, stochastic_rounding)
        check_perturbation(engine["perturbation"], engine["model"])
        self.perturbation = "inplace"
        self._virtual: VirtualModel | None = None
        self.stochastic_rounding = stochastic_rounding
        defaults = dict(lr=check_float("lr", lr, low=0.0, strict=False),
                        eps=check_float("eps", eps, low=0.0, strict=True),
                        weight_decay=check_float("weight_decay", weight_decay, low=0.0,
                                                 strict=False))
        dist = "normal" if noise == "lowrank" else noise if noise in DISTRIBUTIONS else "uniform"
        if noise not in DISTRIBUTIONS and backend not in (None, "auto", "reference"):
            raise ValueError(f"backend={backend!r} with noise={noise!r}: reused numbers (PeZO's "
                             "pool and lanes, hardware models) run on the reference kernels "
                             "only; pass backend=None, 'auto' or 'reference'")
        super().__init__(params, defaults, seed=seed, n_samples=n_samples, dist=dist,
                         backend=backend, nonfinite=nonfinite, masks=masks)
        self.noise, self.estimator = noise, estimator
        self.kernel_order, self.r_range, self.clip = kernel_order, r_range, clip
        self.pool_size, self.lanes, self.scaling = pool_size, lanes, scaling
        if noise == "pool":
            self.state["zo"].update(make_pool(seed, pool_size, scaling))
        self.state["zo"]["update_steps"] = 0  # updates applied (Adam's bias correction)
        for i, g in enumerate(self.param_groups):  # an ε that never moves them: refused
            check_eps_floor("eps" if g["eps"] == eps else f"param_groups[{i}]['eps']", g["eps"],
                            [p for p in g["params"] if p.requires_grad], warn=True)
        # the deprecated engine keywords, attached in the order the constructor always did
        if "distributed" in deprecated:
            self.set_distributed(engine["distributed"])
        if engine["perturbation"] == "virtual":
            self.attach_virtual(engine["model"])
        if engine["journal"] is not None:
            self.set_journal(engine["journal"], fsync=engine["journal_fsync"])

    # ---- engine features ----------------------------------------------------------------
    def set_journal(self, path, *, fsync: str | int = "step", meta: dict | None = None) -> None:
        """As :meth:`Journaling.set_journal`; with ``distributed="losses"`` the journal records
        the all-reduced losses every rank applied, so a single process replays the run."""
        if self._exchange is not None and self._exchange.mode != "losses":
            raise ValueError(f"set_journal after set_distributed({self._exchange.mode!r}): "
                             "not supported yet (each rank evaluates other samples); use "
                             "set_distributed('losses')")
        check_journal(path, fsync, meta)
        super().set_journal(path, fsync=fsync, meta=meta)

    @staticmethod
    def _check_options(noise, estimator, kernel_order, r_range, clip, pool_size, lanes,
                       scaling, stochastic_rounding) -> HardwareSource | None:
        """Validate ZO's own options; returns the hardware source of ``noise="hw:..."``."""
        if not isinstance(stochastic_rounding, bool):
            raise ValueError(f"stochastic_rounding={stochastic_rounding!r}: must be True or False")
        if stochastic_rounding and noise not in CONTRACT_NOISES:
            raise ValueError(f"stochastic_rounding=True with noise={noise!r}: only the noise "
                             f"contract's streams {DISTRIBUTIONS} support it")
        hw = None
        if isinstance(noise, str) and noise.startswith("hw:"):
            try:
                hw = HardwareSource(noise[3:])
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
        return hw

    @classmethod
    def zo_options(cls, **options) -> dict:
        """This class's keyword options in ZO's terms (presets map theirs: PeZO's ``reuse``
        becomes ``noise``), ZO's defaults filled in; other keywords pass through."""
        return {**ZO_DEFAULTS, **options}

    def hyperparameters(self) -> dict:
        """The base's (lr, eps, weight_decay, seed, n_samples, backend, nonfinite) and ZO's
        own options, as keyword arguments of :class:`ZO`."""
        return {**super().hyperparameters(), "noise": self.noise, "estimator": self.estimator,
                "kernel_order": self.kernel_order, "r_range": self.r_range, "clip": self.clip,
                "pool_size": self.pool_size, "lanes": self.lanes, "scaling": self.scaling,
                "stochastic_rounding": self.stochastic_rounding, "update": self.update.name,
                "momentum": self.update.momentum, "betas": list(self.update.betas),
                "adam_eps": self.update.adam_eps, **({"rank": self.rank, "resample_every":
                self.resample_every} if self.noise == "lowrank" else {})}

    def _run_config(self) -> dict:
        cfg = {**super()._run_config(), "noise": self.noise, "estimator": self.estimator,
               "clip": self.clip, "stochastic_rounding": self.stochastic_rounding}
        if self.perturbation != "inplace":  # absent by default: older checkpoints still load
            cfg["perturbation"] = self.perturbation
        if not self.update.fused:  # absent for sgd: older checkpoints still load
            cfg.update(update=self.update.name, **self.update.options())
        if self.estimator == "kernel":
            cfg.update(kernel_order=self.kernel_order, r_range=self.r_range)
        if self.noise == "pool":
            cfg.update(pool_size=self.pool_size, scaling=self.scaling)
        elif self.noise == "rotate":
            cfg.update(lanes=self.lanes, scaling=self.scaling)
        elif self.noise == "lowrank":
            cfg.update(rank=self.rank, resample_every=self.resample_every)
        return cfg

    def _check_saved(self, saved: dict) -> None:
        super()._check_saved(saved)
        if self.noise == "pool":  # the pool this optimizer draws from: its size and pointer
            check_saved_pool(saved, self.pool_size)

    # ---- noise sources ----------------------------------------------------------------
    def trainable_numel(self, groups=None) -> int:
        groups = self.zo_groups() if groups is None else groups
        return sum(p.numel() for g in groups for p in g.params)

    def _ops(self, groups):
        ops = self._source_ops(groups)
        return ops if self._virtual is None else VirtualOps(ops, self._virtual)

    def _source_ops(self, groups):
        if self.noise == "lowrank":
            return lowrank_ops(self, groups)
        if self.noise in DISTRIBUTIONS:
            return self.ops_for(groups)
        if any(g.offsets for g in groups):
            raise ValueError(f"noise={self.noise!r} cannot train sharded tensors "
                             "(shard_offsets): only the contract's Philox streams take offsets")
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
            source = PoolSource(pool, zo["pool_scale"], zo["pool_pointer"],
                                pool_stride(total, pool.numel()))
        else:
            source = RotateSource(self.lanes, self.scaling)
        return ReuseOps(source, offsets)

    def _z_bound(self) -> float:
        if self.noise == "lowrank":
            return lowrank_z_bound(self.rank)
        if self.noise == "pool":
            return float(self.state["zo"]["pool_scale"])
        if self.noise == "rotate":
            return math.sqrt(RotateSource(1, "adaptive").window) if self.scaling == "adaptive" \
                else SQRT3_F32
        return _Z_BOUND.get(self.noise, _Z_BOUND["hw"])

    def _check_perturbation_fits(self, groups: list[ZOGroup]) -> None:
        """Refuse, before touching the weights, an ε whose ±ε·r·z cannot be undone."""
        check_perturbation_fits(groups, 2.0 * self._z_bound()
                                * (self.r_range if self.estimator == "kernel" else 1.0))

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
        """Take one step; ``closure`` returns the loss.

        Returns the mean of the 2n loss evaluations of the step (an unbiased estimate of the
        smoothed loss at θ) as a 0-dim tensor of the closure's dtype and device (float64 on
        the CPU when the closure returns a Python number); NaN of that dtype and device when
        the step was skipped (``nonfinite="skip"``).
        """
        closure = self.require_closure(type(self).__name__, closure)
        self.probe_virtual(closure)
        return self._journaled_step(closure)

    def _journaled_step(self, closure: Callable, **batched) -> torch.Tensor:
        with self.journal_step():  # ``batched``: step_batched's (subclasses' _zo_step lack it)
            if self._exchange is not None and self._tap is not None:
                # journal the losses every rank uses: after the all-reduce
                exchange = RecordedExchange(self._exchange, self._tap.values)
                return self._zo_step(closure, exchange, **batched)
            return self._zo_step(self.tap(closure), **batched)

    def _zo_step(self, closure: Callable, exchange=None, batched=None) -> torch.Tensor:
        zo = self.state["zo"]
        groups = self.zo_groups()
        if not groups:
            raise ValueError("no trainable parameters: every tensor has requires_grad=False")
        self._check_perturbation_fits(groups)
        radius, project = self._estimator_hooks(zo["seed"], zo["step"])
        if batched is not None:  # step_batched: the 2n losses come from one forward
            batched.bind(groups, radius)
        result = zo_step(groups, closure, self._ops(groups), seed=zo["seed"], step=zo["step"],
                         n_samples=self.n_samples, dist=self.dist, nonfinite=self.nonfinite,
                         radius=radius, project=project,
                         stochastic_rounding=self.stochastic_rounding,
                         exchange=exchange or self._exchange, update=self._rule_step(groups))
        zo["step"] += 1
        if not result.skipped:
            zo["update_steps"] = zo.get("update_steps", 0) + 1
        if self._exchange is not None:  # the drift guard, every check_every steps
            self._exchange.after_step(zo["step"], (p for g in groups for p in g.params))
        if self.noise == "pool":
            stride = pool_stride(self.trainable_numel(groups), self.pool_size)
            zo["pool_pointer"] = (zo["pool_pointer"] + self.n_samples * stride) % self.pool_size
        self._record(result, groups)
        return result.loss_tensor()

    def _record(self, result: StepResult, groups: list[ZOGroup]) -> None:
        """Keep the step's projected gradients: ``projected_grads`` are g_k of the first
        trainable group (with its ε); ``projected_grads_per_group[i]`` are those applied to
        ``param_groups[i]`` with its own ε (None for a group without trainable tensors)."""
        zo = self.state["zo"]
        if result.skipped:
            zo["skipped_steps"] += 1
            return
        per_group: list = [None] * len(self.param_groups)
        for g, gk in zip(groups, result.grads):
            if per_group[g.index] is None:
                per_group[g.index] = list(gk)
        zo["projected_grads"] = list(result.grads[0])
        zo["projected_grads_per_group"] = per_group

    # ---- accounting (memory planner, hwsim) ---------------------------------------------
    @classmethod
    def memory_extras(cls, *, trainable_numel: int = 0, dtype_bytes: int = 4,
                      masked_numel: int = 0, largest_masked: int = 0, projected_numel: int = 0,
                      largest_numel: int = 0, **options) -> dict:
        """Persistent bytes beyond the weights for this class with ``options`` (its
        constructor's keywords): the base's kernels and masks, PeZO's pool (4 bytes a
        number), the update rule's buffers (``update_buffers``: momentum one, Adam two per
        trainable number, fp32 or wider) and its transient estimate of the largest tensor
        (``update_scratch``, with ``largest_numel``); ``projected_numel`` is for a class
        that keeps anchors (DiZO adds them)."""
        out = super().memory_extras(trainable_numel=trainable_numel, dtype_bytes=dtype_bytes,
                                    masked_numel=masked_numel, largest_masked=largest_masked)
        opts = cls.zo_options(**options)
        if opts["noise"] == "pool":
            out["pezo_pool"] = 4 * opts["pool_size"]
        out.update(update_bytes(opts["update"], trainable_numel, largest_numel, dtype_bytes))
        return out

    @classmethod
    def rng_accounting(cls, numels: Sequence[int], *, half_numels: Sequence[int] = (),
                       **options) -> dict:
        """Random numbers and Philox blocks one step of this class generates on tensors of
        ``numels`` (in optimizer order; ``half_numels``: the fp16/bf16 ones, which need
        rounding bits with ``stochastic_rounding``), with ``options`` its constructor's
        keywords. See :meth:`rng_budget`."""
        return rng_count(numels, half_numels, cls.zo_options(**options), method=cls.__name__)

    def rng_budget(self) -> dict:
        """What one step generates, counted as the software does it (read by zoengine.hwsim).

        Keys: ``d``, ``n_samples``; ``stream_passes_per_step`` = 4n − 1 passes over z (2n
        perturbations, n − 1 restores, the fused pass's n streams);
        ``numbers_used_per_step`` = d·(4n − 1); ``numbers_generated_per_step``: z values
        generated, whole Philox blocks of 4 (fresh streams) and whole 16,384-number windows
        (adaptive lanes), 0 for the pool; ``numbers_reused_per_step`` = max(0, used −
        generated); ``philox_blocks_per_step``: every Philox4x32 call, including lane numbers
        (one block each), rounding bits and KerZOO's r; ``numbers_generated_once`` /
        ``philox_blocks_once``: the pool; ``pool_stride`` / ``pool_period``; ``lanes``,
        ``window``, ``scalars_per_step``. Counts follow the reference and native kernels.
        """
        groups = self.zo_groups()
        numels = [p.numel() for g in groups for p in g.params]
        half = [p.numel() for g in groups for p in g.params if p.dtype in _HALF]
        opts = {**ZO_DEFAULTS, **self._run_config(), "lanes": self.lanes, "shapes":
                [tuple(p.shape) for g in groups for p in g.params],
                "pool_size": self.pool_size, "scaling": self.scaling,
                "kernel_order": self.kernel_order}
        return rng_count(numels, half, opts, method=type(self).__name__)
