"""``attach_virtual`` and its reports: the virtual-perturbation face of a ZO optimizer
(docs/virtual.md), a mixin of ``optim.zo.ZO``."""

from __future__ import annotations

from zoengine.optim.virtual import VirtualModel, check_perturbation
from zoengine.optim.virtual_probe import probe_first_step


class VirtualPerturbation:
    """Needs ``self._virtual`` (None until attached), ``self._journal`` and
    ``self.perturbation`` from the optimizer."""

    def attach_virtual(self, model, *, probe: bool = True) -> VirtualModel:
        """Perturb virtually (docs/virtual.md): θ is never written during the evaluations;
        each tensor is replaced by θ + c·z where its module reads it (``model``: the
        ``nn.Module`` whose forward reads the parameters), for that forward only; the update is
        the step's only write, so lr = 0 or a skipped step leaves θ bit-identical.

        ``probe``: at the first step, one extra call of the closure checks every module class
        (virtual output = in-place output) and every read (none outside a substituting
        forward); what fails is perturbed in place instead, with a warning, and
        :meth:`virtual_report` says why. ``probe=False`` skips that check (then a model that
        reads a parameter in an unusual way can be evaluated unperturbed).

        Call it before the first journaled step (the journal header records the
        perturbation). Replaces the constructor's deprecated ``perturbation="virtual",
        model=model``. Returns the hooks' owner (``remove()`` takes them off)."""
        check_perturbation("virtual", model)
        if self._journal is not None:
            raise ValueError("attach_virtual: this optimizer's journal is already open (its "
                             "header says perturbation='inplace'); attach before the first "
                             "journaled step")
        if self._virtual is not None:
            raise ValueError("attach_virtual: a model is attached already")
        if not isinstance(probe, bool):
            raise ValueError(f"attach_virtual(probe={probe!r}): must be True or False")
        self._virtual = build_virtual(self, model)
        self._virtual.probed = self._virtual.probed or not probe
        self.perturbation = "virtual"
        return self._virtual

    def virtual_report(self) -> dict[str, str]:
        """Each trainable tensor's name -> ``"virtual"`` or ``"in place: <reason>"`` (after
        :meth:`attach_virtual`; the probe's findings appear after the first step)."""
        if self._virtual is None:
            raise ValueError("virtual_report: this optimizer perturbs in place; call "
                             "attach_virtual(model) first")
        return self._virtual.report()

    @property
    def inplace_fallback(self) -> list[str]:
        """With ``perturbation="virtual"``: the trainable tensors no supported module reads,
        perturbed in place instead (names, or ``"#group.index"``); [] otherwise."""
        v = self._virtual
        if v is None:
            return []
        return [n for i, n in v.names.items() if i not in v.owned]

    def register_virtual(self, module, name: str) -> None:
        """Virtualise ``module.<name>`` (``perturbation="virtual"``), a tensor read only by
        ``module``'s own forward that no built-in rule covers."""
        if self._virtual is None:
            raise ValueError("register_virtual: this optimizer perturbs in place; call "
                             "attach_virtual(model) first")
        self._virtual.register(module, name)

    def probe_virtual(self, closure) -> None:
        """The first step's probe forward (``virtual_probe``), once per attached model."""
        if self._virtual is not None and not self._virtual.probed:
            probe_first_step(self, closure)


def build_virtual(opt, model) -> VirtualModel:
    """The hooks of ``perturbation="virtual"`` for ``opt``'s trainable tensors in ``model``."""
    if any(g.get("shard_offsets") for g in opt.param_groups):
        raise ValueError("virtual perturbation with shard_offsets: not supported (a sharded "
                         "module's forward reads all-gathered copies, not the shards); perturb "
                         "in place (do not call attach_virtual)")
    names = {}
    for i, g in enumerate(opt.param_groups):
        for j, p in enumerate(g["params"]):
            if p.requires_grad:
                names[id(p)] = g["param_names"][j] if "param_names" in g else f"#{i}.{j}"
    return VirtualModel(model, names)
