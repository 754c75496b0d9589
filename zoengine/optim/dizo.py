"""DiZO (Tan et al., NeurIPS 2025): divergence-driven layer-wise projections on any ZO step.

Ordinary ZO steps (any configuration of :class:`ZO`) and, every ``interval`` steps, a short
SPSA search over one scalar γ_l per projected tensor, then the projection
θ_l ← θ0_l + γ_l/‖θ_l − θ0_l‖ · (θ_l − θ0_l). research/algorithms.md §2 has the authors' loop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator

import torch

from zoengine.kernels.philox import STREAM_DIZO_ZETA
from zoengine.optim.base import check_float, check_int
from zoengine.optim.estimators import scalar_normal
from zoengine.optim.functional import NonFiniteLossError, loss_value
from zoengine.optim.registry import register_method
from zoengine.optim.zo import ZO

# Which tensors are projected. The authors' code projects k_proj and v_proj of OPT; the paper
# text and its reviewers say query and value. LLaMA uses the same k_proj/v_proj/q_proj names;
# for LoRA every A and B tensor is projected separately (as the code does).
PROJECTED_PRESETS = {
    "code": r"self_attn\.(k_proj|v_proj)\.weight$",
    "paper": r"self_attn\.(q_proj|v_proj)\.weight$",
    "lora": r"lora_[AB]\b",
}


def _projected_regex(projected: str, names: list[str]) -> str:
    if projected == "auto":
        return PROJECTED_PRESETS["lora" if any("lora_" in n for n in names) else "code"]
    return PROJECTED_PRESETS.get(projected, projected)


class DiZO(ZO):
    r"""DiZO: ZO steps plus, every ``interval`` steps, a projection of each selected tensor's
    displacement from its anchor θ0 onto a searched length γ.

    .. math::
        \theta_l \leftarrow \theta^0_l + \frac{\gamma_l}{\lVert \theta_l - \theta^0_l \rVert}
        (\theta_l - \theta^0_l), \qquad
        \gamma_l \in [(1-\tau)\lVert\Delta_l\rVert, (1+\tau)\lVert\Delta_l\rVert]

    γ is searched by SPSA for ``search_iters`` iterations, starting from ‖Δ_l‖, with the
    per-tensor perturbation ε_p·ζ_l clipped to |ε_p ζ_l| <= τ‖Δ_l‖ and the step
    γ_l ← γ_l − α_p‖Δ_l‖ g ζ_l, g = (ℓ₊ − ℓ₋)/(2ε_p).

    Args:
        params: named parameters (names select the projected tensors) or groups with names.
        interval: κ, steps between projections (50).
        proj_eps, proj_lr, clip, search_iters: ε_p (0.1), α_p (2.0), τ (0.2), M (10).
        projected: ``"auto"`` (LoRA A/B if present, else attention k_proj/v_proj as the
            authors' code), ``"code"``, ``"paper"`` (q_proj/v_proj), ``"lora"``, or a regex
            matched against parameter names. An empty selection raises.
        projection_closure: the search's data: a callable returning a fresh closure (bound to
            a fresh batch) per call, or an iterator of such closures. Each closure is evaluated
            twice (at γ ± ε_p ζ). Can be set later as ``opt.projection_closure``.
        **kwargs: any :class:`ZO` option: ``estimator="kernel"`` (KerZOO), ``noise="pool"``
            (PeZO), ``seed``, ``n_samples``, ...

    Memory: one anchor copy of the projected tensors (about 1/6 of an OPT decoder) and one
    scalar per projected tensor; z is never stored.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, interval: int = 50, proj_eps: float = 0.1, proj_lr: float = 2.0,
                 clip: float = 0.2, search_iters: int = 10, projected: str = "auto",
                 projection_closure: Callable | Iterable | None = None, **kwargs):
        self.interval = check_int("interval", interval, low=1)
        self.proj_eps = check_float("proj_eps", proj_eps, low=0.0, strict=True)
        self.proj_lr = check_float("proj_lr", proj_lr, low=0.0, strict=False)
        self.tau = check_float("clip", clip, low=0.0, strict=False)
        if self.tau >= 1.0:
            raise ValueError(f"clip={clip!r}: must be in [0, 1) (ratios lie in [1-clip, 1+clip])")
        self.search_iters = check_int("search_iters", search_iters, low=1)
        super().__init__(params, lr, eps, weight_decay, **kwargs)
        self.projection_closure = projection_closure
        self._select(projected)

    def _select(self, projected: str) -> None:
        if not all("param_names" in g for g in self.param_groups):
            raise ValueError("DiZO selects projected tensors by name: pass "
                             "model.named_parameters() (or groups with 'param_names')")
        names = [n for g in self.param_groups for n in g["param_names"]]
        pattern = _projected_regex(projected, names)
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"projected={projected!r}: not a valid regex ({exc})") from None
        keys = [k for ks in self._group_keys() for k in ks]
        params = [p for g in self.param_groups for p in g["params"]]
        self.projected = [(n, p, k) for n, p, k in zip(names, params, keys)
                          if rx.search(n) and p.requires_grad]
        if not self.projected:
            raise ValueError(f"projected={projected!r} (regex {pattern!r}) matches no trainable "
                             f"parameter; names look like {names[:3]}. Pass a regex that "
                             "selects the tensors to project")
        for _, p, _ in self.projected:
            self.state[p]["dizo_anchor"] = p.detach().clone()
        self.state["zo"]["dizo_gamma"] = [0.0] * len(self.projected)
        self.state["zo"]["dizo_searches"] = 0

    def anchor_bytes(self) -> int:
        """Extra persistent memory: the anchors of the projected tensors."""
        return sum(p.numel() * p.element_size() for _, p, _ in self.projected)

    # ---- projection ---------------------------------------------------------------------
    def _deltas_norms(self) -> list[float]:
        return [float((p.detach().double() - self.state[p]["dizo_anchor"].double()).norm())
                for _, p, _ in self.projected]

    def _scale(self, factors: list[float]) -> None:
        """θ_l ← θ0_l + α_l (θ_l − θ0_l), in place."""
        for (_, p, _), a in zip(self.projected, factors):
            anchor = self.state[p]["dizo_anchor"]
            p.sub_(anchor).mul_(a).add_(anchor)

    def _next_closure(self, m: int) -> Callable:
        src = self.projection_closure
        if src is None:
            raise RuntimeError(
                f"DiZO reached its projection (every interval={self.interval} steps) but has no "
                "projection_closure: pass DiZO(..., projection_closure=fresh_closure) where "
                "fresh_closure() returns a closure bound to a fresh batch, or an iterator of "
                "such closures")
        if isinstance(src, Iterator):
            return next(src)
        if callable(src):
            return src()
        self.projection_closure = iter(src)
        return next(self.projection_closure)

    def _evaluate_at(self, gamma: list[float], ts: list[float], closure: Callable,
                     where: str) -> float:
        alphas = [g / (t + 1e-8) for g, t in zip(gamma, ts)]
        self._scale(alphas)
        try:
            return loss_value(closure(), where)
        finally:  # undo even if the closure raises (not bit-exact: algorithms.md §0.4)
            self._scale([1.0 / a if a != 0 else 0.0 for a in alphas])

    @torch.no_grad()
    def project(self) -> list[float]:
        """Run the γ search and apply the projection; returns the applied ratios γ_l/‖Δ_l‖."""
        zo = self.state["zo"]
        seed, step, tau, eps_p = zo["seed"], zo["step"], self.tau, self.proj_eps
        gamma: list[float] = []
        self.last_draws: list[tuple[float, float]] = []  # (ε_p ζ_l, τ‖Δ_l‖), for inspection
        for m in range(self.search_iters):
            closure = self._next_closure(m)
            ts = self._deltas_norms()
            if m == 0:
                gamma = list(ts)  # re-initialisation: ratio 1
            zeta = []
            for (_, _, key), t in zip(self.projected, ts):
                z = scalar_normal(seed, step, m, STREAM_DIZO_ZETA, key)
                bound = tau * t / eps_p
                zeta.append(max(-bound, min(bound, z)))
                self.last_draws.append((eps_p * zeta[-1], tau * t))
            plus = [g + eps_p * z for g, z in zip(gamma, zeta)]
            minus = [g - eps_p * z for g, z in zip(gamma, zeta)]
            lp = self._evaluate_at(plus, ts, closure, f"DiZO search {m}, γ+εζ")
            lm = self._evaluate_at(minus, ts, closure, f"DiZO search {m}, γ−εζ")
            if not (math.isfinite(lp) and math.isfinite(lm)):
                raise NonFiniteLossError(f"DiZO search {m}: non-finite loss ℓ₊={lp}, ℓ₋={lm}; "
                                         "weights unchanged by the search")
            g = (lp - lm) / (2 * eps_p)
            gamma = [min(max(gl - self.proj_lr * t * g * z, (1 - tau) * t), (1 + tau) * t)
                     for gl, t, z in zip(gamma, ts, zeta)]
        ts = self._deltas_norms()
        ratios = [g / (t + 1e-8) for g, t in zip(gamma, ts)]
        self._scale(ratios)
        zo["dizo_gamma"] = gamma
        zo["dizo_searches"] += 1
        return ratios

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor:
        """One ZO step; after every ``interval``-th step, the projection search."""
        loss = super().step(closure)
        if self.state["zo"]["step"] % self.interval == 0:
            self.project()
        return loss


register_method("dizo", DiZO)
