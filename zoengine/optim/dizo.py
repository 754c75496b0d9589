"""DiZO (Tan et al., NeurIPS 2025): divergence-driven layer-wise projections on any ZO step.

Ordinary ZO steps (any configuration of :class:`ZO`) and, every ``interval`` steps, a short
SPSA search over one scalar γ_l per projected tensor, then the projection
θ_l ← θ0_l + γ_l/‖θ_l − θ0_l‖ · (θ_l − θ0_l). research/algorithms.md §2 has the authors' loop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch

from zoengine.kernels.philox import STREAM_DIZO_ZETA
from zoengine.optim.base import check_float, check_int
from zoengine.optim.batches import BatchSource, ProjectionClosure, check_batch_source
from zoengine.optim.deprecations import warn_outside
from zoengine.optim.dizo_selection import projected_regex
from zoengine.optim.docs import shared_docs
from zoengine.optim.estimators import scalar_normal
from zoengine.optim.functional import NonFiniteLossError, NonFiniteUpdateError, loss_value
from zoengine.optim.registry import register_method
from zoengine.optim.zo import ZO

TAU = 0.2  # τ: the searched ratios lie in [1 − τ, 1 + τ] (the authors' default)
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


@shared_docs
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
        {args: lr eps weight_decay}
        interval (int): κ, steps between projections (50).
        proj_eps, proj_lr, tau, search_iters: ε_p (0.1), α_p (2.0), τ (0.2, in [0, 1): the
            searched ratios lie in [1 − τ, 1 + τ]; called ``clip`` before 0.2) and M (10).
        projected: ``"auto"`` (LoRA A/B if present, else ``"code"``), ``"code"`` (the
            attention's key and value weights, as the authors' code), ``"paper"`` (query and
            value), ``"lora"``, ``"all"`` (every trainable tensor, e.g. a head trained alone),
            or a regex matched against parameter names. ``code``/``paper`` use the
            architecture's names (``zoengine.architectures``); on a fused q/k/v model (GPT-2,
            Phi-3, GPT-NeoX, Falcon, BLOOM) they project the fused weight whole. An empty
            selection raises.
        projection_closure: the search's data, your own (it takes precedence over a front
            end's): a factory, ``fresh()`` returning a loss closure bound to a fresh batch
            (called once per search iteration), or an iterable of loss closures, one per
            iteration. Each closure is evaluated twice per iteration (at γ ± ε_p ζ). The
            same as ``opt.set_batch_source(lambda step, k: fresh())``; can be set later as
            ``opt.projection_closure``. Without it, a front end supplies the batches through
            :meth:`set_batch_source` (the CLI loop and ``ZOTrainer`` do; see
            ``zoengine.optim.batches``). A plain loss closure (not a factory) still works,
            with a ``DeprecationWarning``: pass ``lambda: closure``.
        exact_restore: keep a copy of the projected tensors during a search so every
            evaluation puts the weights back bit-exactly (True, default; transient memory = the
            anchors' size), or undo by the inverse scaling as the authors' code (False; no
            copy, restores to rounding).
        **kwargs: any :class:`ZO` option: ``estimator="kernel"`` (KerZOO), ``noise="pool"``
            (PeZO), ``clip`` (bounds |g| of the ZO steps, as on ZO and KerZOO), ``seed``,
            ``n_samples``, ...

    Non-finite losses in the search follow ``nonfinite``: ``"raise"`` raises
    :class:`NonFiniteLossError` (weights restored); ``"skip"`` drops that iteration (γ
    unchanged, ``state["zo"]["dizo_skipped_iters"]`` counts it). A projection is never lost: it
    stays due (``state["zo"]["dizo_pending"]``) until a search with at least one finite
    iteration is applied, so a search whose iterations were all skipped, or that raised, is
    retried after the next step. ``set_distributed`` is refused (the search is not reduced
    across ranks).

    {engine}

    Memory: one anchor copy of the projected tensors (about 1/6 of an OPT decoder) and one
    scalar per projected tensor; z is never stored. During a search (``exact_restore=True``),
    one more transient copy of the projected tensors.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, interval: int = 50, proj_eps: float = 0.1, proj_lr: float = 2.0,
                 tau: float | None = None, search_iters: int = 10, projected: str = "auto",
                 projection_closure: Callable | Iterable | None = None,
                 exact_restore: bool = True, **kwargs):
        if "clip" in kwargs and tau is None:
            warn_outside(f"DiZO(clip={kwargs['clip']!r}) bounds |g| of the ZO steps (as on ZO "
                         "and KerZOO) since zoengine 0.2; the projection's τ, formerly clip=, "
                         "is tau= (default 0.2): pass tau= to silence this warning",
                         FutureWarning)
        if not isinstance(projected, str) or not projected.strip():
            raise ValueError(f"projected={projected!r}: must be 'auto', 'code', 'paper', 'lora', "
                             "'all' or a non-empty regex of parameter names")
        self.interval = check_int("interval", interval, low=1)
        self.proj_eps = check_float("proj_eps", proj_eps, low=0.0, strict=True)
        self.proj_lr = check_float("proj_lr", proj_lr, low=0.0, strict=False)
        self.tau = check_float("tau", TAU if tau is None else tau, low=0.0, strict=False)
        if self.tau >= 1.0:
            raise ValueError(f"tau={tau!r}: must be in [0, 1) (ratios lie in [1-tau, 1+tau])")
        self.search_iters = check_int("search_iters", search_iters, low=1)
        if not isinstance(exact_restore, bool):
            raise ValueError(f"exact_restore={exact_restore!r}: must be True or False")
        self.exact_restore = exact_restore
        self._batch_source: BatchSource | None = None
        super().__init__(params, lr, eps, weight_decay, **kwargs)
        self.projection_closure = projection_closure
        self._projected_spec = projected
        self._select(projected)

    # ---- the search's data: the batch-source hook -------------------------------------------
    def set_batch_source(self, source: BatchSource | None, *,
                         replace: bool = True) -> BatchSource | None:
        """The γ search's data: ``source(step, k)`` returns a loss closure bound to fresh
        batch k (k = 0 .. search_iters − 1) of the search after ``step`` optimizer steps;
        ``zoengine.optim.batches.search_rng(seed, step, k)`` is the seeding every front end
        uses. ``replace=False`` keeps a source already set (the user's ``projection_closure``).
        Returns the previous source (see :meth:`ZOOptimizer.set_batch_source`)."""
        check_batch_source(source)
        previous = self._batch_source
        if replace or previous is None:
            self._batch_source = source
        return previous

    @property
    def batch_source(self) -> BatchSource | None:
        return self._batch_source

    @property
    def projection_closure(self):
        """The ``projection_closure`` in force (a factory or iterable), or None when the
        search's data came through :meth:`set_batch_source` (or there is none)."""
        src = self._batch_source
        return src.given if isinstance(src, ProjectionClosure) else None

    @projection_closure.setter
    def projection_closure(self, given) -> None:
        if isinstance(given, (str, bytes, dict)) or (isinstance(given, (list, tuple)) and not all(
                callable(c) for c in given)):
            raise TypeError(f"projection_closure={given!r:.60}: must be a factory (fresh() -> a "
                            "loss closure on a fresh batch) or an iterable of loss closures")
        self._batch_source = None if given is None else ProjectionClosure(given)

    def extra_evaluations(self) -> int:
        # two per search iteration, beside the update rule's own (conservative: three)
        return super().extra_evaluations() + 2 * self.search_iters

    def projected_count(self) -> int:
        return len(self.projected)

    def set_distributed(self, spec) -> None:
        """Refused: DiZO's projection search is not reduced across ranks (None is accepted)."""
        if spec not in (None, False):
            raise ValueError(f"set_distributed({spec!r}) with {type(self).__name__}: not supported "
                             "yet (DiZO's projection search is not reduced across ranks)")
        super().set_distributed(spec)

    def hyperparameters(self) -> dict:
        """ZO's hyper-parameters plus DiZO's (``projected`` as given: a preset or a regex)."""
        return {**super().hyperparameters(), "interval": self.interval,
                "proj_eps": self.proj_eps, "proj_lr": self.proj_lr, "tau": self.tau,
                "search_iters": self.search_iters, "projected": self._projected_spec,
                "exact_restore": self.exact_restore}

    def _select(self, projected: str) -> None:
        if not all("param_names" in g for g in self.param_groups):
            raise ValueError("DiZO selects projected tensors by name: pass "
                             "model.named_parameters() (or groups with 'param_names')")
        names = [n for g in self.param_groups for n in g["param_names"]]
        pattern = projected_regex(projected, names)
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
        """ZO's extras, the anchors of the ``projected_numel`` weights and, with
        ``exact_restore`` (the default), the copy of the projected tensors a search keeps."""
        out = super().memory_extras(projected_numel=projected_numel, dtype_bytes=dtype_bytes,
                                    **options)
        if projected_numel:
            out["dizo_anchors"] = projected_numel * dtype_bytes
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
                "dizo.tau": self.tau, "dizo.search_iters": self.search_iters,
                "dizo.projected": [n for n, _, _ in self.projected],
                "dizo.exact_restore": self.exact_restore}

    def _check_config(self, saved: dict | None) -> None:
        if saved is not None and "dizo.clip" in saved:  # τ's key before the rename to tau
            saved = {("dizo.tau" if k == "dizo.clip" else k): v for k, v in saved.items()}
        super()._check_config(saved)

    # ---- projection ---------------------------------------------------------------------
    def _deltas_norms(self) -> list[float]:
        return [delta_norm(p, self.state[p]["dizo_anchor"]) for _, p, _ in self.projected]

    def _scale(self, factors: list[float]) -> None:
        """θ_l ← θ0_l + α_l (θ_l − θ0_l), in place."""
        for (_, p, _), a in zip(self.projected, factors):
            anchor = self.state[p]["dizo_anchor"]
            p.sub_(anchor).mul_(a).add_(anchor)

    def _next_closure(self, m: int) -> Callable:
        """The loss closure of search iteration ``m``, from the batch source."""
        src, step = self._batch_source, self.state["zo"]["step"]
        if src is None:
            raise RuntimeError(
                f"DiZO reached its projection (every interval={self.interval} steps) but has no "
                "search data: pass DiZO(..., projection_closure=fresh) where fresh() returns a "
                "loss closure bound to a fresh batch, or opt.set_batch_source(source) with "
                "source(step, k) -> such a closure (the CLI loop and ZOTrainer set one)")
        closure = src(step, m)
        if not callable(closure):
            raise TypeError(f"the batch source returned a {type(closure).__name__} for (step="
                            f"{step}, k={m}): source(step, k) must return a loss closure "
                            "(e.g. lambda: model(**batch).loss)")
        return self.tap(closure)

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
        closure = self._next_closure(m)
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
                f"DiZO search {m} at step {step}: non-finite loss ℓ₊={lp}, ℓ₋={lm}; "
                f"{self._restored_report()}, the projection stays due (retried after the next "
                "step)")
        g = (lp - lm) / (2 * eps_p)
        return [min(max(gl - self.proj_lr * t * g * z, (1 - tau) * t), (1 + tau) * t)
                for gl, t, z in zip(gamma, ts, zeta)]

    def _restored_report(self) -> str:
        """"weights restored", only when the projected tensors are finite (else says so)."""
        bad = sum(int((~torch.isfinite(p)).sum()) for _, p, _ in self.projected)
        return ("weights restored" if bad == 0 else
                f"the weights are NOT finite: {bad} elements of the projected tensors are "
                "NaN/inf")

    def _check_projection_fits(self, ratios: list[float]) -> None:
        """Refuse, before writing, a projection θ0 + a(θ − θ0) that could overflow the dtype
        (|θ0| + a(|θ| + |θ0|) beyond its largest value); the weights stay as they are."""
        for (name, p, _), a in zip(self.projected, ratios):
            anchor = self.state[p]["dizo_anchor"]
            big = torch.finfo(p.dtype).max
            top = float(p.detach().abs().max()) if p.numel() else 0.0
            base = float(anchor.abs().max()) if anchor.numel() else 0.0
            reach = base + abs(a) * (top + base)
            if not (math.isfinite(a) and reach < big):
                raise NonFiniteUpdateError(
                    f"DiZO projection at step {self.state['zo']['step']}: tensor {name!r} "
                    f"scaled by {a!r} could overflow {p.dtype} (|θ0| + a·|θ − θ0| up to "
                    f"{reach:.3g}); the projection was not applied, the weights are unchanged")

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
        self._check_projection_fits(ratios)
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
