"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., NeurIPS 2023)."""

from __future__ import annotations

from zoengine.kernels.philox import DISTRIBUTIONS
from zoengine.optim.base import check_choice
from zoengine.optim.docs import shared_docs
from zoengine.optim.registry import register_method
from zoengine.optim.zo import UPDATE_OWN, ZO, ZO_OWN


@shared_docs
class MeZO(ZO):
    r"""Zeroth-order SGD with the in-place SPSA estimator and seeded, never-stored noise.

    .. math::
        g_k &= \frac{\mathcal{L}(\theta + \epsilon z_k) - \mathcal{L}(\theta - \epsilon z_k)}
               {2\epsilon}, \quad z_k \sim \mathcal{N}(0, I_d) \\
        \theta &\leftarrow \theta - \eta \Big(\frac{1}{n}\sum_{k=1}^{n} g_k z_k
               + \lambda\,\theta\Big)

    z_k is regenerated from the noise contract (seed, step, sample k, tensor key, element
    index) each time it is needed: never stored, independent of device, dtype and parameter
    order. A step costs 2n forward passes and 3n passes of noise generation (+ε, −2ε, and a
    fused restore-and-update pass); memory stays at inference level.

    Args:
        {args: params lr eps weight_decay seed n_samples dist backend nonfinite masks}
        {args: stochastic_rounding update momentum betas adam_eps}

    {engine}

    Arithmetic is in max(fp32, parameter dtype): float64 weights are perturbed, restored and
    updated in float64. ``lr``, ``eps`` and ``weight_decay`` are checked at every step (a
    scheduler may change them): finite, lr >= 0, eps > 0, weight_decay >= 0, and θ ± εz must
    stay representable. ``step()`` returns the mean of the 2n loss evaluations as a 0-dim
    tensor of the closure's dtype and device. ``n_samples``, ``dist`` and ``backend`` are
    saved in ``state_dict()`` and a checkpoint made with other values is refused on load.

    Example:
        >>> opt = zoengine.MeZO(model.named_parameters(), lr=1e-6, eps=1e-3, seed=0)
        >>> model.eval()  # both evaluations of a step must see the same function
        >>> for batch in loader:
        ...     loss = opt.step(lambda: model(**batch).loss)
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, seed: int = 0, n_samples: int = 1, dist: str = "normal",
                 backend: str | None = None, nonfinite: str = "raise", masks=None,
                 stochastic_rounding: bool = False, update: str = "sgd", momentum: float = 0.9,
                 betas=(0.9, 0.999), adam_eps: float = 1e-8, **deprecated):
        super().__init__(params, lr, eps, weight_decay,
                         **self.zo_options(dist=dist, seed=seed, n_samples=n_samples,
                                           backend=backend, nonfinite=nonfinite, masks=masks,
                                           stochastic_rounding=stochastic_rounding,
                                           update=update, momentum=momentum, betas=betas,
                                           adam_eps=adam_eps),
                         **deprecated)

    def hyperparameters(self) -> dict:
        """As :class:`ZO`'s, in MeZO's terms: ``dist`` instead of ZO's source and estimator
        options."""
        h = super().hyperparameters()
        for k in ZO_OWN:
            if k not in UPDATE_OWN:  # the update rule is MeZO's too (MeZO-momentum, -Adam)
                h.pop(k)
        return {**h, "dist": self.noise}

    @classmethod
    def zo_options(cls, *, dist: str = "normal", **options) -> dict:
        """MeZO's keywords in ZO's terms: ``noise=dist`` (a contract distribution),
        ``estimator="spsa"``."""
        check_choice("dist", dist, DISTRIBUTIONS)
        return super().zo_options(noise=dist, estimator="spsa", **options)


register_method("mezo", MeZO)
# LOZO: MeZO with low-rank noise U·Vᵀ/√r on every 2-D weight (docs/lowrank.md)
register_method("mezo-lowrank", ZO, noise="lowrank")
