"""Where keep-masks come from, and what they leave: mask sources, zeroing, reports.

A mask is a keep-mask: True where a weight lives, False where it was pruned (and is exactly 0).
Every zoengine optimizer takes ``masks=``: a pruned weight gets no perturbation, no update and no
weight decay, so it stays exactly zero for any number of steps (docs/sparsity.md). Optimizers
store masks as bits (``zoengine.optim.masks.pack_mask``).

Sources: ``zoengine.sparsity.prune`` (pruners.py), ``masks_from_zeros`` (a dense checkpoint whose
pruned weights are stored as zeros), ``remove_prune_reparam`` / ``masks_from_prune``
(``torch.nn.utils.prune``), or any dict name -> bool tensor.
"""

from __future__ import annotations

import re

import torch

PATTERNS = ("unstructured", "2:4", "4:8")


def nm_ok(t: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive weights along the last dim has <= n nonzeros
    (``t`` a weight or a keep-mask)."""
    if t.shape[-1] % m:
        return False
    return bool(((t != 0).reshape(-1, m).sum(1) <= n).all())


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); ``"unstructured"`` -> None."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"pattern={pattern!r}: must be 'unstructured' or 'N:M' with 0 < N < M "
                         "(e.g. '2:4', '4:8')")
    return int(m.group(1)), int(m.group(2))


# ---- mask sources ------------------------------------------------------------------------------

def masks_from_zeros(model: torch.nn.Module, layers="auto") -> dict[str, torch.Tensor]:
    """Keep-masks of the prunable weights (``layers`` as in ``prune``) that hold exact zeros."""
    return {f"{n}.weight": mod.weight.detach() != 0 for n, mod in prunable_layers(model, layers)
            if bool((mod.weight == 0).any())}


def remove_prune_reparam(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Make ``torch.nn.utils.prune`` pruning permanent and return its masks.

    ``prune`` keeps ``weight_orig`` (the parameter an optimizer would see), a float
    ``weight_mask`` buffer and a recomputed ``weight`` attribute: three tensors of the weight's
    size. This folds them into one plain ``weight`` parameter holding ``orig * mask`` (exact
    zeros where pruned) and returns ``{"<module>.weight": bool keep-mask}`` for ``masks=``.
    """
    from torch.nn.utils import prune as tprune

    out = {}
    for mname, mod in model.named_modules():
        for hook in [h for h in mod._forward_pre_hooks.values()
                     if isinstance(h, tprune.BasePruningMethod)]:
            name = hook._tensor_name
            keep = getattr(mod, f"{name}_mask").detach() != 0
            tprune.remove(mod, name)
            with torch.no_grad():
                getattr(mod, name).masked_fill_(~keep, 0.0)  # exact zeros (-0.0 -> 0.0)
            out[f"{mname}.{name}" if mname else name] = keep
    return out


def masks_from_prune(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keep the ``torch.nn.utils.prune`` re-parametrisation: masks keyed by ``<module>.weight_orig``
    (the parameter the optimizer sees), so dead entries of ``weight_orig`` are never perturbed
    or updated. Costs ~3x the weight's memory; ``remove_prune_reparam`` is the lean path."""
    return {n[: -len("_mask")] + "_orig": b.detach() != 0 for n, b in model.named_buffers()
            if n.endswith("_mask") and n[: -len("_mask")] + "_orig"
            in dict(model.named_parameters())}


def apply_masks(model: torch.nn.Module, masks: dict) -> None:
    """Zero the pruned weights (mask False) in place; keys are parameter names or tensors."""
    params = dict(model.named_parameters())
    by_id = {id(p): p for p in params.values()}
    with torch.no_grad():
        for k, m in masks.items():
            p = params.get(k) if isinstance(k, str) else by_id.get(id(k))
            if p is None:
                raise ValueError(f"masks has an entry for {k!r} that is not a parameter of the "
                                 "model")
            p.masked_fill_(~m.to(device=p.device, dtype=torch.bool), 0.0)


def mask_memory(masks: dict) -> dict:
    """Bytes of the masks as bool tensors and as bits, and the weights' fp32 bytes."""
    n = sum(m.numel() for m in masks.values())
    return {"elements": n, "bool_bytes": n, "bit_bytes": sum((m.numel() + 7) // 8
                                                             for m in masks.values()),
            "fp32_weight_bytes": 4 * n}


def sparsity_report(model: torch.nn.Module, masks: dict | None = None) -> dict:
    """Zeros in the masked tensors (or in every prunable Linear weight when ``masks`` is None):
    ``{"zeros", "numel", "sparsity", "per_tensor": {name: sparsity}}``."""
    params = dict(model.named_parameters())
    names = list(masks) if masks else [f"{n}.weight" for n, _ in prunable_layers(model)]
    per, zeros, numel = {}, 0, 0
    for n in names:
        p = params[n] if isinstance(n, str) else n
        z = int((p == 0).sum())
        per[str(n)] = z / p.numel()
        zeros, numel = zeros + z, numel + p.numel()
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / max(numel, 1), "per_tensor": per}


# ---- which layers ------------------------------------------------------------------------------

def _tied_to_embedding(model: torch.nn.Module, w: torch.Tensor) -> bool:
    return any(isinstance(m, torch.nn.Embedding) and m.weight.data_ptr() == w.data_ptr()
               for m in model.modules())


def prunable_layers(model: torch.nn.Module, layers="auto") -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers a pruner touches.

    ``"auto"``: every ``nn.Linear`` inside an ``nn.ModuleList`` (the decoder blocks of a
    transformers model), never embeddings, norms, ``lm_head`` or weights tied to an embedding;
    a model without a ModuleList gets all its Linear layers except those. A regex selects by
    module name; a callable ``(name, module) -> bool`` decides itself.
    """
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if callable(layers):
        return [(n, m) for n, m in lins if layers(n, m)]
    if layers != "auto":
        rx = re.compile(layers)
        return [(n, m) for n, m in lins if rx.search(n)]
    in_list = set()
    for ml in (m for m in model.modules() if isinstance(m, torch.nn.ModuleList)):
        in_list |= {id(x) for x in ml.modules()}
    chosen = [(n, m) for n, m in lins if id(m) in in_list] or lins
    return [(n, m) for n, m in chosen if not n.endswith(("lm_head", "embed_out"))
            and not _tied_to_embedding(model, m.weight)]


def block_of(model: torch.nn.Module, name: str) -> str | None:
    """The name of the ModuleList entry (decoder block) that holds module ``name``."""
    for lname, ml in model.named_modules():
        if isinstance(ml, torch.nn.ModuleList) and name.startswith(lname + "."):
            return lname + "." + name[len(lname) + 1:].split(".")[0]
    return None
