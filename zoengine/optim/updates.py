"""Update rules: how a step's projected gradients move θ, the third axis beside noise and estimator.

The estimate of a step is ĝ = (1/n)·Σ_k g_k z_k (z_k regenerated from the noise contract).
``"sgd"`` applies θ ← θ − lr·(ĝ + wd·θ) fused with the restore of the last perturbation
(``functional._apply_update``: no tensor of size d). The other rules need ĝ itself, one tensor
at a time, in a transient buffer of the compute dtype (the largest trainable tensor's size):

- ``"momentum"`` (ZO-SGD-MMT): torch.optim.SGD's heavy ball, b ← μ·b + d, θ ← θ − lr·b with
  d = ĝ + wd·θ (b = d at the first step); one persistent buffer per tensor.
- ``"sign"`` (ZO-SGD-Sign): θ ← θ − lr·sign(d), coordinate-wise (the ZO-Bench paper's
  definition; its code applies sign(g)·z instead, docs/methods/updates.md).
- ``"adam"`` (ZO-Adam): torch.optim.Adam on d (bias-corrected moments, L2 weight decay); two
  persistent buffers per tensor.
- ``"conservative"`` (ZO-SGD-Cons): three more forwards, at θ, θ − lr·ĝ and θ + lr·ĝ; the step
  keeps the point with the lowest loss (ZO-Bench's ``zo_conserv_step``, ties as it breaks them).

Every rule mirrors torch's single-tensor optimizer arithmetic, so on fp32 weights it agrees
with ``torch.optim.SGD``/``Adam`` fed the same ĝ (tests/test_update_rules.py checks it bit for
bit). Buffers are fp32 for fp16/bf16 weights (the compute dtype), masked elements get d = 0
(no update, no weight decay: a pruned zero stays exactly zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from zoengine.optim.functional import NonFiniteUpdateError, check_finite_grads

UPDATES = ("sgd", "momentum", "sign", "conservative", "adam")
BUFFERS = {"sgd": (), "sign": (), "conservative": (), "momentum": ("momentum_buffer",),
           "adam": ("exp_avg", "exp_avg_sq")}
# ZO-Bench's names (its trainers zo_sgd with momentum, zo_sign_opt, zo_conserv, zo_adam)
ZO_BENCH_NAMES = {"zo-sgd": "sgd", "zo-sgd-mmt": "momentum", "zo-sgd-sign": "sign",
                  "zo-sgd-cons": "conservative", "zo-adam": "adam"}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def update_bytes(update: str, trainable_numel: int, largest_numel: int,
                 dtype_bytes: int) -> dict:
    """The memory planner's entries for ``update``: ``update_buffers`` (momentum one, Adam two
    per trainable number, in the compute dtype: fp32 or wider) and ``update_scratch`` (the
    transient ĝ of the largest tensor); none for the fused sgd update."""
    width, out = max(4, dtype_bytes), {}
    if BUFFERS[update]:
        out["update_buffers"] = len(BUFFERS[update]) * width * trainable_numel
    if update != "sgd" and largest_numel:
        out["update_scratch"] = width * largest_numel
    return out


def adam_step_bound(betas: tuple[float, float], t: int) -> float:
    """An upper bound of |m̂_t| / (sqrt(v̂_t) + eps) for any gradient sequence, so Adam's step
    is at most lr times it. With β1 < sqrt(β2): |m_t| ≤ (1−β1)·Σ_i β1^(t−i)|g_i| and
    sqrt(v_t) ≥ sqrt(1−β2)·β2^((t−i)/2)|g_i| for every i, so |m_t|/sqrt(v_t) ≤
    (1−β1)/sqrt(1−β2)·Σ_j (β1/sqrt(β2))^j; the bias corrections multiply it by
    sqrt(1−β2^t)/(1−β1^t). Infinite (no bound) when β1 ≥ sqrt(β2)."""
    b1, b2 = betas
    ratio = b1 / math.sqrt(b2)
    if ratio >= 1.0:
        return math.inf
    return ((1 - b1) / math.sqrt(1 - b2) / (1 - ratio)
            * math.sqrt(1 - b2 ** t) / (1 - b1 ** t))


class UpdateRule:
    """One update rule and its hyper-parameters (``momentum`` for ``"momentum"``, ``betas`` and
    ``adam_eps`` for ``"adam"``). Stateless itself: buffers live in the optimizer's per-tensor
    state (``state_of(p)``), Adam's step count in ``state["zo"]["update_steps"]``."""

    def __init__(self, name: str = "sgd", *, momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8):
        self.name, self.momentum = name, float(momentum)
        self.betas, self.adam_eps = (float(betas[0]), float(betas[1])), float(adam_eps)

    @property
    def fused(self) -> bool:
        """True for ``"sgd"``: the update is fused with the restore pass (no buffer at all)."""
        return self.name == "sgd"

    @property
    def buffers(self) -> tuple[str, ...]:
        """Names of the persistent per-tensor buffers (each the tensor's size, compute dtype)."""
        return BUFFERS[self.name]

    @property
    def extra_evaluations(self) -> int:
        """Loss evaluations a step makes beyond its 2n (conservative: θ, θ − lr·ĝ, θ + lr·ĝ)."""
        return 3 if self.name == "conservative" else 0

    def options(self) -> dict:
        """The keyword options that shape this rule (for run configurations)."""
        if self.name == "momentum":
            return {"momentum": self.momentum}
        if self.name == "adam":
            return {"betas": list(self.betas), "adam_eps": self.adam_eps}
        return {}

    def step_bound(self, t: int) -> float | None:
        """max |Δθ| / lr per element for the rules whose step does not depend on |ĝ| (sign: 1,
        adam: ``adam_step_bound``), else None."""
        if self.name == "sign":
            return 1.0
        if self.name == "adam":
            return adam_step_bound(self.betas, t)
        return None

    # ---- the step ----------------------------------------------------------------------
    def check(self, walk, grads: list[list[float]], *, radius: float, n_samples: int,
              zb: float, t: int, state_of: Callable) -> None:
        """Refuse, before anything is written, an update that could write NaN/inf: every g
        finite, and |θ| + ε·r·|z| + lr·(the rule's largest step) below the largest value of
        each parameter's dtype. The largest step is 1 (sign), ``adam_step_bound`` (adam),
        μ·max|b| + |ĝ| (momentum; b scanned) or |ĝ| (conservative's farthest candidate), with
        |ĝ| ≤ Σ|g_k|/n·max|z|. max|θ| is scanned only when that reach is within 2^-10 of the
        dtype's largest value or lr·wd ≥ 1 (as the fused sgd check does)."""
        check_finite_grads(walk.groups, grads, walk.step)
        for g, gk in zip(walk.groups, grads):
            est = sum(abs(v) for v in gk) / n_samples * zb
            back = g.eps * abs(radius) * zb
            for p in g.params:
                if p.numel() == 0:
                    continue
                size = self.step_bound(t)
                if size is None:
                    size = est
                    buf = state_of(p).get("momentum_buffer") if self.name == "momentum" else None
                    if buf is not None:
                        size += self.momentum * float(buf.abs().max())
                _check_reach(p, g, back, g.lr * size, walk.step)

    def apply(self, walk, grads: list[list[float]], *, seed: int, radius: float,
              n_samples: int, state_of: Callable, count: int, evaluate: Callable) -> bool:
        """Restore the last sample's −εr·z, then apply the rule to every trainable tensor.
        ``count``: the 1-based number of this update (Adam's bias correction); ``evaluate``:
        the step's loss evaluation (the conservative rule's three extra forwards). Returns
        False when nothing was applied (conservative: a non-finite loss at θ)."""
        ops, step, dist = walk.ops, walk.step, walk.dist
        n = n_samples
        for g in walk.groups:  # θ back at the step's start: θ + εr·z_{n−1}, exactly as sgd's
            ops.restore_update_(g.params, g.keys, seed=seed, step=step, eps=g.eps * radius,
                                lr=0.0, grads=[0.0] * n, restore_sample=n - 1,
                                weight_decay=0.0, dist=dist, masks=g.masks, **_offsets(g))
        walk.applied = None
        if self.name == "conservative":
            return _conservative(walk, grads, seed=seed, n_samples=n, evaluate=evaluate)
        inner = getattr(ops, "inner", ops)  # estimates go to a scratch buffer, never virtual
        for g, gk in zip(walk.groups, grads):
            coefs = [v / n for v in gk]
            for i, (p, key) in enumerate(zip(g.params, g.keys)):
                m = None if g.masks is None else g.masks[i]
                d = estimate(inner, p, key, i, g, coefs, seed=seed, step=step, dist=dist, mask=m)
                if g.weight_decay:
                    d.add_(_masked(p, m, d.dtype), alpha=g.weight_decay)
                self._rule(p, d, g.lr, state_of(p), count)
        return True

    def _rule(self, p: torch.Tensor, d: torch.Tensor, lr: float, st: dict, t: int) -> None:
        """torch's single-tensor SGD-momentum / sign / Adam arithmetic on d, in d's dtype."""
        theta = p if p.dtype == d.dtype else p.to(d.dtype)
        if self.name == "sign":
            theta.add_(torch.sign(d), alpha=-lr)
        elif self.name == "momentum":
            buf = st.get("momentum_buffer")
            if buf is None:
                st["momentum_buffer"] = buf = d.detach().clone()
            else:
                buf.mul_(self.momentum).add_(d)
            theta.add_(buf, alpha=-lr)
        else:
            b1, b2 = self.betas
            m = st.setdefault("exp_avg", torch.zeros_like(d))
            v = st.setdefault("exp_avg_sq", torch.zeros_like(d))
            m.lerp_(d, 1 - b1)
            v.mul_(b2).addcmul_(d, d, value=1 - b2)
            step_size = lr / (1 - b1 ** t)
            denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(self.adam_eps)
            theta.addcdiv_(m, denom, value=-step_size)
        if theta is not p:
            p.copy_(theta)


class RuleStep:
    """An :class:`UpdateRule` bound to one step (what ``functional.zo_step(update=...)``
    calls): the seed, n, the optimizer's per-tensor state, the update's 1-based count and the
    step's loss evaluation."""

    def __init__(self, rule: UpdateRule, *, seed: int, n_samples: int, state_of: Callable,
                 count: int):
        self.rule, self.seed, self.n, self.state_of, self.count = (rule, seed, n_samples,
                                                                   state_of, count)

    def check(self, walk, grads, radius: float, zb: float) -> None:
        self.rule.check(walk, grads, radius=radius, n_samples=self.n, zb=zb, t=self.count,
                        state_of=self.state_of)

    def apply(self, walk, grads, radius: float) -> bool:
        return self.rule.apply(walk, grads, seed=self.seed, radius=radius, n_samples=self.n,
                               state_of=self.state_of, count=self.count,
                               evaluate=walk.evaluate)


def estimate(ops, p: torch.Tensor, key: int, i: int, g, coefs: list[float], *, seed: int,
             step: int, dist: str, mask=None) -> torch.Tensor:
    """ĝ = Σ_k coefs[k]·z_k for tensor ``p`` (key ``key``, position ``i`` in its group ``g``)
    in a new buffer of the compute dtype, computed by the backend's own update pass on a zero
    tensor (so z and the summation order are exactly those of the fused sgd update); masked
    elements are 0."""
    buf = torch.zeros(p.shape, dtype=_compute_dtype(p.dtype), device=p.device)
    offs = {"offsets": [g.offsets[i]]} if g.offsets and g.offsets[i] else {}
    ops.restore_update_([buf], [key], seed=seed, step=step, eps=0.0, lr=1.0, grads=coefs,
                        restore_sample=len(coefs) - 1, weight_decay=0.0, dist=dist,
                        masks=None if mask is None else [mask], **offs)
    return buf.neg_()  # 0 − 1·Σ c_k z_k


def _check_reach(p: torch.Tensor, g, back: float, move: float, step: int) -> None:
    big = min(torch.finfo(p.dtype).max, torch.finfo(_compute_dtype(p.dtype)).max)
    if not math.isfinite(move):
        top = math.inf
    elif back + move < big * 2.0**-10 and g.lr * g.weight_decay < 1.0:
        return
    else:
        top = float(p.detach().abs().max())
    theta1 = top + back
    bound = theta1 + move + g.lr * g.weight_decay * theta1
    if not bound < big:
        reach = f"{bound:.3g}" if math.isfinite(bound) else "beyond any float"
        raise NonFiniteUpdateError(
            f"step {step}: the update of param_groups[{g.index}] would overflow {p.dtype}: "
            f"|θ| + lr={g.lr!r} x the rule's largest step (+ weight decay) reaches {reach}, "
            f"the largest {p.dtype} is {big:.3g}; the update was not applied. Lower lr (or "
            "the loss scale)", lr=g.lr, group=g.index)


def _masked(p: torch.Tensor, mask, dtype: torch.dtype) -> torch.Tensor:
    theta = p.detach().to(dtype)
    return theta if mask is None else theta * mask.to(dtype)


def _offsets(g) -> dict:
    return {"offsets": g.offsets} if g.offsets and any(g.offsets) else {}


def _move(walk, grads, *, seed: int, n_samples: int, factor: float) -> None:
    """θ ← θ − factor·lr·ĝ for every group (one pass each, no weight decay)."""
    for g, gk in zip(walk.groups, grads):
        walk.ops.restore_update_(g.params, g.keys, seed=seed, step=walk.step, eps=0.0,
                                 lr=factor * g.lr, grads=[v / n_samples for v in gk],
                                 restore_sample=n_samples - 1, weight_decay=0.0,
                                 dist=walk.dist, masks=g.masks, **_offsets(g))


def _conservative(walk, grads, *, seed: int, n_samples: int, evaluate: Callable) -> bool:
    """ZO-Bench's conservative step: ℓ0 at θ, ℓ1 at θ − lr·ĝ, ℓ2 at θ + lr·ĝ; keep θ − lr·ĝ
    when ℓ1 ≤ ℓ0 and ℓ1 < ℓ2, θ when ℓ1 > ℓ0 and ℓ0 < ℓ2, else θ + lr·ĝ. A non-finite
    candidate loss counts as +inf (never kept). Returns False, θ unchanged, when ℓ0 is not
    finite. If the closure raises, θ is moved back before the exception propagates."""
    at = 0.0  # where θ is: θ_start − at·lr·ĝ

    def move(factor: float) -> None:
        nonlocal at
        _move(walk, grads, seed=seed, n_samples=n_samples, factor=factor)
        at += factor

    try:
        l0 = evaluate("θ (conservative)")
        if not math.isfinite(l0):
            return False
        move(1.0)
        l1 = _finite_or_inf(evaluate("θ−lr·ĝ (conservative)"))
        move(-2.0)
        l2 = _finite_or_inf(evaluate("θ+lr·ĝ (conservative)"))
    except BaseException:
        if at:
            _move(walk, grads, seed=seed, n_samples=n_samples, factor=-at)
        raise
    if l1 > l0:
        if l0 < l2:
            move(1.0)  # back to θ
    elif l1 < l2:
        move(2.0)  # to θ − lr·ĝ
    return True


def _finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf
