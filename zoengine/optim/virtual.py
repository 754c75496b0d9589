"""Virtual perturbation: evaluate the loss at θ ± εz without ever writing θ.

In-place perturbation writes θ + εz, θ − εz and θ back into the weights; the restore is not
bit-exact (about half the elements end 1 ulp away, research/algorithms.md §0.4), which in bf16
is ~11× the update itself. Here each trainable tensor consumed by a supported module is
replaced, for that module's forward only, by θ + c·z from the noise contract:

- ``nn.Linear``, ``nn.LayerNorm``, ``*RMSNorm`` (LLaMA-style, by class name), PEFT's LoRA
  A/B (they are ``nn.Linear``) and tensors the user registers: a forward pre-hook swaps in a
  perturbed copy, an always-called forward hook swaps the parameter back, so at most one
  module's perturbed tensors exist at a time (peak memory grows by the largest layer only);
- ``nn.Embedding``: a forward hook adds c·z to the looked-up rows only (z of those elements,
  ``kernels.philox.noise_at``): a batch of 256 tokens costs 256 rows of noise, not the table.

Tensors no supported module owns are perturbed in place as before and listed in
``inplace_fallback``. The step's update is then the only write to θ (``restore_update_`` with
eps = 0), so lr = 0 or a skipped step leaves θ bit-identical.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import noise_at
from zoengine.kernels.reference import compute_dtype
from zoengine.optim.masks import LazyMask

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


def _is_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(
        module._parameters.get("weight"), nn.Parameter)


def _swap_kind(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.LayerNorm)) or _is_rmsnorm(module)


class VirtualModel:
    """The hooks that substitute perturbed tensors inside ``model``'s forward.

    ``names``: id(tensor) -> name for the optimizer's trainable tensors. ``owned`` maps each
    virtualised tensor's id to its name; the rest is perturbed in place by the caller.
    """

    def __init__(self, model, names: dict[int, str]):
        self.names = names
        self.owned: dict[int, str] = {}
        self.handles: list = []
        self.displaced: dict[int, _Displacement] = {}
        self.context: tuple | None = None  # (inner ops, seed, step, dist) of the running step
        self.consumed: set[int] = set()
        self.replay = model is VIRTUAL_REPLAY
        self._swapped: dict[int, list] = {}  # hook module -> [(owner, attr, Parameter)]
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
            elif _swap_kind(module):
                self._own(module, ("weight", "bias"))

    def _own(self, module: nn.Module, attrs, *, embedding: bool = False) -> list[str]:
        mine = [a for a in attrs if id(module._parameters.get(a)) in self.names]
        if not mine:
            return []
        if embedding:
            p = module._parameters["weight"]
            self.owned[id(p)] = self.names[id(p)]
            self.handles.append(module.register_forward_hook(self._embedding_hook))
            return mine
        if isinstance(module, nn.Linear) and "weight" in mine and "forward" not in vars(module):
            # the Triton backend computes x @ (W + c·z)ᵀ without materialising W + c·z
            module.forward = functools.partial(self._linear_forward, module, module.forward)
            self.handles.append(_ForwardOverride(module))
        self._hook_pairs(module, [(module, a) for a in mine])
        return mine

    def _hook_pairs(self, module: nn.Module, pairs) -> None:
        """Swap ``owner.<attr>`` for each pair around ``module``'s forward."""
        if not pairs:
            return
        for owner, a in pairs:
            p = owner._parameters[a]
            self.owned[id(p)] = self.names[id(p)]
        pre = functools.partial(self._swap_in, tuple(pairs))
        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(self._swap_out, always_call=True))

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
        self.owned.clear()

    # ---- inside the forward -----------------------------------------------------------
    def _perturbed(self, p: torch.Tensor) -> torch.Tensor:
        """A fresh copy of ``p`` + Σ c_k z_k, by the step's own ops (so it carries exactly the
        numbers in-place perturbation would have written first)."""
        d = self.displaced[id(p)]
        ops, seed, step, dist = self.context
        w = p.detach().clone()
        for k, c in d.scales.items():
            extra = {"offsets": [d.offset]} if d.offset else {}
            ops.perturb_([w], [d.key], seed=seed, step=step, sample=k, scale=c, dist=dist,
                         masks=None if d.mask is None else [d.mask()], **extra)
        return w

    def _fusable(self, module: nn.Module):
        """(sample, scale, weight's, bias's displacement) when ``module`` (an nn.Linear) can
        run the fused noisy-linear kernel now, else None: the step's ops are Triton's, one
        sample is displaced, and the bias (if displaced) moves with the weight."""
        if not self.displaced or getattr(self.context[0], "__name__", "") != _TRITON_OPS \
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
        plan = self._fusable(module)
        if plan is None:
            return original(x)
        from zoengine.kernels.triton_noisy_linear import noisy_linear

        k, c, d, db = plan
        _, seed, step, dist = self.context
        w, b = module._parameters["weight"], module._parameters.get("bias")
        self.consumed.update({id(w)} | ({id(b)} if db is not None else set()))
        out = noisy_linear(x, w, b if db is not None else None, key=d.key, seed=seed,
                           step=step, sample=k, scale=c, dist=dist,
                           mask=None if d.mask is None else d.mask(),
                           bias_key=None if db is None else db.key,
                           bias_mask=None if db is None or db.mask is None else db.mask())
        return out if b is None or db is not None else out + b

    def _swap_in(self, pairs, module: nn.Module, args) -> None:
        if not self.displaced:
            return
        if isinstance(module, nn.Linear) and self._fusable(module) is not None:
            return  # _linear_forward computes it fused
        for owner, a in pairs:
            p = owner._parameters[a]
            if id(p) in self.displaced:
                self._swapped.setdefault(id(module), []).append((owner, a, p))
                owner._parameters[a] = self._perturbed(p)
                self.consumed.add(id(p))

    def _swap_out(self, module: nn.Module, args, output):
        for owner, a, p in self._swapped.pop(id(module), []):
            owner._parameters[a] = p
        return None

    def _embedding_hook(self, module: nn.Embedding, args, output):
        p = module.weight
        d = self.displaced.get(id(p))
        if d is None or not isinstance(self.context[0], types.ModuleType):
            return self._embedding_swapped(module, args, output, d)
        self.consumed.add(id(p))
        _, seed, step, dist = self.context
        ids = args[0].to(torch.int64).unsqueeze(-1)
        dim = p.shape[1]
        index = ids * dim + torch.arange(dim, device=ids.device) + d.offset
        mask = None if d.mask is None else d.mask().reshape(p.shape)[args[0]]
        ct = compute_dtype(p.dtype)
        out = output.to(ct)
        for k, c in d.scales.items():
            z = noise_at(index, key64=stream_key(seed, step, k), tensor_key=d.key,
                         dist=dist).to(device=out.device, dtype=ct)
            if mask is not None:
                z = z * mask
            out = (out + z * c).to(p.dtype).to(ct)  # rounded per sample, as perturb_ chains
        return out.to(p.dtype)

    def _embedding_swapped(self, module, args, output, d):
        """A non-contract noise source (PeZO's pool/lanes, hardware models): the rows' z is
        only defined through the ops, so the perturbed table is built whole, as for Linear."""
        if d is None:
            return None
        self.consumed.add(id(module.weight))
        return nn.functional.embedding(args[0], self._perturbed(module.weight),
                                       module.padding_idx, module.max_norm, module.norm_type,
                                       module.scale_grad_by_freq, module.sparse)

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


class VirtualOps:
    """``ops`` for ``functional.zo_step``: virtualised tensors get their displacement recorded
    (the hooks apply it), the rest go to the ``inner`` backend's in-place ops."""

    def __init__(self, inner, virtual: VirtualModel):
        self.inner, self.virtual = inner, virtual
        virtual.displaced.clear()  # a new step: nothing is displaced, nothing read yet
        virtual.consumed.clear()

    def _split(self, params, keys, masks, offsets):
        """(virtual, in-place) lists of (tensor, key, mask getter, offset)."""
        mine, rest = [], []
        for i, (p, k) in enumerate(zip(params, keys)):
            o = 0 if offsets is None else offsets[i]
            (mine if id(p) in self.virtual.owned else rest).append((p, k, _mask_getter(masks, i), o))
        return mine, rest

    @staticmethod
    def _lists(items):
        ps, ks = [p for p, _, _, _ in items], [k for _, k, _, _ in items]
        ms = [None if m is None else m() for _, _, m, _ in items]
        os_ = [o for _, _, _, o in items]
        extra = {"offsets": os_} if any(os_) else {}
        return ps, ks, (ms if any(m is not None for m in ms) else None), extra

    def perturb_(self, params, keys, *, seed, step, sample=0, scale, dist="normal",
                 masks=None, offsets=None) -> None:
        mine, rest = self._split(params, keys, masks, offsets)
        if rest:
            ps, ks, ms, extra = self._lists(rest)
            self.inner.perturb_(ps, ks, seed=seed, step=step, sample=sample, scale=scale,
                                dist=dist, masks=ms, **extra)
        v = self.virtual
        v.context = (self.inner, seed, step, dist)
        for p, k, m, o in mine:
            d = v.displaced.setdefault(id(p), _Displacement(k, m, o))
            total = d.scales.get(sample, 0.0) + scale
            if total == 0.0:  # exact: the walk's ±ε moves are exact multiples of one value
                d.scales.pop(sample, None)
                if not d.scales:
                    del v.displaced[id(p)]
            else:
                d.scales[sample] = total

    def restore_update_(self, params, keys, *, eps, masks=None, offsets=None, **kw) -> None:
        """The fallback tensors restore and update in one pass; the virtual ones, which were
        never written, get the update alone (eps = 0)."""
        mine, rest = self._split(params, keys, masks, offsets)
        if rest:
            ps, ks, ms, extra = self._lists(rest)
            self.inner.restore_update_(ps, ks, eps=eps, masks=ms, **extra, **kw)
        v = self.virtual
        v.check_consumed()
        for p, _, _, _ in mine:
            v.displaced.pop(id(p), None)
        if not v.displaced:
            v.consumed.clear()
        if mine:
            ps, ks, ms, extra = self._lists(mine)
            self.inner.restore_update_(ps, ks, eps=0.0, masks=ms, **extra, **kw)

    def __getattr__(self, name):  # anything else the step asks of its ops
        return getattr(self.inner, name)


def _mask_getter(masks, i: int):
    """A getter of ``masks[i]`` that unpacks a LazyMask only when called, or None."""
    if masks is None:
        return None
    if isinstance(masks, LazyMask):
        return lambda: masks[i]
    m = masks[i]
    return None if m is None else (lambda: m)


class _ForwardOverride:
    """A removable handle for the instance-level ``forward`` of a fused nn.Linear."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        vars(self.module).pop("forward", None)


def _inert() -> VirtualModel:
    """An empty VirtualModel: what a pickled model's hooks come back as."""
    return VirtualModel(nn.Module(), {})
