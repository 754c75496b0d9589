"""Sparse-MeZO (Liu et al. 2024, arXiv 2402.15751): MeZO that perturbs and updates only the
small-magnitude weights of each tensor, on zoengine's noise contract."""

from __future__ import annotations

from collections.abc import Callable

import torch

from zoengine.kernels.philox import DISTRIBUTIONS
from zoengine.optim.base import check_choice, check_float
from zoengine.optim.docs import shared_docs
from zoengine.optim.functional import ZOGroup
from zoengine.optim.masks import LazyMask, pack_mask, unpack_mask
from zoengine.optim.registry import register_method
from zoengine.optim.zo import ZO, ZO_OWN

THRESHOLD_MODES = ("once", "step")
THRESHOLD = "sparse_mezo_threshold"  # per-parameter state key of h (threshold="once")


def magnitude_threshold(p: torch.Tensor, sparsity: float, live: torch.Tensor | None = None):
    """h: the k-th smallest |θ| among ``live`` elements (all when None), k = round((1 −
    sparsity)·n_live) clamped to [1, n_live]; None when no element is live. A 0-dim tensor of
    p's dtype (one of the |θ| values, so exact in it)."""
    a = p.detach().abs().reshape(-1)
    if live is not None:
        a = a[live.reshape(-1)]
    n = a.numel()
    if n == 0:
        return None
    k = min(n, max(1, round((1.0 - sparsity) * n)))
    return torch.kthvalue(a.float() if a.dtype in (torch.float16, torch.bfloat16) else a,
                          k).values.to(p.dtype)


@shared_docs
class SparseMeZO(ZO):
    r"""Sparse-MeZO: MeZO on the weights whose magnitude is at most a per-tensor threshold.

    .. math::
        m = \mathbb{1}[\,|\theta| \le h\,],\quad \hat z = m \odot z, \qquad
        g = \frac{\mathcal{L}(\theta + \epsilon \hat z) - \mathcal{L}(\theta - \epsilon \hat z)}
                 {2\epsilon}, \qquad
        \theta \leftarrow \theta - \eta\,(g\,\hat z + \lambda\, m \odot \theta)

    h of a tensor is its k-th smallest |θ| with k = round((1 − ``sparsity``)·n): the
    ``1 − sparsity`` fraction of smallest-magnitude weights is trained, the rest stay fixed
    (ties at h are all trained). ``threshold="once"`` (default) fixes h from the weights at
    construction (the paper stores one threshold per layer and computes the mask from the
    current weights on the fly); ``"step"`` recomputes h at every step. Either way the mask
    of a step is computed from θ at the step's start and fixed for its 2n evaluations and
    update; it is AND-ed with ``masks=`` (a masked element never moves, and the quantile is
    taken over the elements ``masks`` keeps). The step mask is held as bits (d/8 bytes) for
    the step only, one tensor unpacked at a time; h is in ``state_dict()``.

    Args:
        {args: params lr eps weight_decay}
        sparsity (float): fraction of each tensor held fixed, in [0, 1) (default 0.75; 0 is
            MeZO).
        threshold (str): ``"once"`` or ``"step"`` (when h is computed; above).
        {args: seed n_samples dist backend nonfinite masks stochastic_rounding}

    {engine}

    Example:
        >>> opt = zoengine.SparseMeZO(model.named_parameters(), lr=1e-6, sparsity=0.75)
        >>> loss = opt.step(lambda: model(**batch).loss)
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, sparsity: float = 0.75, threshold: str = "once", dist: str = "normal",
                 seed: int = 0, n_samples: int = 1, backend: str | None = None,
                 nonfinite: str = "raise", masks=None, stochastic_rounding: bool = False,
                 **kwargs):
        check_float("sparsity", sparsity, low=0.0, strict=False)
        if not sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity!r}: must be in [0, 1) (the fraction of each "
                             "tensor held fixed; 1 would train nothing)")
        check_choice("threshold", threshold, THRESHOLD_MODES)
        check_choice("dist", dist, DISTRIBUTIONS)
        self.sparsity, self.threshold = float(sparsity), threshold
        self._step_bits: dict[int, torch.Tensor] | None = None
        super().__init__(params, lr, eps, weight_decay, noise=dist, estimator="spsa",
                         seed=seed, n_samples=n_samples, backend=backend, nonfinite=nonfinite,
                         masks=masks, stochastic_rounding=stochastic_rounding, **kwargs)
        if threshold == "once":
            for p in self._trainable():
                h = magnitude_threshold(p, self.sparsity, self._live(p))
                if h is not None:
                    self.state[p][THRESHOLD] = h

    def hyperparameters(self) -> dict:
        """As :class:`ZO`'s, in Sparse-MeZO's terms: ``dist``, ``sparsity``, ``threshold``."""
        h = super().hyperparameters()
        for k in ZO_OWN:
            h.pop(k, None)
        return {**h, "dist": self.noise, "sparsity": self.sparsity, "threshold": self.threshold}

    def _run_config(self) -> dict:
        return {**super()._run_config(), "sparsity": self.sparsity, "threshold": self.threshold}

    # ---- the step's mask ----------------------------------------------------------------
    def _trainable(self):
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _live(self, p) -> torch.Tensor | None:
        bits = self._mask_bits(p)
        return None if bits is None else unpack_mask(bits, p.shape)

    def step_mask(self, p: torch.Tensor) -> torch.Tensor:
        """The bool mask a step starting now trains on for ``p``: |θ| <= h, AND ``masks=``."""
        live = self._live(p)
        if self.threshold == "once":
            h = self.state[p].get(THRESHOLD) if p in self.state else None
        else:
            h = magnitude_threshold(p, self.sparsity, live)
        if h is None:
            return torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        m = p.detach().abs() <= h.to(p.device)
        return m if live is None else m & live

    def zo_groups(self) -> list[ZOGroup]:
        """The base's groups; during a step, one group per tensor whose mask is the step's
        (unpacked from bits when a kernel reads it)."""
        groups = super().zo_groups()
        bits = self._step_bits
        if bits is None:
            return groups
        out = []
        for g in groups:
            for i, (p, k) in enumerate(zip(g.params, g.keys)):
                out.append(ZOGroup(params=[p], keys=[k], lr=g.lr, eps=g.eps,
                                   weight_decay=g.weight_decay, index=g.index,
                                   masks=LazyMask(bits[id(p)], p.shape),
                                   offsets=[g.offsets[i]] if g.offsets else None))
        return out

    def _zo_step(self, closure: Callable, exchange=None) -> torch.Tensor:
        # the mask is fixed for the whole step: computed from θ before any perturbation
        self._step_bits = {id(p): pack_mask(self.step_mask(p)) for p in self._trainable()}
        try:
            return super()._zo_step(closure, exchange)
        finally:
            self._step_bits = None

    # ---- accounting ---------------------------------------------------------------------
    @classmethod
    def memory_extras(cls, *, trainable_numel: int = 0, dtype_bytes: int = 4,
                      largest_numel: int = 0, **options) -> dict:
        """The base's, plus the step's mask bits (d/8 bytes, for the step only) and, for one
        tensor at a time, its unpacked bool mask and |θ| (``largest_numel``: the largest
        trainable tensor's elements)."""
        out = super().memory_extras(trainable_numel=trainable_numel, dtype_bytes=dtype_bytes,
                                    **options)
        out["sparse_mezo_masks"] = (trainable_numel + 7) // 8 + largest_numel * (1 + dtype_bytes)
        return out

    @classmethod
    def zo_options(cls, *, dist: str = "normal", **options) -> dict:
        options.pop("sparsity", None)
        options.pop("threshold", None)
        return super().zo_options(noise=dist, estimator="spsa", **options)


register_method("sparse-mezo", SparseMeZO)
