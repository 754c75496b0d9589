"""The update-rule axis of :class:`~zoengine.optim.zo.ZO` (``update=``): its options checked,
the rule bound to each step, its extra evaluations and its buffers through ``state_dict``.

A mixin (as ``virtual_api.VirtualPerturbation``) so that zo.py stays one job: the step's
noise and estimator. The rules themselves are in ``optim/updates.py``.
"""

from __future__ import annotations

import math

import torch

from zoengine.optim.arguments import check_choice, check_float
from zoengine.optim.functional import ZOGroup
from zoengine.optim.updates import BUFFERS, UPDATES, RuleStep, UpdateRule


def check_update_options(update, momentum, betas, adam_eps, *, stochastic_rounding: bool,
                         weight_decay: float) -> UpdateRule:
    """Validate ``update=`` and its options; returns the rule. ``momentum`` in [0, 1),
    ``betas`` two numbers in [0, 1), ``adam_eps`` > 0; stochastic rounding and the
    conservative rule's weight decay are refused (neither is defined for them)."""
    check_choice("update", update, UPDATES)
    check_float("momentum", momentum, low=0.0, strict=False)
    if not momentum < 1.0:
        raise ValueError(f"momentum={momentum!r}: must be in [0, 1)")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
            and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas={betas!r}: must be two numbers in [0, 1), e.g. (0.9, 0.999)")
    check_float("adam_eps", adam_eps, low=0.0, strict=True)
    if stochastic_rounding and update != "sgd":
        raise ValueError(f"stochastic_rounding=True with update={update!r}: only the fused sgd "
                         "update rounds stochastically; pass stochastic_rounding=False")
    if update == "conservative" and weight_decay:
        raise ValueError(f"weight_decay={weight_decay!r} with update='conservative': its "
                         "candidates are θ and θ ± lr·ĝ, without decay; pass weight_decay=0")
    return UpdateRule(update, momentum=momentum, betas=tuple(betas), adam_eps=adam_eps)


class UpdateRules:
    """Mixin for ``ZO``: ``self.update`` (an :class:`UpdateRule`) applied at every step."""

    update: UpdateRule

    def _rule_step(self, groups: list[ZOGroup]) -> RuleStep | None:
        """The update rule bound to this step (None: the fused sgd update)."""
        if self.update.fused:
            return None
        if self.update.name == "conservative":
            for g in groups:
                if g.weight_decay:
                    raise ValueError(f"param_groups[{g.index}]['weight_decay']="
                                     f"{g.weight_decay!r} with update='conservative': its "
                                     "candidates are θ and θ ± lr·ĝ, without decay; set it to 0")
        zo = self.state["zo"]
        return RuleStep(self.update, seed=zo["seed"], n_samples=self.n_samples,
                        state_of=lambda p: self.state[p],
                        count=zo.get("update_steps", 0) + 1)

    def extra_evaluations(self) -> int:
        """Loss evaluations a step makes beyond its 2n (the conservative rule's three)."""
        return super().extra_evaluations() + self.update.extra_evaluations

    def load_state_dict(self, state_dict: dict) -> None:
        """As the base's; the update rule's buffers keep their saved dtype (torch casts
        per-tensor state to the parameter's dtype: fp32 buffers of bf16 weights would lose
        their precision, and a resumed run its bit-exactness)."""
        super().load_state_dict(state_dict)
        names = BUFFERS[self.update.name]
        if not names:
            return
        saved = state_dict["state"]
        for sg, g in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(sg["params"], g["params"]):
                for name in names:
                    t = saved.get(pid, {}).get(name)
                    if isinstance(t, torch.Tensor):
                        self.state[p][name] = t.detach().to(device=p.device, copy=True)

