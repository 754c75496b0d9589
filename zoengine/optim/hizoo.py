"""HiZOO (Zhao et al., ICLR 2025, arXiv 2402.15173): a diagonal-Hessian-informed two-point step
with one extra forward pass, on zoengine's noise contract."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import noise_blocks
from zoengine.kernels.reference import CHUNK_ELEMENTS, compute_dtype
from zoengine.optim.base import check_choice, check_float
from zoengine.optim.docs import shared_docs
from zoengine.optim.functional import NonFiniteLossError, NonFiniteUpdateError, ZOGroup
from zoengine.optim.loss_probe import (
    LossProbe,
    NonFiniteLoss,
    check_exchange,
    refuse_update_rule,
    restore_report,
)
from zoengine.optim.registry import register_method
from zoengine.optim.zo import ZO, ZO_OWN

SIGMA = "hizoo_sigma"  # the per-parameter state key of Σ (in state_dict)
_Z_MAX = math.sqrt(50 * math.log(2))  # the contract's cut of |z| for normal noise
_TEMPS = 8  # fp32 chunk temporaries of the update pass (z, Σ, θ₁, h, Σ', step, mask, out)


@shared_docs
class HiZOO(ZO):
    r"""HiZOO: two-point ZO with the perturbation scaled by a diagonal Hessian estimate Σ.

    .. math::
        \ell_0 = \mathcal{L}(\theta),\quad
        \ell_\pm = \mathcal{L}(\theta \pm \epsilon\, \Sigma^{-1/2} z), \quad z \sim \mathcal{N}(0, I)
        \\
        \Sigma \leftarrow (1 - \alpha)\Sigma
            + \alpha\,\frac{|\ell_+ + \ell_- - 2\ell_0|}{2\epsilon^2}\,\Sigma \odot z \odot z,
        \qquad
        \theta \leftarrow \theta - \eta\Big(\frac{\ell_+ - \ell_-}{2\epsilon}\,
            \Sigma^{-1/2} z + \lambda\theta\Big)

    as the authors' code does it (``trainer.py``, ``zo_Hessian_step_update``): Σ starts at
    ones, the update divides by √Σ *after* the EMA, and weight decay is λθ. A step costs
    1 + 2n forward passes; n = 1 (the default) is the authors' step, n > 1 (zoengine's
    extension) averages the n estimates of Σ and of the step. Σ is persistent: one tensor per trainable parameter, of
    its dtype (``state[p]["hizoo_sigma"]``, in ``state_dict()``; ``memory_extras`` counts it).

    The kernels perturb by a scalar times z, not by an element-wise ε Σ^{-1/2} z, so HiZOO
    regenerates z itself from the noise contract (the backend's generator: the reference's
    Philox for ``backend="reference"``, the compiled one for ``"native"``) one chunk of 65,536
    elements of one tensor at a time into a transient buffer, and writes θ and Σ in that chunk
    pass: nothing of size d beyond Σ. Virtual perturbation is refused for the same reason.

    On a quadratic the expected estimate is Σ_i(tr(Σ⁻¹H)/2 + H_ii/Σ_i), whose fixed point is
    (1 + d/2)·diag(H) for a diagonal H: the code's estimator (Σ z², not Σ(z² − 1)) recovers
    the diagonal's shape up to that scalar, which η absorbs (docs/methods/hizoo.md).

    Args:
        {args: params lr eps weight_decay seed}
        hessian_smooth (float): α in [0, 1), the EMA weight of the new estimate (default 1e-8,
            the authors' README; 0 keeps Σ = 1: MeZO with one more forward).
        dist (str): ``"normal"`` (HiZOO's; the estimator's E[z⁴] = 3 assumes it).
        {args: n_samples backend nonfinite masks}

    {engine}

    Example:
        >>> opt = zoengine.HiZOO(model.named_parameters(), lr=1e-6, eps=1e-3,
        ...                      hessian_smooth=1e-8)
        >>> loss = opt.step(lambda: model(**batch).loss)  # 3 forwards: the mean of them
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 *, hessian_smooth: float = 1e-8, dist: str = "normal", seed: int = 0,
                 n_samples: int = 1, backend: str | None = None, nonfinite: str = "raise",
                 masks=None, stochastic_rounding: bool = False, **kwargs):
        refuse_update_rule(kwargs, "HiZOO")
        check_float("hessian_smooth", hessian_smooth, low=0.0, strict=False)
        if not hessian_smooth < 1.0:
            raise ValueError(f"hessian_smooth={hessian_smooth!r}: must be in [0, 1) (1 would "
                             "replace Σ by one noisy estimate, which can be 0)")
        check_choice("dist", dist, ("normal",))
        if stochastic_rounding is not False:
            raise ValueError(f"stochastic_rounding={stochastic_rounding!r}: HiZOO's own update "
                             "pass rounds to nearest; pass stochastic_rounding=False")
        self.hessian_smooth = float(hessian_smooth)
        super().__init__(params, lr, eps, weight_decay, noise=dist, estimator="spsa",
                         seed=seed, n_samples=n_samples, backend=backend, nonfinite=nonfinite,
                         masks=masks, **kwargs)

    def hyperparameters(self) -> dict:
        """As :class:`ZO`'s, in HiZOO's terms: ``dist`` and ``hessian_smooth``."""
        h = super().hyperparameters()
        for k in ZO_OWN:
            h.pop(k, None)
        return {**h, "dist": self.noise, "hessian_smooth": self.hessian_smooth}

    def _run_config(self) -> dict:
        return {**super()._run_config(), "hessian_smooth": self.hessian_smooth}

    def attach_virtual(self, model, *, probe: bool = True):
        raise ValueError("attach_virtual with HiZOO: its perturbation ε·Σ^{-1/2}·z is scaled "
                         "element by element, which virtual perturbation cannot apply; train "
                         "in place (do not call attach_virtual), or use MeZO/ZO for virtual")

    def extra_evaluations(self) -> int:
        return 1  # ℓ₀ at the unperturbed θ, beyond the pair

    def sigma(self, p: torch.Tensor) -> torch.Tensor:
        """Σ of parameter ``p`` (created as ones, of p's dtype, at its first step)."""
        st = self.state[p]
        s = st.get(SIGMA)
        if s is None or s.shape != p.shape:
            st[SIGMA] = s = torch.ones_like(p, memory_format=torch.contiguous_format)
        return s

    def _zo_step(self, closure: Callable, exchange=None) -> torch.Tensor:
        zo = self.state["zo"]
        groups = self.zo_groups()
        if not groups:
            raise ValueError("no trainable parameters: every tensor has requires_grad=False")
        exchange = exchange or self._exchange
        check_exchange(exchange, "HiZOO")
        self._check_perturbation_fits(groups)
        result = hizoo_step(groups, closure, _Noise(self.ops_for(groups), zo["seed"], zo["step"]),
                            self.sigma, alpha=self.hessian_smooth, n_samples=self.n_samples,
                            nonfinite=self.nonfinite, exchange=exchange)
        zo["step"] += 1
        if self._exchange is not None:
            self._exchange.after_step(zo["step"], (p for g in groups for p in g.params))
        self._record(result, groups)
        return result.loss_tensor()

    # ---- accounting ---------------------------------------------------------------------
    @classmethod
    def memory_extras(cls, *, trainable_numel: int = 0, dtype_bytes: int = 4, **options) -> dict:
        """The base's, plus Σ (one value per trainable parameter, of its dtype) and the
        update pass's transient chunk buffers (z regenerated per chunk of one tensor)."""
        out = super().memory_extras(trainable_numel=trainable_numel, dtype_bytes=dtype_bytes,
                                    **options)
        out["hizoo_hessian"] = trainable_numel * dtype_bytes
        n = options.get("n_samples", 1)
        out["hizoo_chunk"] = (_TEMPS + n) * 4 * CHUNK_ELEMENTS * (2 if dtype_bytes == 8 else 1)
        return out

    @classmethod
    def zo_options(cls, *, dist: str = "normal", **options) -> dict:
        options.pop("hessian_smooth", None)
        return super().zo_options(noise=dist, estimator="spsa", **options)


class _Noise:
    """Chunks of z_k of (seed, step, sample k) from the backend's generator (native: compiled
    Philox; otherwise the reference's, on the tensor's device)."""

    def __init__(self, ops, seed: int, step: int):
        self.native = getattr(ops, "__name__", "").endswith("native_ops")
        self.ops, self.seed, self.step = ops, seed, step

    def chunk(self, key: int, s: int, e: int, device, sample: int) -> torch.Tensor:
        if self.native:
            return self.ops.noise(e - s, seed=self.seed, step=self.step, key=key,
                                  sample=sample, offset=s)
        b0 = s // 4
        z = noise_blocks(b0, (e - 1) // 4 + 1 - b0, key64=stream_key(self.seed, self.step, sample),
                         tensor_key=key, dist="normal", device=device)
        return z[s - 4 * b0: e - 4 * b0]


def _chunks(groups: Sequence[ZOGroup], noise: _Noise, sigma: Callable, samples):
    """Yield (group, flat chunk of θ, its Σ chunk, [z_k for k in samples] (compute dtype,
    masked), mask chunk or None)."""
    for g in groups:
        for i, (p, key) in enumerate(zip(g.params, g.keys)):
            off = g.offsets[i] if g.offsets else 0
            m = None if g.masks is None or g.masks[i] is None else g.masks[i].reshape(-1)
            ct = compute_dtype(p.dtype)
            flat, sflat = p.view(-1), sigma(p).view(-1)
            for s in range(0, flat.numel(), CHUNK_ELEMENTS):
                e = min(s + CHUNK_ELEMENTS, flat.numel())
                mk = None if m is None else m[s:e].to(torch.bool)
                zs = [noise.chunk(key, s + off, e + off, p.device, k).to(ct) for k in samples]
                if mk is not None:
                    zs = [z * mk for z in zs]
                yield g, flat[s:e], sflat[s:e], zs, mk


def _move(groups, noise, sigma, units: float, sample: int) -> None:
    """θ ← θ + units·ε·Σ^{-1/2} z_k (units ∈ {1, −2, 1}: exact multiples of one displacement)."""
    for g, x, s, (z,), _ in _chunks(groups, noise, sigma, [sample]):
        x.copy_(x.to(z.dtype) + (z / torch.sqrt(s.to(z.dtype))) * (units * g.eps))


def _check_step(groups, sigma, alpha: float, grad: list[list[float]], step: int) -> None:
    """Refuse (before writing) an update that could overflow: lr·Σ|g_k|/n·max|z|/√min Σ'."""
    for g, gk in zip(groups, grad):
        coef = sum(abs(v) for v in gk) / len(gk)
        for p in g.params:
            big = torch.finfo(p.dtype).max
            smin = float(sigma(p).min()) * (1.0 - alpha) if p.numel() else 1.0
            reach = _Z_MAX / math.sqrt(smin) if smin > 0 else math.inf
            if not (math.isfinite(coef) and g.lr * coef * reach < big * 2.0**-10):
                raise NonFiniteUpdateError(
                    f"step {step}: the HiZOO update of param_groups[{g.index}] could overflow "
                    f"{p.dtype}: lr={g.lr!r} x |g|={coef:.3g} x max|z|/sqrt(min Σ)="
                    f"{reach:.3g}; the update was not applied. Lower lr (or the loss scale)",
                    lr=g.lr, group=g.index)


def _update(groups, noise, sigma, alpha: float, curv, grad) -> None:
    """One pass: restore θ₁ = θ + εΣ^{-1/2}z_last, Σ' = (1−α)Σ + α/n·Σ_k c_k Σ z_k²,
    θ₂ = θ₁ − lr(1/n·Σ_k g_k Σ'^{-1/2} z_k + λθ₁); masked elements keep θ and Σ bit for bit."""
    index = {id(g): j for j, g in enumerate(groups)}
    n = len(grad[0])
    for g, x, s, zs, mk in _chunks(groups, noise, sigma, range(n)):
        j, ct = index[id(g)], zs[0].dtype
        sc = s.to(ct)
        theta1 = x.to(ct) + (zs[-1] / torch.sqrt(sc)) * g.eps
        est = sum((z * z) * (curv[j][k] / n) for k, z in enumerate(zs))
        s_new = sc * (1.0 - alpha) + sc * est * alpha
        step = (sum(z * (grad[j][k] / n) for k, z in enumerate(zs))) / torch.sqrt(s_new)
        if g.weight_decay != 0.0:
            step = step + theta1 * g.weight_decay
        out, s_out = (theta1 - step * g.lr).to(x.dtype), s_new.to(s.dtype)
        if mk is not None:
            out, s_out = torch.where(mk, out, x), torch.where(mk, s_out, s)
        x.copy_(out)
        s.copy_(s_out)


def _evaluate_pairs(probe, groups, noise, sigma, n: int, state: list):
    """ℓ₊, ℓ₋ of every sample; ``state[0]`` tracks (sample, units) left in the weights."""
    pairs = []
    for k in range(n):
        _move(groups, noise, sigma, 1.0, k)
        state[0] = (k, 1.0)
        lp = probe.evaluate(f"θ+εΣ^-1/2 z (sample {k})")
        _move(groups, noise, sigma, -2.0, k)
        state[0] = (k, -1.0)
        lm = probe.evaluate(f"θ−εΣ^-1/2 z (sample {k})")
        if k != n - 1:
            _move(groups, noise, sigma, 1.0, k)
            state[0] = None
        pairs.append((lp, lm))
    return pairs


def hizoo_step(groups: Sequence[ZOGroup], closure: Callable, noise: _Noise, sigma: Callable, *,
               alpha: float, n_samples: int = 1, nonfinite: str = "raise", exchange=None):
    """One HiZOO step in place: ℓ₀, then ℓ₊, ℓ₋ of each sample (the authors' order for n = 1).
    A NaN/inf loss or an exception undoes the perturbation first; then ``NonFiniteLossError``
    or a skipped result (``nonfinite="skip"``), as ``zo_step``."""
    probe, left = LossProbe(closure, exchange), [None]
    try:
        l0 = probe.evaluate("θ (HiZOO centre)")
        pairs = _evaluate_pairs(probe, groups, noise, sigma, n_samples, left)
    except BaseException as exc:
        if left[0] is not None:
            _move(groups, noise, sigma, -left[0][1], left[0][0])
        if not isinstance(exc, NonFiniteLoss):
            raise
        report = restore_report(groups)
        if nonfinite == "skip" and report == "weights restored":
            return probe.result([], skipped=True)
        raise NonFiniteLossError(f"{exc} (step {noise.step}); {report}") from None
    grad = [[(lp - lm) / (2.0 * g.eps) for lp, lm in pairs] for g in groups]
    curv = [[abs(lp + lm - 2.0 * l0) / (2.0 * g.eps * g.eps) for lp, lm in pairs]
            for g in groups]
    try:
        _check_step(groups, sigma, alpha, grad, noise.step)
    except NonFiniteUpdateError as exc:
        _move(groups, noise, sigma, 1.0, n_samples - 1)
        raise NonFiniteUpdateError(f"{exc}; {restore_report(groups)}", lr=exc.lr,
                                   group=exc.group) from None
    _update(groups, noise, sigma, alpha, curv, grad)
    return probe.result(grad)


register_method("hizoo", HiZOO)
