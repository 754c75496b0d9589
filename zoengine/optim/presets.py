"""KerZOO and PeZO: thin presets over :class:`zoengine.optim.zo.ZO`."""

from __future__ import annotations

from zoengine.optim.base import check_choice
from zoengine.optim.docs import shared_docs
from zoengine.optim.registry import register_method
from zoengine.optim.updates import ZO_BENCH_NAMES
from zoengine.optim.zo import NOISES, ZO

REUSE_MODES = ("pool", "rotate", None)


@shared_docs
class KerZOO(ZO):
    r"""KerZOO (Mi et al. 2025): kernel-weighted two-point estimator that cancels the ε² bias.

    .. math::
        g = \frac{\mathcal{L}(\theta+\epsilon r u) - \mathcal{L}(\theta-\epsilon r u)}{2\epsilon}
            K_a(r), \quad r \sim U[-a, a],\ u \sim \mathcal{N}(0, I), \qquad
        \theta \leftarrow \theta - \eta\, g\, u

    Args:
        {args: params lr eps weight_decay kernel_order r_range clip dist}
        Other keyword arguments as :class:`ZO` (``seed``, ``n_samples``, ``backend``, ...).

    {engine}

    Example:
        >>> opt = zoengine.KerZOO(model.named_parameters(), lr=1e-6, eps=1e-3, kernel_order=3)
        >>> loss = opt.step(lambda: model(**batch).loss)
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, kernel_order: int | None = 3, r_range: float = 1.0,
                 clip: float | None = None, dist: str = "normal", **kwargs):
        super().__init__(params, lr, eps, weight_decay,
                         **self.zo_options(dist=dist, kernel_order=kernel_order,
                                           r_range=r_range, clip=clip, **kwargs))

    def hyperparameters(self) -> dict:
        """As :class:`ZO`'s, in KerZOO's terms: ``dist`` instead of ``noise``/``estimator``."""
        h = super().hyperparameters()
        del h["noise"], h["estimator"]
        return {**h, "dist": self.noise}

    @classmethod
    def zo_options(cls, *, dist: str = "normal", **options) -> dict:
        """KerZOO's keywords in ZO's terms: ``noise=dist``, ``estimator="kernel"``."""
        if not (isinstance(dist, str) and dist.startswith("hw:")):
            check_choice("dist", dist, NOISES + ("hw:<generator spec>",))
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
