"""KerZOO and PeZO: thin presets over :class:`zoengine.optim.zo.ZO`."""

from __future__ import annotations

from zoengine.optim.base import check_choice
from zoengine.optim.registry import register_method
from zoengine.optim.zo import ZO

REUSE_MODES = ("pool", "rotate", None)


class KerZOO(ZO):
    r"""KerZOO (Mi et al. 2025): kernel-weighted two-point estimator that cancels the ε² bias.

    .. math::
        g = \frac{\mathcal{L}(\theta+\epsilon r u) - \mathcal{L}(\theta-\epsilon r u)}{2\epsilon}
            K_a(r), \quad r \sim U[-a, a],\ u \sim \mathcal{N}(0, I), \qquad
        \theta \leftarrow \theta - \eta\, g\, u

    Args:
        kernel_order: 1, 3 (default) or 5; None gives r ≡ 1, K ≡ 1 (exactly MeZO).
        r_range: a (the README recommends 1/2; the paper form is 1).
        clip: optional bound on |g|.
        Other arguments as :class:`ZO`; ``dist`` picks u's distribution.

    Example:
        >>> opt = zoengine.KerZOO(model.named_parameters(), lr=1e-6, eps=1e-3, kernel_order=3)
        >>> loss = opt.step(lambda: model(**batch).loss)
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, kernel_order: int | None = 3, r_range: float = 1.0,
                 clip: float | None = None, dist: str = "normal", **kwargs):
        super().__init__(params, lr, eps, weight_decay, noise=dist, estimator="kernel",
                         kernel_order=kernel_order, r_range=r_range, clip=clip, **kwargs)


class PeZO(ZO):
    r"""PeZO (Tan et al. 2025): uniform perturbations with random-number reuse.

    ``reuse="pool"``: N numbers drawn once; z[j] = s·Q[(p + j) mod N], the pointer p advancing
    by d per perturbation. ``reuse="rotate"``: ``lanes`` generators, coordinate i of block c
    from lane (i + c) mod n. ``reuse=None``: fresh uniforms every pass. ``scaling="adaptive"``
    makes the numbers actually used unit-RMS (pool-wide, or per window of coordinates);
    ``"static"`` multiplies U(-1, 1) by √3. Either way E[(∇Lᵀz)z] = ∇L.

    Example:
        >>> opt = zoengine.PeZO(model.parameters(), lr=1e-6, reuse="pool", pool_size=1 << 16)
        >>> opt.rng_budget()["numbers_generated_per_step"]
        0
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, dist: str = "uniform", reuse: str | None = "pool", pool_size: int = 1 << 16,
                 lanes: int = 64, scaling: str = "adaptive", **kwargs):
        check_choice("reuse", reuse, REUSE_MODES)
        check_choice("dist", dist, ("uniform",))
        if reuse is None:  # fresh numbers; adaptive scaling needs the windowed single lane
            noise, lanes = ("uniform", lanes) if scaling == "static" else ("rotate", 1)
        else:
            noise = reuse
        super().__init__(params, lr, eps, weight_decay, noise=noise, pool_size=pool_size,
                         lanes=lanes, scaling=scaling, **kwargs)


register_method("zo", ZO)
register_method("kerzoo", KerZOO)
register_method("pezo", PeZO)
register_method("pezo-rotate", lambda params, **kw: PeZO(params, reuse="rotate", **kw))
register_method("kerzoo+pezo",
                lambda params, **kw: ZO(params, noise="pool", estimator="kernel", **kw))
