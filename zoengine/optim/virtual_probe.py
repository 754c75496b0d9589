"""The probe of virtual perturbation: at the first step, is every tensor really seen as θ + c·z?

One extra call of the step's closure (the probe forward), before the step, with
``torch.overrides`` watching every read (``virtual_reads.RawReads``). For each module class,
its first module that runs is displaced by c = rms(θ) per tensor (the others stay at θ, so
the activations stay in range) and its output is compared, right after it returns, with the
output of the same call with the same tensors written in place (then restored from a copy:
θ ends bit-identical). A tensor moves to in-place perturbation (``reasons`` says why) when
it is read raw outside a forward that substitutes it, when no forward that would substitute
it ran, or when its module class disagrees.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from zoengine.optim.virtual_ops import _mask_getter
from zoengine.optim.virtual_reads import RawReads

# The verdict for a module class: virtual and in-place outputs of its first module may differ
# by rounding only. With the probe displacement c = rms(θ) per tensor, the in-place effect
# ‖out(θ + cz) − out(θ)‖ is of the order of the output itself, while two correct evaluations
# of the same weights differ by the output's rounding (≤ a few ulps: 2^-8 relative per ulp in
# bf16; the accumulation order of a fused kernel: γ_K = K·u ≤ 2.4e-4 at K = 4096 in fp32),
# i.e. ≤ ~2 % of the effect. A wrong substitution is off by a share of the effect itself: a
# lost scale s gives (1 − 1/s) (Gemma's √d = 5.66: 0.82), noise on the wrong rows ≈ √2. 0.25
# separates the two by an order of magnitude on each side.
PROBE_TOLERANCE = 0.25


def probe_first_step(opt, closure) -> list[str]:
    """The probe forward of ``opt`` (a ZO optimizer with a model attached virtually) on
    ``closure``; returns the names moved to in-place perturbation (with a warning)."""
    virtual = opt._virtual
    virtual.probed = True
    groups = opt.zo_groups()
    pending = {}
    for g in groups:
        for i, (p, k) in enumerate(zip(g.params, g.keys)):
            if id(p) in virtual.owned:
                pending[id(p)] = (p, k, _mask_getter(g.masks, i),
                                  0 if g.offsets is None else g.offsets[i])
    if not pending:
        return []
    zo = opt.state["zo"]
    probe = Probe(virtual, pending, (opt._source_ops(groups), zo["seed"], zo["step"], opt.dist))
    moved = probe.run(closure)
    if moved:
        warnings.warn(f"virtual perturbation: {len(moved)} tensor(s) are perturbed in place "
                      f"instead (opt.virtual_report() says why), e.g. {moved[0]!r}: "
                      f"{virtual.reasons[moved[0]]}", UserWarning, stacklevel=3)
    return moved


@dataclass
class Probe:
    """The probe forward's bookkeeping; ``virtual`` calls :meth:`enter`/:meth:`leave` from its
    hooks while ``virtual._probe`` is this object."""

    virtual: object
    pending: dict  # id(tensor) -> (tensor, key, mask getter, offset): owned trainable tensors
    context: tuple  # (ops, seed, step, dist)
    designated: dict = field(default_factory=dict)  # class -> its first module that ran
    verdicts: dict = field(default_factory=dict)  # class -> None (agrees) or the reason
    ran: set = field(default_factory=set)  # ids of tensors whose hooking module ran
    active: dict = field(default_factory=dict)  # id(tensor) -> forwards running that hook it
    entered: dict = field(default_factory=dict)  # id(module) -> [its tensors] per running call

    def run(self, closure) -> list[str]:
        v = self.virtual
        v.context = self.context
        v.displaced.clear()
        v.consumed.clear()
        v._probe = self
        detector = RawReads(v)
        try:
            with detector:
                closure()
        finally:
            v._probe = None
            v.displaced.clear()
            v.consumed.clear()
        failed = {c: why for c, why in self.verdicts.items() if why is not None}
        moved = []
        for i in self.pending:
            why = self._reason(i, detector.raw, failed)
            if why is not None:
                name = v.owned.pop(i)
                v.reasons[name] = why
                moved.append(name)
        return moved

    def _reason(self, i: int, raw: dict, failed: dict) -> str | None:
        if i in raw:
            return (f"read outside the forward of the module that owns it (by {raw[i]}), so "
                    "it would be evaluated unperturbed")
        if i not in self.ran:
            return "no forward that substitutes it ran in the probe forward"
        for c in sorted(self.virtual.classes_of(i) & failed.keys(), key=lambda c: c.__name__):
            return f"{c.__name__}: {failed[c]}"
        return None

    def enter(self, module: nn.Module, tensors) -> None:
        self.entered.setdefault(id(module), []).append(tensors)
        for p in tensors:
            self.active[id(p)] = self.active.get(id(p), 0) + 1
            self.ran.add(id(p))
        cls, v = type(module), self.virtual
        if cls in self.designated or not any(id(p) in self.pending for p in tensors):
            return
        self.designated[cls] = module
        for p in tensors:
            if id(p) in self.pending and id(p) not in v.displaced:
                _, key, mask, offset = self.pending[id(p)]
                rms = float(p.detach().float().pow(2).mean().sqrt()) if p.numel() else 0.0
                scale = rms if math.isfinite(rms) and rms > 0 else 1.0
                d = v.displacement(key, mask, offset)
                d.scales[0] = scale
                v.displaced[id(p)] = d

    def leave(self, module: nn.Module, args, kwargs, output) -> None:
        stack = self.entered.get(id(module))
        for p in stack.pop() if stack else ():
            self.active[id(p)] -= 1
        cls = type(module)
        if self.designated.get(cls) is module and cls not in self.verdicts:
            self.verdicts[cls] = self._compare(module, args, kwargs, output)

    def _compare(self, module: nn.Module, args, kwargs, virtual_out) -> str | None:
        """None when ``module``'s output with its displaced tensors substituted (virtual_out)
        matches the output with them written in place; else the reason."""
        failed = [c.__name__ for c, why in self.verdicts.items() if why is not None
                  and any(type(m) is c for m in module.modules() if m is not module)]
        if failed:
            return f"not verifiable: a module inside it ({failed[0]}) disagreed"
        v = self.virtual
        tensors = [p for p in module.parameters() if id(p) in v.displaced]
        ops, seed, step, dist = self.context
        with v.inside():
            plain = module(*args, **kwargs)
            saved = [p.detach().clone() for p in tensors]
            try:
                for p in tensors:
                    d = v.displaced[id(p)]
                    (k, c), = d.scales.items()
                    extra = {"offsets": [d.offset]} if d.offset else {}
                    ops.perturb_([p], [d.key], seed=seed, step=step, sample=k, scale=c,
                                 dist=dist, masks=None if d.mask is None else [d.mask()],
                                 **extra)
                inplace = module(*args, **kwargs)
            finally:
                for p, s in zip(tensors, saved):
                    p.copy_(s)
            err, effect = _distance(virtual_out, inplace), _distance(inplace, plain)
        if not math.isfinite(err) or not math.isfinite(effect):
            return "its output under the probe displacement is not finite or not comparable"
        if err > PROBE_TOLERANCE * effect or (effect == 0.0 and err > 0.0):
            share = err / effect if effect else math.inf
            return (f"its output with θ + c·z substituted differs from in place by {share:.3g} "
                    f"of the perturbation's effect (allowed {PROBE_TOLERANCE})")
        return None


def _float_leaves(out) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _distance(a, b) -> float:
    la, lb = _float_leaves(a), _float_leaves(b)
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        return math.inf
    return math.sqrt(sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(la, lb)))
