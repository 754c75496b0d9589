"""KerZOO and PeZO: thin presets over :class:`zoengine.optim.zo.ZO`."""

from __future__ import annotations

import math
import warnings

from zoengine.optim.base import check_choice, check_float
from zoengine.optim.docs import shared_docs
from zoengine.optim.estimators import (
    check_r_schedule,
    clip_value,
    kernel_moments,
    kernel_weight,
    scalar_uniform,
    scheduled_r_range,
)
from zoengine.optim.registry import register_method
from zoengine.optim.updates import ZO_BENCH_NAMES
from zoengine.optim.zo import NOISES, ZO

REUSE_MODES = ("pool", "rotate", None)


DEFAULT_LR = 1e-6  # MeZO's full-parameter lr, and the KerZOO README's


def default_lr_warning(order: int, r_range: float, rescale: bool) -> str:
    """The warning of ``KerZOO(lr=None)``: the default lr and the kernel's variance factor."""
    m = kernel_moments(order, r_range, rescale=rescale)
    factor, gain = m["E[r2K2]"], m["E[rK]"]
    reading = "K_a(r) = K(r/a)/a" if rescale else "the unscaled K(r)"
    scale = "" if gain == 1 else (f", and its mean by E[rK] = {float(gain):.4g} (so the "
                                  "effective lr is lr·E[rK])")
    return (f"KerZOO: lr not given, using {DEFAULT_LR:g} (MeZO's default and the KerZOO "
            f"README's). The order-{order} kernel ({reading}, r ~ U(-{r_range:g}, "
            f"{r_range:g})) multiplies the estimator's second moment by E[r²K²] = "
            f"{float(factor):.4g}{scale}: a learning rate tuned for MeZO may diverge; the "
            f"same stability margin is at MeZO's lr · E[rK]/E[r²K²] = MeZO's lr / "
            f"{float(factor / gain):.3g}. Pass lr= to choose it and silence this warning")


def check_unscaled_gain(order: int, r_range: float) -> None:
    """Refuse an unscaled kernel whose E[rK] <= 0 on U(-a, a): its expected step climbs the
    loss. Only order 3 can (E[rK] = (25/4)a² − (21/4)a⁴, zero at a = √(25/21) ≈ 1.091);
    E[rK]/a² decreases in a, so a shrinking schedule stays positive when r_range is."""
    gain = kernel_moments(order, r_range, rescale=False)["E[rK]"]
    if gain <= 0:
        raise ValueError(f"r_range={r_range!r} with rescale_kernel=False: the unscaled "
                         f"order-{order} kernel has E[rK] = {float(gain):.4g} <= 0 on U(-a, a), "
                         "so the expected update climbs the loss; must be r_range < "
                         f"{math.sqrt(25 / 21):.4f} for order 3 (or rescale_kernel=True)")


@shared_docs
class KerZOO(ZO):
    r"""KerZOO (Mi et al. 2025): kernel-weighted two-point estimator that cancels the ε² bias.

    .. math::
        g = \frac{\mathcal{L}(\theta+\epsilon r u) - \mathcal{L}(\theta-\epsilon r u)}{2\epsilon}
            K_a(r), \quad r \sim U[-a, a],\ u \sim \mathcal{N}(0, I), \qquad
        \theta \leftarrow \theta - \eta\, g\, u

    Args:
        {args: params lr}
            Not given (None): 1e-6 with a ``UserWarning`` that states the kernel's variance
            factor E[r²K²] (25/4 for order 3): pass ``lr`` to choose it.
        {args: eps weight_decay kernel_order r_range}
        rescale_kernel (bool): True (default): weight K_a(r) = K(r/a)/a, so E[rK] = 1 and
            E[r³K] = 0 for every a; False: the unscaled kernel K(r) at r ~ U(-a, a) (for
            a ≠ 1, E[rK] ≠ 1 and E[r³K] ≠ 0: ``kernel_moments``, docs/methods/kerzoo.md).
        r_schedule (tuple, optional): None (a = ``r_range`` throughout) or ``(kind, a_end,
            steps)``: a shrinks from ``r_range`` to ``a_end`` over ``steps`` steps,
            ``"linear"`` or ``"cosine"``, then stays at ``a_end``; a pure function of the
            step (``scheduled_r_range``), saved by ``state_dict()``.
        {args: clip dist}
        Other keyword arguments as :class:`ZO` (``seed``, ``n_samples``, ``backend``, ...).

    {engine}

    Example:
        >>> opt = zoengine.KerZOO(model.named_parameters(), lr=1e-6, eps=1e-3, kernel_order=3)
        >>> loss = opt.step(lambda: model(**batch).loss)
    """

    def __init__(self, params, lr: float | None = None, eps: float = 1e-3,
                 weight_decay: float = 0.0, *, kernel_order: int | None = 3,
                 r_range: float = 1.0, rescale_kernel: bool = True, r_schedule=None,
                 clip: float | None = None, dist: str = "normal", **kwargs):
        if not isinstance(rescale_kernel, bool):
            raise ValueError(f"rescale_kernel={rescale_kernel!r}: must be True or False")
        self.rescale_kernel = rescale_kernel
        self.r_schedule = check_r_schedule(r_schedule, check_float("r_range", r_range,
                                                                   low=0.0, strict=True))
        if self.r_schedule is not None and kernel_order is None:
            raise ValueError(f"r_schedule={r_schedule!r} with kernel_order=None: r ≡ 1, "
                             "there is no range to schedule; pass kernel_order 1, 3 or 5")
        if not rescale_kernel and kernel_order in (1, 3, 5):
            check_unscaled_gain(kernel_order, r_range)
        if lr is None:
            lr = DEFAULT_LR
            if kernel_order in (1, 3, 5):
                warnings.warn(default_lr_warning(kernel_order, r_range, rescale_kernel),
                              UserWarning, stacklevel=2)
        super().__init__(params, lr, eps, weight_decay,
                         **self.zo_options(dist=dist, kernel_order=kernel_order,
                                           r_range=r_range, clip=clip, **kwargs))

    def hyperparameters(self) -> dict:
        """As :class:`ZO`'s, in KerZOO's terms: ``dist`` instead of ``noise``/``estimator``."""
        h = super().hyperparameters()
        del h["noise"], h["estimator"]
        schedule = None if self.r_schedule is None else list(self.r_schedule)
        return {**h, "dist": self.noise, "rescale_kernel": self.rescale_kernel,
                "r_schedule": schedule}

    def _run_config(self) -> dict:
        cfg = super()._run_config()  # the defaults stay absent: older checkpoints still load
        if not self.rescale_kernel:
            cfg["rescale_kernel"] = False
        if self.r_schedule is not None:
            cfg["r_schedule"] = list(self.r_schedule)
        return cfg

    def r_range_at(self, step: int) -> float:
        """a of r ~ U(-a, a) at ``step`` (0-based): ``r_range``, or the schedule's value."""
        return scheduled_r_range(self.r_range, self.r_schedule, step)

    def _estimator_hooks(self, seed: int, step: int):
        if self.kernel_order is None:
            return super()._estimator_hooks(seed, step)
        a, order = self.r_range_at(step), self.kernel_order
        scale = a if self.rescale_kernel else 1.0  # K_a(r) = K(r/a)/a, or K(r) itself
        radii = {}

        def radius(k: int) -> float:
            radii[k] = a * scalar_uniform(seed, step, k)
            return radii[k]

        def project(k: int, g: float) -> float:
            return clip_value(g * kernel_weight(radii[k], order, scale), self.clip)

        return radius, project

    @classmethod
    def zo_options(cls, *, dist: str = "normal", **options) -> dict:
        """KerZOO's keywords in ZO's terms: ``noise=dist``, ``estimator="kernel"``."""
        if not (isinstance(dist, str) and dist.startswith("hw:")):
            check_choice("dist", dist, NOISES + ("hw:<generator spec>",))
        for own in ("rescale_kernel", "r_schedule"):  # KerZOO's own: not ZO's
            options.pop(own, None)
        return super().zo_options(noise=dist, estimator="kernel", **options)


@shared_docs
class PeZO(ZO):
    r"""PeZO (Tan et al. 2025): uniform perturbations with random-number reuse.

    ``reuse="pool"``: N numbers Q drawn once; z[j] = c·Q[(p + j) mod N] (c the scale), the
    pointer p advancing by a stride coprime with N per perturbation (below).
    ``reuse="rotate"``: ``lanes`` generators, coordinate i of block b from lane (i + b) mod
    n. ``reuse=None``: fresh uniforms every pass. ``scaling="adaptive"`` makes the numbers
    actually used unit-RMS (c = 1/RMS pool-wide, or per window of coordinates); ``"static"``
    multiplies U(-1, 1) by √3. Either way E[(∇Lᵀz)z] = ∇L.

    Pool pointer: sample k of a step starts at p + k·s and p advances by n·s per step, with
    s = ``pool_stride(d, N)`` the smallest integer >= d coprime with N (d itself when
    gcd(d, N) = 1): N consecutive perturbations start at N distinct offsets, so the mean
    estimate over a run averages the whole pool (docs/methods/pezo.md). The pointer is in
    ``state_dict()``; ``reuse``, ``pool_size``, ``lanes`` and ``scaling`` are checked on load.

    Args:
        {args: params lr eps weight_decay}
        dist (str): ``"uniform"`` (the only choice: PeZO's hardware-friendly distribution).
        reuse (str, optional): ``"pool"`` (default), ``"rotate"`` or None (fresh numbers).
        {args: pool_size lanes scaling}
        Other keyword arguments as :class:`ZO` (``seed``, ``n_samples``, ``backend``, ...).

    {engine}

    Example:
        >>> opt = zoengine.PeZO(model.parameters(), lr=1e-6, reuse="pool", pool_size=1 << 16)
        >>> opt.rng_budget()["numbers_generated_per_step"]
        0
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, dist: str = "uniform", reuse: str | None = "pool", pool_size: int = 1 << 16,
                 lanes: int = 64, scaling: str = "adaptive", **kwargs):
        super().__init__(params, lr, eps, weight_decay,
                         **self.zo_options(dist=dist, reuse=reuse, pool_size=pool_size,
                                           lanes=lanes, scaling=scaling, **kwargs))
        self.reuse, self._lanes = reuse, lanes  # reuse=None may run as noise="rotate", lanes=1

    def hyperparameters(self) -> dict:
        """As :class:`ZO`'s, in PeZO's terms: ``reuse`` (and the ``lanes`` given) instead of
        ``noise``."""
        h = super().hyperparameters()
        del h["noise"]
        return {**h, "dist": "uniform", "reuse": self.reuse, "lanes": self._lanes}

    @classmethod
    def zo_options(cls, *, dist: str = "uniform", reuse: str | None = "pool",
                   lanes: int = 64, scaling: str = "adaptive", **options) -> dict:
        """PeZO's keywords in ZO's terms: ``reuse`` becomes ``noise`` (None: fresh uniforms,
        or the windowed single lane for adaptive scaling)."""
        check_choice("reuse", reuse, REUSE_MODES)
        check_choice("dist", dist, ("uniform",))
        if reuse is None:  # fresh numbers; adaptive scaling needs the windowed single lane
            noise, lanes = ("uniform", lanes) if scaling == "static" else ("rotate", 1)
        else:
            noise = reuse
        return super().zo_options(noise=noise, lanes=lanes, scaling=scaling, **options)


register_method("zo", ZO)
register_method("kerzoo", KerZOO)
register_method("pezo", PeZO)
register_method("pezo-rotate", PeZO, reuse="rotate")
register_method("kerzoo+pezo", ZO, noise="pool", estimator="kernel")
for _name, _update in ZO_BENCH_NAMES.items():  # ZO-Bench's optimizers, by its names
    register_method(_name, ZO, update=_update)
