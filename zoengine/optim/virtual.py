"""Virtual perturbation: evaluate the loss at θ ± εz without ever writing θ.

In-place perturbation writes θ + εz, θ − εz and θ back into the weights; the restore is not
bit-exact (about half the elements end 1 ulp away; docs/virtual.md), which in bf16 is ~11×
the update itself. Here each trainable tensor is replaced by θ + c·z (noise contract) where
it is read, for that read only:

- a module reading its own parameters (``nn.Linear`` and subclasses, norms, GPT-2's Conv1D,
  3-D expert tensors, PEFT's LoRA A/B, custom modules): a forward pre-hook swaps in a
  perturbed copy, an always-called forward hook swaps the Parameter back, so at most one
  module's perturbed tensors exist at a time (peak memory grows by the largest module only);
  an exact ``nn.Linear`` on the Triton backend runs the fused noisy-linear kernel instead;
- an embedding (``nn.Embedding`` or a subclass): during its forward a torch-function mode
  turns ``F.embedding(ids, θ)`` into the looked-up rows of θ + c·z (``virtual_reads``): a
  batch of 256 tokens costs 256 rows of noise, and a subclass that scales the result (Gemma)
  or shifts the indices (OPT's positions) gets it right.

At the first step a probe (``virtual_probe``) checks every module class and every read; what
fails is perturbed in place and reported. The step's update is then the only write to θ
(``restore_update_`` with eps = 0), so lr = 0 or a skipped step leaves θ bit-identical.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from zoengine.optim.lowrank_noise import is_conv1d, lowrank_forward, lowrank_reads

PERTURBATIONS = ("inplace", "virtual")
_TRITON_OPS = "zoengine.kernels.triton_ops"


class _Replay:
    """``model=VIRTUAL_REPLAY``: no forward runs (a journal replay feeds recorded losses), so
    every tensor is virtual and the step is its update alone."""

    def __repr__(self) -> str:
        return "VIRTUAL_REPLAY"


VIRTUAL_REPLAY = _Replay()


@dataclass
class _Displacement:
    """What is virtually added to one tensor now: Σ_k scales[k]·z_k."""

    key: int
    mask: object  # a zero-argument callable giving the bool mask (unpacked on use), or None
    offset: int
    scales: dict[int, float] = field(default_factory=dict)


class VirtualModel:
    """The hooks that substitute perturbed tensors inside ``model``'s forward.

    ``names``: id(tensor) -> name for the optimizer's trainable tensors. ``owned`` maps each
    virtualised tensor's id to its name; the rest is perturbed in place by the caller, with
    the reason in ``reasons``.
    """

    def __init__(self, model, names: dict[int, str]):
        self.names = names
        self.owned: dict[int, str] = {}
        self.reasons: dict[str, str] = {}  # name -> why it is perturbed in place
        self.handles: list = []
        self.hooked: list = []  # (module, its (owner, attr) pairs) swapped around forwards
        self.displaced: dict[int, _Displacement] = {}
        self.context: tuple | None = None  # (inner ops, seed, step, dist) of the running step
        self.population = None  # a step_batched evaluation's groups (optim/population.py)
        self.consumed: set[int] = set()
        self.replay = model is VIRTUAL_REPLAY
        self.probed = self.replay
        self._internal = 0
        self._tensors: dict[int, torch.Tensor] = {}
        self._classes: dict[int, set] = {}  # id(tensor) -> classes of the modules hooking it
        self._swapped: dict[int, list] = {}  # hook module -> [(owner, attr, Parameter)]
        self._modes: dict[int, list] = {}  # embedding module -> its active EmbeddingReads
        self._probe = None  # the first step's virtual_probe.Probe while it runs
        self._warned = False
        if self.replay:
            self.owned = dict(names)
            return
        # MultiheadAttention reads out_proj.weight without calling out_proj: leave it in place
        skip = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        for module in model.modules():
            if id(module) in skip:
                continue
            if getattr(module, "zo_reads_weights_directly", False):
                # e.g. masked LoRA: its forward reads lora_A/lora_B weights, never calls them;
                # swap its children's tensors around *its* forward instead
                pairs = [(c, a) for c in module.modules() if c is not module
                         for a in ("weight", "bias") if id(c._parameters.get(a)) in names]
                skip |= {id(c) for c, _ in pairs}
                self._hook_pairs(module, pairs)
            elif isinstance(module, nn.Embedding):
                self._own(module, ("weight",), embedding=True)
            else:  # any module reading its own parameters: swapped around its forward
                self._own(module, tuple(module._parameters))
        for n in names.values():
            self.reasons.setdefault(n, "no module of the model owns it")
        for i in self.owned:
            self.reasons.pop(names[i], None)
        for i, n in names.items():
            if i in skip and i not in self.owned:
                self.reasons[n] = "read by nn.MultiheadAttention outside out_proj's forward"

    def _own(self, module: nn.Module, attrs, *, embedding: bool = False) -> list[str]:
        mine = [a for a in attrs if id(module._parameters.get(a)) in self.names]
        if not mine:
            return []
        if embedding:
            p = module._parameters["weight"]
            self._claim(module, p)
            self.handles.append(module.register_forward_pre_hook(self._enter_embedding,
                                                                 prepend=True))
            self.handles.append(module.register_forward_hook(self._leave_embedding,
                                                             always_call=True))
            return mine
        # the fused path re-implements nn.Linear's forward: exact class only (a subclass may
        # compute something else, e.g. Llama4's router returns a tuple)
        if (type(module) is nn.Linear or is_conv1d(module)) and "weight" in mine \
                and "forward" not in vars(module):
            # Triton (Linear): x @ (W + c·z)ᵀ fused; low-rank noise: a rank-r term, either way
            # without materialising W + c·z
            module.forward = functools.partial(self._linear_forward, module, module.forward)
            self.handles.append(_ForwardOverride(module))
        self._hook_pairs(module, [(module, a) for a in mine])
        return mine

    def _claim(self, module: nn.Module, p: torch.Tensor) -> None:
        self.owned[id(p)] = self.names[id(p)]
        self._tensors[id(p)] = p
        self._classes.setdefault(id(p), set()).add(type(module))

    def _hook_pairs(self, module: nn.Module, pairs) -> None:
        """Swap ``owner.<attr>`` for each pair around ``module``'s forward."""
        if not pairs:
            return
        for owner, a in pairs:
            self._claim(module, owner._parameters[a])
        self.hooked.append((module, tuple(pairs)))
        pre = functools.partial(self._swap_in, tuple(pairs))
        self.handles.append(module.register_forward_pre_hook(pre, prepend=True))  # first: every
        # hook of the call sees θ + c·z too
        self.handles.append(module.register_forward_hook(self._swap_out, always_call=True,
                                                         with_kwargs=True))

    def register(self, module: nn.Module, name: str) -> None:
        """Virtualise ``module.<name>``: ``module``'s own forward must be the only reader of
        that tensor (it is swapped for θ + c·z around that forward)."""
        p = module._parameters.get(name) if isinstance(module, nn.Module) else None
        if p is None or id(p) not in self.names:
            raise ValueError(f"register({type(module).__name__}, {name!r}): not a direct "
                             "parameter of that module among the optimizer's trainable tensors")
        if id(p) in self.owned:
            return
        self._own(module, (name,))
        self.reasons.pop(self.names[id(p)], None)
        self.probed = False  # the new class is probed at the next step

    # A model carrying these hooks can still be deep-copied or pickled: the copy's hooks
    # point to this object (deepcopy) or to an empty one (pickle); neither knows the copy's
    # tensors, so on a copy they do nothing.
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return _inert, ()

    def remove(self) -> None:
        """Remove every hook (the optimizer then perturbs nothing virtually)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.hooked.clear()
        self.owned.clear()

    # ---- what the read-tracking modes ask ----------------------------------------------
    @property
    def internal(self) -> bool:
        """True while zoengine itself computes (perturbed copies, the probe's comparisons):
        hooks and modes stand aside."""
        return self._internal > 0

    @contextlib.contextmanager
    def inside(self):
        self._internal += 1
        try:
            yield
        finally:
            self._internal -= 1

    @staticmethod
    def displacement(key: int, mask, offset: int) -> _Displacement:
        return _Displacement(key, mask, offset)

    def classes_of(self, i: int) -> set:
        """The classes of the modules whose forward substitutes tensor ``id`` i."""
        return self._classes.get(i, set())

    def report(self) -> dict[str, str]:
        """Each trainable tensor's name -> ``"virtual"`` or ``"in place: <reason>"``."""
        return {n: "virtual" if i in self.owned else f"in place: {self.reasons.get(n, '?')}"
                for i, n in self.names.items()}

    def owned_tensor(self, t: torch.Tensor) -> bool:
        return self._tensors.get(id(t)) is t and id(t) in self.owned

    def reading(self, t: torch.Tensor) -> bool:
        """True while a forward that substitutes ``t`` runs (a read of ``t`` there is the
        substituted one in a step)."""
        return self._probe is not None and self._probe.active.get(id(t), 0) > 0

    # ---- inside the forward -----------------------------------------------------------
    def perturbed(self, p: torch.Tensor) -> torch.Tensor:
        """A fresh copy of ``p`` + Σ c_k z_k, by the step's own ops (so it carries exactly the
        numbers in-place perturbation would have written first)."""
        return self._perturbed(p)

    def scales_of(self, i: int) -> dict[int, float]:
        """{sample: c} displacing tensor ``id`` i now: the step's, or the current group's of a
        batched evaluation (a read that no group owns is refused there)."""
        if self.population is not None:
            return self.population.scales_now(i)
        return self.displaced[i].scales

    def _perturbed(self, p: torch.Tensor) -> torch.Tensor:
        d = self.displaced[id(p)]
        ops, seed, step, dist = self.context
        with self.inside():
            w = p.detach().clone()
            for k, c in self.scales_of(id(p)).items():
                extra = {"offsets": [d.offset]} if d.offset else {}
                ops.perturb_([w], [d.key], seed=seed, step=step, sample=k, scale=c, dist=dist,
                             masks=None if d.mask is None else [d.mask()], **extra)
        self.consumed.add(id(p))
        return w

    def _fusable(self, module: nn.Module):
        """(sample, scale, weight's, bias's displacement) when ``module`` (an nn.Linear) can
        run the fused noisy-linear kernel now, else None: the step's ops are Triton's, one
        sample is displaced, and the bias (if displaced) moves with the weight."""
        if not self.displaced or self.internal or self.population is not None \
                or type(module) is not nn.Linear \
                or getattr(self.context[0], "__name__", "") != _TRITON_OPS \
                or os.environ.get("ZOENGINE_VIRTUAL_LINEAR", "fused") != "fused":
            return None
        d = self.displaced.get(id(module._parameters["weight"]))
        if d is None or len(d.scales) != 1 or d.offset:
            return None
        bias = module._parameters.get("bias")
        db = None if bias is None else self.displaced.get(id(bias))
        if db is not None and (db.scales != d.scales or db.offset):
            return None
        (k, c), = d.scales.items()
        return k, c, d, db

    def _linear_forward(self, module: nn.Linear, original, x):
        if self.population is not None and self.population.active is None:
            from zoengine.optim.population import grouped_linear

            return grouped_linear(self, module, original, x)
        plan = self._fusable(module)
        if plan is None:  # low-rank noise: x·Wᵀ + c·(x·V)·Uᵀ, else the pre-hook's copy
            out = lowrank_forward(self, module, original, x)
            return original(x) if out is None else out
        from zoengine.kernels.triton_noisy_linear import noisy_linear

        k, c, d, db = plan
        _, seed, step, dist = self.context
        w, b = module._parameters["weight"], module._parameters.get("bias")
        self.consumed.update({id(w)} | ({id(b)} if db is not None else set()))
        with self.inside():
            out = noisy_linear(x, w, b if db is not None else None, key=d.key, seed=seed,
                               step=step, sample=k, scale=c, dist=dist,
                               mask=None if d.mask is None else d.mask(),
                               bias_key=None if db is None else db.key,
                               bias_mask=None if db is None or db.mask is None else db.mask())
            return out if b is None or db is not None else out + b

    def _swap_in(self, pairs, module: nn.Module, args) -> None:
        if self.internal:
            return
        if self._probe is not None:
            self._probe.enter(module, [owner._parameters[a] for owner, a in pairs])
        if not self.displaced or (self.population is not None
                                  and self.population.active is None):
            return  # nothing displaced, or a batched forward's override swaps per group
        if isinstance(module, nn.Linear) and self._fusable(module) is not None:
            return  # _linear_forward computes it fused
        keep = lowrank_reads(self, module)  # the forward adds these as a rank-r term
        for owner, a in pairs:
            p = owner._parameters[a]
            if id(p) in self.displaced and id(p) not in keep:
                self._swapped.setdefault(id(module), []).append((owner, a, p))
                owner._parameters[a] = self._perturbed(p)

    def _swap_out(self, module: nn.Module, args, kwargs, output):
        if self.internal:
            return None
        swapped = self._swapped.pop(id(module), [])
        for owner, a, p in swapped:
            owner._parameters[a] = p
        if self._probe is not None:
            self._probe.leave(module, args, kwargs, output)
        return None

    def _enter_embedding(self, module: nn.Module, args) -> None:
        if self.internal:
            return
        p = module._parameters["weight"]
        if self._probe is not None:
            self._probe.enter(module, [p])
        if id(p) in self.displaced:
            from zoengine.optim.virtual_reads import EmbeddingReads

            mode = EmbeddingReads(self, p)
            mode.__enter__()
            self._modes.setdefault(id(module), []).append(mode)

    def _leave_embedding(self, module: nn.Module, args, output):
        if self.internal:
            return None
        modes = self._modes.get(id(module))
        if modes:
            modes.pop().__exit__(None, None, None)
        if self._probe is not None:
            self._probe.leave(module, args, {}, output)
        return None

    def check_consumed(self) -> None:
        """Warn once when a displaced tensor was never read by its module in a forward: its
        model reads it some other way (FSDP's unsharded copies, custom code), so the loss did
        not see the perturbation."""
        if self.replay or self._warned:
            return
        missed = [self.names[i] for i in self.displaced if i not in self.consumed]
        if missed and self.consumed:
            self._warned = True
            warnings.warn(
                f"virtual perturbation: {len(missed)} tensor(s) were perturbed but no forward "
                f"read them through their module (e.g. {missed[:3]}); if the model reads them "
                "outside that module's forward (FSDP, custom code), perturb in place (do not "
                "call attach_virtual)", UserWarning, stacklevel=4)


def check_perturbation(perturbation, model) -> str:
    """Validate ``perturbation=`` / ``model=`` of an optimizer."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation={perturbation!r}: must be one of {PERTURBATIONS}")
    if perturbation == "inplace" and model is not None:
        raise ValueError("model= is only used with perturbation='virtual' (in-place "
                         "perturbation writes the parameters themselves)")
    if perturbation == "virtual" and model is None:
        raise ValueError("virtual perturbation needs a model: attach_virtual(model), model the "
                         "nn.Module whose forward reads the parameters (its modules substitute "
                         "θ + c·z)")
    if perturbation == "virtual" and model is not VIRTUAL_REPLAY and not isinstance(
            model, nn.Module):
        raise ValueError(f"model={type(model).__name__}: must be a torch.nn.Module")
    return perturbation


def attach(opt, model) -> VirtualModel:
    """Perturb ``opt``'s tensors virtually through ``model``'s modules: the same as
    ``opt.attach_virtual(model)`` (``ZO.attach_virtual`` has the details). Returns the hooks'
    owner (``remove()`` takes them off)."""
    return opt.attach_virtual(model)


class _ForwardOverride:
    """A removable handle for the instance-level ``forward`` of a fused nn.Linear."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        vars(self.module).pop("forward", None)


def _inert() -> VirtualModel:
    """An empty VirtualModel: what a pickled model's hooks come back as."""
    return VirtualModel(nn.Module(), {})
