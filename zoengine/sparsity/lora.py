"""Sparsity-preserving LoRA: the adapter's delta is masked, ΔW = (B·A) ⊙ M, so a merge keeps
every pruned zero.

Plain LoRA on a pruned model keeps the zeros while training, since the base is frozen, but
merging writes W + s·B·A, and B·A is dense. After a merge the model is no longer sparse and its
N:M groups are no longer valid. ``mask_lora`` changes each masked PEFT ``lora.Linear`` so that
its forward computes

    y = base_layer(x) + (dropout(x) @ ((B·A) ⊙ M)ᵀ [+ b_B]) · scaling

for every active adapter (``scaling`` is PEFT's: α/r, or α/√r with ``use_rslora``, the scale
RoRA proposes). ``merge_masked_lora`` then writes W ← W + ((B·A) ⊙ M)·scaling. The result has
the pruned model's zeros exactly, and its outputs equal the adapter model's.

Built on PEFT: each masked layer's class is swapped for ``MaskedLoraLinear``, a subclass of
``peft.tuners.lora.layer.Linear``. It adds no parameters and one non-persistent buffer, so
PEFT's ``save_pretrained`` / ``PeftModel.from_pretrained`` work unchanged (the mask is not saved:
call ``mask_lora`` again after loading). ``get_delta_weight`` is masked too, so PEFT's own
``merge_adapter`` / ``merge_and_unload`` keep the zeros as well.

Memory: M is stored as bits (``zoengine.optim.masks.pack_mask``), 1/8 byte per weight. The
masked delta of a layer exists only inside that layer's forward (at most one layer's at a time
under ``torch.no_grad``, the zeroth-order setting; with autograd on, F.linear saves it for
backward). B·A is read from the weights, so lora_A / lora_B are not *called*: such modules carry
``zo_reads_weights_directly = True`` (forward hooks on lora_A / lora_B never fire).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer

from zoengine.optim.masks import pack_mask, unpack_mask

SCALINGS = ("lora", "rslora")
_BITS = "zo_keep_bits"  # no "lora_" in the name: PEFT's adapter state-dict filter ignores it
_PREFIX = "base_model.model."


def lora_config(r: int, alpha: float, targets, scaling: str = "lora", dropout: float = 0.0,
                **extra):
    """A ``peft.LoraConfig`` for a causal LM, as the CLI builds it.

    ``scaling="lora"`` gives PEFT's α/r. ``"rslora"`` sets ``use_rslora=True``, which gives α/√r,
    the rank-stabilised scale (Kalajdzievski 2023), the one RoRA proposes.
    ``extra`` goes to ``LoraConfig`` unchanged (e.g. ``init_lora_weights=False``).
    """
    from peft import LoraConfig

    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r}: must be one of {SCALINGS} ('lora': alpha/r, "
                         "'rslora': alpha/sqrt(r))")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      task_type="CAUSAL_LM", use_rslora=scaling == "rslora", **extra)


# ---- the masked layer --------------------------------------------------------------------------

def _keep(module) -> torch.Tensor:
    """The layer's keep-mask in (out, in) orientation, the orientation of B·A."""
    w = module.get_base_layer().weight
    m = unpack_mask(getattr(module, _BITS), w.shape)
    return m.T if module.fan_in_fan_out else m


def _check_vanilla(module, adapter: str, name: str = "") -> None:
    variants = getattr(module, "lora_variant", {})  # PEFT >= 0.15; older ones have use_dora only
    if adapter in variants or module.use_dora.get(adapter, False):
        kind = type(variants[adapter]).__name__ if adapter in variants else "DoRA"
        raise ValueError(f"{name or 'module'}: adapter {adapter!r} is a LoRA variant ({kind}); "
                         "masked LoRA supports plain LoRA only (no DoRA or other variants)")


def _masked_delta(module, adapter: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B·A) ⊙ M of one adapter, in (out, in) orientation, unscaled (``dtype``: B's if None).

    A fresh tensor of the layer's size: the only weight-sized transient of the masked forward.
    """
    _check_vanilla(module, adapter)
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    delta = b @ a
    return delta.mul_(_keep(module))


class MaskedLoraLinear(LoraLinear):
    """PEFT's ``lora.Linear`` whose delta is masked by the base weight's keep-mask.

    Made by ``mask_lora`` (class swap plus a bits buffer), undone by ``unmask_lora``.
    """

    zo_reads_weights_directly = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("masked LoRA does not support adapter_names= (mixed-adapter batches)")
        for k in ("alora_offsets",):  # PEFT's VARIANT_KWARG_KEYS: not for the base layer
            kwargs.pop(k, None)
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        out_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            xa = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
            delta = _masked_delta(self, adapter)
            lora = F.linear(self.lora_dropout[adapter](xa), delta, self.lora_B[adapter].bias)
            del delta
            result = result + lora * self.scaling[adapter]
        return result.to(out_dtype)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """PEFT's delta, masked: PEFT's merge/unmerge/merge_and_unload keep the zeros too."""
        _check_vanilla(self, adapter)
        delta = super().get_delta_weight(adapter)
        m = unpack_mask(getattr(self, _BITS), delta.shape)
        return delta.masked_fill_(~m, 0.0)


# ---- mask_lora / unmask_lora -------------------------------------------------------------------

def _canon(name: str) -> str:
    """Base-model parameter name: strips PeftModel's prefix and the ``.base_layer`` level."""
    if name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    return name.replace(".base_layer.", ".").replace(".base_layer", "")


def _lora_layers(model) -> dict[str, tuple[str, LoraLayer]]:
    """{canonical base-weight name: (module name, module)} of every PEFT LoRA layer."""
    return {_canon(f"{n}.weight"): (n, m) for n, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def _plain(module) -> bool:
    return type(module) in (LoraLinear, MaskedLoraLinear)


def _resolve(model, masks: dict, lins: dict, strict: bool) -> dict[str, torch.Tensor]:
    """masks keyed by names or tensors -> {canonical base-weight name: mask}; checks names."""
    params = {_canon(n): p for n, p in model.named_parameters()}
    by_id = {id(p): n for n, p in params.items()}
    out = {}
    for key, mask in masks.items():
        if isinstance(key, str):
            name = _canon(key)
            if name not in params:
                raise ValueError(f"masks has an entry for {key!r} that is not a weight of the "
                                 "model")
        else:
            name = by_id.get(id(key))
            if name is None:
                raise ValueError("masks has a tensor key that is not a parameter of the model")
        if name in lins:
            out[name] = mask
        elif strict or params[name].requires_grad:
            raise ValueError(f"masks has an entry for {name!r}, which is not the base weight of a "
                             "PEFT LoRA layer (LoRA-wrapped layers: "
                             f"{sorted(lins)[:4]}{' ...' if len(lins) > 4 else ''}); a frozen "
                             "weight keeps its zeros anyway (strict=False skips it)")
    return out


def _check_mask(name: str, module, mask: torch.Tensor) -> torch.Tensor:
    if not _plain(module):
        raise ValueError(f"masks[{name!r}]: its layer is a {type(module).__name__}; masked LoRA "
                         "supports PEFT's plain lora.Linear only (not embeddings, convolutions "
                         "or quantized layers)")
    w = module.get_base_layer().weight
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)}; the base weight has "
                         f"shape {tuple(w.shape)}")
    keep = mask.detach().to(device=w.device)
    keep = keep if keep.dtype == torch.bool else keep != 0
    if bool((w.detach()[~keep] != 0).any()):
        raise ValueError(f"masks[{name!r}] masks non-zero base weights: masked LoRA keeps zeros, "
                         "so prune (or zero) the base weight first (sparsity.apply_masks)")
    for adapter in module.lora_A:
        _check_vanilla(module, adapter, name)
    return keep


def _install(module, keep: torch.Tensor) -> None:
    module.register_buffer(_BITS, pack_mask(keep), persistent=False)
    module.__class__ = MaskedLoraLinear


def mask_lora(peft_model: torch.nn.Module, masks: dict | None = None, *,
              strict: bool = False) -> list[str]:
    """Mask the delta of each PEFT ``lora.Linear`` by its base weight's keep-mask.

    Args:
        peft_model: a ``PeftModel`` (or any module holding PEFT ``lora.Linear`` layers).
        masks: ``{base-weight name or tensor: keep-mask}`` as ``sparsity.prune`` or
            ``masks_from_zeros`` return them for the base model. Names may be the base
            model's (``model.layers.0.mlp.up_proj.weight``) or the PeftModel's
            (``base_model.model.….base_layer.weight``). None: M = (W != 0) for every plain
            lora.Linear whose base weight holds a zero (other LoRA layer types are left alone).
        strict: also refuse masks of frozen weights that no LoRA layer wraps. By default those are
            skipped, since a frozen, unmerged weight keeps its zeros anyway.

    Returns the module names of the masked layers. Raises ValueError, naming the key or
    module, for an unknown name, a mask of the wrong shape, a mask over non-zero base weights,
    or a LoRA variant (DoRA, ...).
    """
    lins = _lora_layers(peft_model)
    if masks is None:
        keeps = {n: m.get_base_layer().weight.detach() != 0 for n, (_, m) in lins.items()
                 if _plain(m) and bool((m.get_base_layer().weight == 0).any())}
    else:
        keeps = _resolve(peft_model, masks, lins, strict)
    checked = [(lins[n][0], lins[n][1], _check_mask(n, lins[n][1], k)) for n, k in keeps.items()]
    for _, module, keep in checked:  # all checked before any layer changes
        _install(module, keep)
    return [n for n, _, _ in checked]


def unmask_lora(peft_model: torch.nn.Module) -> list[str]:
    """Undo ``mask_lora``: plain PEFT ``lora.Linear`` layers again. Returns their names."""
    names = []
    for n, m in peft_model.named_modules():
        if isinstance(m, MaskedLoraLinear):
            m.__class__ = LoraLinear
            delattr(m, _BITS)
            names.append(n)
    return names


# ---- merge -------------------------------------------------------------------------------------

@torch.no_grad()
def _merge_one(name: str, module: MaskedLoraLinear) -> None:
    """W ← W + ((B·A) ⊙ M)·s for the active, unmerged adapters, in float32 (float64 for float64
    weights), rounded once to W's dtype."""
    base = module.get_base_layer()
    w = base.weight
    for adapter in module.active_adapters:
        if adapter not in module.lora_A or adapter in module.merged_adapters:
            continue
        dtype = torch.promote_types(w.dtype, torch.float32)
        delta = _masked_delta(module, adapter, dtype).mul_(module.scaling[adapter])
        if module.fan_in_fan_out:
            delta = delta.T
        w.data.copy_(delta.add_(w.detach()))  # fp32 sum, one rounding to w's dtype
        del delta
        b = module.lora_B[adapter].bias
        if b is not None:
            if base.bias is None:
                raise ValueError(f"{name}: lora_bias needs a base layer with a bias to merge")
            base.bias.data.add_(b.detach() * module.scaling[adapter])
        module.merged_adapters.append(adapter)
    keep = unpack_mask(getattr(module, _BITS), w.shape)
    bad = int((w.detach()[~keep] != 0).sum())
    if bad:
        raise RuntimeError(f"{name}: {bad} pruned weights are non-zero after the masked merge")


def merge_masked_lora(peft_model: torch.nn.Module) -> torch.nn.Module:
    """Merge every adapter and return the plain base model (no PEFT wrappers).

    Masked layers (``mask_lora``) get W ← W + ((B·A) ⊙ M)·scaling, one layer at a time. The sum
    is formed in float32 and rounded once to the weight's dtype. Each pruned weight is checked to
    be exactly 0 afterwards (RuntimeError otherwise), so N:M groups stay valid. Other LoRA layers
    merge through PEFT's own ``merge``. Works on a ``PeftModel`` or a ``LoraModel``.
    """
    for name, module in peft_model.named_modules():
        if isinstance(module, MaskedLoraLinear):
            _merge_one(name, module)
        elif isinstance(module, LoraLayer):
            module.merge()
    return peft_model.unload()


def merged_sparsity(peft_model: torch.nn.Module, names) -> dict:
    """``sparsity_report``'s numbers for the weights a merge would write, without merging: per
    base-weight name in ``names``, the zeros of W + Σ ((B·A) ⊙ M)·s (LoRA layers; one layer's
    sum at a time, in float32) or of W (frozen layers)."""
    lins = _lora_layers(peft_model)
    base = {_canon(n): p for n, p in peft_model.named_parameters()}
    per, zeros, numel = {}, 0, 0
    for name in names:
        if name in lins:
            module = lins[name][1]
            w = module.get_base_layer().weight.detach().float()
            for adapter in module.active_adapters:
                if adapter in module.lora_A and adapter not in module.merged_adapters:
                    delta = (_masked_delta(module, adapter, torch.float32)
                             if isinstance(module, MaskedLoraLinear)
                             else module.lora_B[adapter].weight.float()
                             @ module.lora_A[adapter].weight.float())
                    w = w + (delta.T if module.fan_in_fan_out else delta) * module.scaling[adapter]
        elif name in base:
            w = base[name].detach()
        else:
            raise ValueError(f"merged_sparsity: {name!r} is not a weight of this model")
        z = int((w == 0).sum())
        per[name] = z / w.numel()
        zeros, numel = zeros + z, numel + w.numel()
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / max(numel, 1), "per_tensor": per}
