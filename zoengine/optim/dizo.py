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
# for LoRA every A and B tensor is projected separately (as the code does). "all" projects every
# trainable tensor (e.g. a classification head trained alone): anchors = a copy of them all, so
# "auto" never falls back to it silently.
PROJECTED_PRESETS = {
    "code": r"self_attn\.(k_proj|v_proj)\.weight$",
    "paper": r"self_attn\.(q_proj|v_proj)\.weight$",
    "lora": r"lora_[AB]\b",
    "all": r"",
}


NORM_CHUNK = 1 << 22  # elements per float64 slice of delta_norm: 32 MB of temporaries


def delta_norm(p: torch.Tensor, anchor: torch.Tensor, chunk: int = NORM_CHUNK) -> float:
    """‖p − anchor‖₂ accumulated in float64 over slices of ``chunk`` elements: the same number
    as a whole-tensor float64 norm to rounding, without two float64 copies of a tensor that
    may hold more than 2^31 elements (17 GB each at 2^31)."""
    a, b = p.detach().reshape(-1), anchor.reshape(-1)
    total = 0.0
    for s in range(0, a.numel(), chunk):
        d = a[s:s + chunk].double() - b[s:s + chunk].double()
        total += float(d.dot(d))
    return total ** 0.5


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
            authors' code), ``"code"``, ``"paper"`` (q_proj/v_proj), ``"lora"``, ``"all"``
            (every trainable tensor, e.g. a head trained alone), or a regex matched against
            parameter names. An empty selection raises.
        projection_closure: the search's data, one of
            (a) a factory: ``fresh()`` returns a new loss closure bound to a fresh batch, called
            once per search iteration;
            (b) a plain loss closure: ``closure()`` returns the loss (tensor or float); every
            iteration evaluates it as is (fresh data only if it draws a batch itself);
            (c) an iterator (or iterable) of loss closures, one per iteration.
            (a) and (b) are told apart by what the first call returns: a callable means a
            factory, a scalar loss means a plain closure (that first loss, taken at the
            unprojected weights, is discarded: one extra forward pass per run). Each closure
            is evaluated twice per iteration (at γ ± ε_p ζ). Can be set later as
            ``opt.projection_closure``.
        exact_restore: keep a copy of the projected tensors during a search so every
            evaluation puts the weights back bit-exactly (True, default; transient memory = the
            anchors' size), or undo by the inverse scaling as the authors' code (False; no
            copy, restores to rounding).

    Non-finite losses in the search follow ``nonfinite``: ``"raise"`` raises
    :class:`NonFiniteLossError` (weights restored); ``"skip"`` drops that iteration (γ
    unchanged, ``state["zo"]["dizo_skipped_iters"]`` counts it). A projection is never lost: it
    stays due (``state["zo"]["dizo_pending"]``) until a search with at least one finite
    iteration is applied, so a search whose iterations were all skipped, or that raised, is
    retried after the next step.
        **kwargs: any :class:`ZO` option: ``estimator="kernel"`` (KerZOO), ``noise="pool"``
            (PeZO), ``seed``, ``n_samples``, ...

    Memory: one anchor copy of the projected tensors (about 1/6 of an OPT decoder) and one
    scalar per projected tensor; z is never stored. During a search (``exact_restore=True``),
    one more transient copy of the projected tensors.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, interval: int = 50, proj_eps: float = 0.1, proj_lr: float = 2.0,
                 clip: float = 0.2, search_iters: int = 10, projected: str = "auto",
                 projection_closure: Callable | Iterable | None = None,
                 exact_restore: bool = True, **kwargs):
        self.interval = check_int("interval", interval, low=1)
        self.proj_eps = check_float("proj_eps", proj_eps, low=0.0, strict=True)
        self.proj_lr = check_float("proj_lr", proj_lr, low=0.0, strict=False)
        self.tau = check_float("clip", clip, low=0.0, strict=False)
        if self.tau >= 1.0:
            raise ValueError(f"clip={clip!r}: must be in [0, 1) (ratios lie in [1-clip, 1+clip])")
        self.search_iters = check_int("search_iters", search_iters, low=1)
        if not isinstance(exact_restore, bool):
            raise ValueError(f"exact_restore={exact_restore!r}: must be True or False")
        self.exact_restore = exact_restore
        super().__init__(params, lr, eps, weight_decay, **kwargs)
        self.projection_closure = projection_closure
        self._closure_kind: tuple = (None, None)  # (source, "factory" | "loss"), see _next_closure
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
                             f"parameter; names look like {names[:3]}. Pass projected= a "
                             "preset ('code', 'paper', 'lora', 'all': every trainable tensor) "
                             "or a regex that selects the tensors to project")
        for _, p, _ in self.projected:
            self.state[p]["dizo_anchor"] = p.detach().clone()
        self.state["zo"]["dizo_gamma"] = [0.0] * len(self.projected)
        self.state["zo"].update(dizo_searches=0, dizo_skipped_iters=0, dizo_pending=False)

    def anchor_bytes(self) -> int:
        """Extra persistent memory: the anchors of the projected tensors."""
        return sum(p.numel() * p.element_size() for _, p, _ in self.projected)

    @classmethod
    def memory_extras(cls, *, projected_numel: int = 0, dtype_bytes: int = 4,
                      exact_restore: bool = True, **options) -> dict:
        """ZO's extras, the anchors (ZO adds them for a class with ``anchor_bytes``) and, with
        ``exact_restore`` (the default), the copy of the projected tensors a search keeps."""
        out = super().memory_extras(projected_numel=projected_numel, dtype_bytes=dtype_bytes,
                                    **options)
        if exact_restore and projected_numel:
            out["dizo_search_copy"] = projected_numel * dtype_bytes
        return out

    def rng_budget(self) -> dict:
        """ZO's count plus the search's draws: one Philox block per projected tensor per
        iteration (ζ_l), ``search_iters`` iterations every ``interval`` steps."""
        out = super().rng_budget()
        per_search = len(self.projected) * self.search_iters
        out.update(dizo_philox_blocks_per_search=per_search,
                   dizo_searches_per_step=1.0 / self.interval)
        return out

    def _run_config(self) -> dict:
        """ZO's run configuration plus DiZO's (saved in state_dict, checked on load)."""
        return {**super()._run_config(), "dizo.interval": self.interval,
                "dizo.proj_eps": self.proj_eps, "dizo.proj_lr": self.proj_lr,
                "dizo.clip": self.tau, "dizo.search_iters": self.search_iters,
                "dizo.projected": [n for n, _, _ in self.projected],
                "dizo.exact_restore": self.exact_restore}

    # ---- projection ---------------------------------------------------------------------
    def _deltas_norms(self) -> list[float]:
        return [delta_norm(p, self.state[p]["dizo_anchor"]) for _, p, _ in self.projected]

    def _scale(self, factors: list[float]) -> None:
        """θ_l ← θ0_l + α_l (θ_l − θ0_l), in place."""
        for (_, p, _), a in zip(self.projected, factors):
            anchor = self.state[p]["dizo_anchor"]
            p.sub_(anchor).mul_(a).add_(anchor)

    def _next_closure(self) -> Callable:
        """The loss closure of the next search iteration, from ``projection_closure``."""
        src = self.projection_closure
        if src is None:
            raise RuntimeError(
                f"DiZO reached its projection (every interval={self.interval} steps) but has no "
                "projection_closure: pass DiZO(..., projection_closure=fresh_closure) where "
                "fresh_closure() returns a closure bound to a fresh batch (or a plain loss "
                "closure, or an iterator of closures)")
        if not callable(src):
            if not isinstance(src, Iterator):
                src = self.projection_closure = iter(src)
            try:
                out = next(src)
            except StopIteration:
                raise RuntimeError("DiZO's projection_closure iterator is exhausted: the search "
                                   "needs one closure per iteration") from None
            if not callable(out):
                raise TypeError(f"projection_closure yielded a {type(out).__name__}; an "
                                "iterator must yield loss closures (e.g. lambda: model(**b).loss)")
            return self.tap(out)
        # == (not is): a bound method is a new object on every attribute access
        kind = self._closure_kind[1] if self._closure_kind[0] == src else None
        if kind == "loss":
            return self.tap(src)
        out = src()  # a factory returns a closure; a plain closure returns the loss
        if callable(out):
            self._closure_kind = (src, "factory")
            return self.tap(out)
        loss_value(out, "DiZO projection_closure()")  # neither a closure nor a loss: say so
        self._closure_kind = (src, "loss")
        return self.tap(src)

    def _evaluate_at(self, gamma: list[float], ts: list[float], saved: list | None,
                     closure: Callable, where: str) -> float:
        """The loss at θ0_l + γ_l/‖Δ_l‖·Δ_l; the weights are put back afterwards (also when the
        closure raises): bit-exactly from ``saved``, else by the inverse scaling."""
        alphas = [g / (t + 1e-8) for g, t in zip(gamma, ts)]
        self._scale(alphas)
        try:
            return loss_value(closure(), where)
        finally:
            if saved is not None:
                for (_, p, _), s in zip(self.projected, saved):
                    p.copy_(s)
            else:  # not bit-exact (algorithms.md §0.4), as the authors' code
                self._scale([1.0 / a if a != 0 else 0.0 for a in alphas])

    def _search_iteration(self, m: int, gamma: list[float], ts: list[float],
                          saved: list | None) -> list[float] | None:
        """One SPSA iteration on γ; None if a loss was non-finite and ``nonfinite="skip"``."""
        zo = self.state["zo"]
        seed, step, tau, eps_p = zo["seed"], zo["step"], self.tau, self.proj_eps
        closure = self._next_closure()
        zeta = []
        for (_, _, key), t in zip(self.projected, ts):
            z = scalar_normal(seed, step, m, STREAM_DIZO_ZETA, key)
            bound = tau * t / eps_p
            zeta.append(max(-bound, min(bound, z)))
            self.last_draws.append((eps_p * zeta[-1], tau * t))
        plus = [g + eps_p * z for g, z in zip(gamma, zeta)]
        minus = [g - eps_p * z for g, z in zip(gamma, zeta)]
        lp = self._evaluate_at(plus, ts, saved, closure, f"DiZO search {m}, γ+εζ")
        lm = (self._evaluate_at(minus, ts, saved, closure, f"DiZO search {m}, γ−εζ")
              if math.isfinite(lp) else float("nan"))  # one NaN decides: spare a forward
        if not (math.isfinite(lp) and math.isfinite(lm)):
            if self.nonfinite == "skip":
                zo["dizo_skipped_iters"] = zo.get("dizo_skipped_iters", 0) + 1
                return None
            raise NonFiniteLossError(
                f"DiZO search {m} at step {step}: non-finite loss ℓ₊={lp}, ℓ₋={lm}; weights "
                "restored, the projection stays due (retried after the next step)")
        g = (lp - lm) / (2 * eps_p)
        return [min(max(gl - self.proj_lr * t * g * z, (1 - tau) * t), (1 + tau) * t)
                for gl, t, z in zip(gamma, ts, zeta)]

    @torch.no_grad()
    def project(self) -> list[float] | None:
        """Run the γ search and apply the projection; returns the applied ratios γ_l/‖Δ_l‖.

        Returns None, weights untouched, when every search iteration was skipped
        (``nonfinite="skip"``): the projection stays due (``state["zo"]["dizo_pending"]``) and
        ``step()`` retries it after the next step. An exception also leaves it due."""
        zo = self.state["zo"]
        zo["dizo_pending"] = True
        ts = self._deltas_norms()
        saved = ([p.detach().clone() for _, p, _ in self.projected] if self.exact_restore
                 else None)
        gamma, done = list(ts), 0  # re-initialisation: ratio 1
        self.last_draws: list[tuple[float, float]] = []  # (ε_p ζ_l, τ‖Δ_l‖), for inspection
        for m in range(self.search_iters):
            new = self._search_iteration(m, gamma, ts, saved)
            if new is not None:
                gamma, done = new, done + 1
        if done == 0:
            return None
        if saved is None:  # the inverse scalings drifted the weights a little
            ts = self._deltas_norms()
        ratios = [g / (t + 1e-8) for g, t in zip(gamma, ts)]
        self._scale(ratios)
        zo["dizo_gamma"] = gamma
        zo["dizo_searches"] += 1
        zo["dizo_pending"] = False
        return ratios

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor:
        """One ZO step; after every ``interval``-th step (or while a projection is still due),
        the projection search."""
        with self.journal_step():  # one record: the ZO step's and the search's evaluations
            loss = super().step(closure)
            zo = self.state["zo"]
            if zo["step"] % self.interval == 0 or zo.get("dizo_pending", False):
                self.project()
        return loss

    def projection_summary(self) -> dict:
        """A small record of the projections so far (for run reports)."""
        zo = self.state["zo"]
        return {"interval": self.interval, "projected_tensors": len(self.projected),
                "anchor_bytes": self.anchor_bytes(), "searches": zo["dizo_searches"],
                "skipped_search_iters": zo.get("dizo_skipped_iters", 0),
                "pending": bool(zo.get("dizo_pending", False))}


register_method("dizo", DiZO)
