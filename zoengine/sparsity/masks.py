"""Where keep-masks come from, and what they leave: mask sources, zeroing, reports.

A mask is a keep-mask: True where a weight lives, False where it was pruned (and is exactly 0).
Every zoengine optimizer takes ``masks=``: a pruned weight gets no perturbation, no update and no
weight decay, so it stays exactly zero for any number of steps (docs/sparsity.md). Optimizers
store masks as bits (``zoengine.optim.masks.pack_mask``).

Sources: ``zoengine.sparsity.prune`` (pruners.py), ``masks_from_zeros`` (a dense checkpoint whose
pruned weights are stored as zeros), ``remove_prune_reparam`` / ``masks_from_prune``
(``torch.nn.utils.prune``), or any dict name -> bool tensor.

Which weights are prunable (nn.Linear, Conv1D, 3-D expert tensors) is decided in weights.py
(``prunable_weights``, re-exported here); ``sparsity_report`` breaks the pruned share down per
kind of tensor (attention, mlp, experts, other) and lists what was not pruned (routers,
embeddings, lm_head, norms and biases).
"""

from __future__ import annotations

import re

import torch

from zoengine.sparsity.weights import (  # noqa: F401  (re-exported: masks' old home)
    KINDS,
    LAYOUTS,
    PrunableWeight,
    _candidates,
    _embedding_params,
    _tied_to_embedding,
    block_of,
    experts_layout,
    is_conv1d,
    is_router,
    prunable_layers,
    prunable_weights,
    weight_kind,
)

PATTERNS = ("unstructured", "2:4", "4:8")


def nm_ok(t: torch.Tensor, n: int, m: int, dim: int = -1) -> bool:
    """True when every group of ``m`` consecutive weights along ``dim`` (the input dimension:
    -1 for nn.Linear and ``experts`` layouts, 0 for a Conv1D weight, 1 for ``experts_t``;
    ``PrunableWeight.in_dim``) has <= n nonzeros (``t`` a weight or a keep-mask)."""
    t = t.movedim(dim, -1)
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
    """Keep-masks ``{"<module>.<param>": bool}`` of the prunable weights (``layers`` as in
    ``prune``: Linear, Conv1D and expert tensors) that hold exact zeros."""
    return {w.name: w.weight.detach() != 0 for w in prunable_weights(model, layers)
            if bool((w.weight == 0).any())}


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


# ---- reports -----------------------------------------------------------------------------------

def _unpruned_kind(model, name: str, module: torch.nn.Module, parent, p: torch.Tensor,
                   emb) -> str:
    if isinstance(module, torch.nn.Embedding) or _tied_to_embedding(model, p, emb):
        return "embeddings"
    if name.rsplit(".", 1)[0].endswith(("lm_head", "embed_out")):
        return "lm_head"
    mod_name = name.rsplit(".", 1)[0] if "." in name else ""
    if is_router(mod_name, module, parent):
        return "router"
    if p.dim() < 2 or name.endswith(("bias", "_bias")):
        return "norms_and_biases"
    return "other"


def sparsity_report(model: torch.nn.Module, masks: dict | None = None) -> dict:
    """Zeros in the masked tensors (or in every prunable weight when ``masks`` is None).

    Returns ``{"zeros", "numel", "sparsity", "per_tensor": {name: sparsity}, "per_kind":
    {kind: {"tensors", "numel", "zeros", "sparsity"}}, "not_pruned": {kind: {"tensors",
    "numel", "names"}}, "model_sparsity"}``. ``sparsity`` is the true share of zeros over the
    tensors it names; ``per_kind`` splits it into attention, mlp, experts and other (the kinds of
    ``prunable_weights``); ``not_pruned`` lists every other parameter of the model by kind
    (router, embeddings, lm_head, norms_and_biases (counted, not named), other, and the
    prunable kinds for weights ``layers=`` left out), and
    ``model_sparsity`` is the masked zeros over every parameter of the model."""
    params = dict(model.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    if masks:
        names = [k if isinstance(k, str) else by_id[id(k)] for k in masks]
    else:
        names = [w.name for w in prunable_weights(model)]
    cand = {w.name: w for w in _candidates(model)}
    per, kinds, zeros, numel = {}, {}, 0, 0
    for n in names:
        p = params[n]
        z = int((p == 0).sum())
        per[n] = z / max(p.numel(), 1)
        k = kinds.setdefault(cand[n].kind if n in cand else weight_kind(n),
                             {"tensors": 0, "numel": 0, "zeros": 0})
        k["tensors"] += 1
        k["numel"] += p.numel()
        k["zeros"] += z
        zeros, numel = zeros + z, numel + p.numel()
    for k in kinds.values():
        k["sparsity"] = k["zeros"] / max(k["numel"], 1)
    mods = dict(model.named_modules())
    emb, chosen, rest = _embedding_params(model), set(names), {}
    for n, p in params.items():
        if n in chosen:
            continue
        mname = n.rsplit(".", 1)[0] if "." in n else ""
        pname = mname.rsplit(".", 1)[0] if "." in mname else ""
        kind = _unpruned_kind(model, n, mods.get(mname), mods.get(pname) if mname else None,
                              p, emb)
        if kind == "other" and n in cand:  # a prunable weight that layers= left out
            kind = cand[n].kind
        r = rest.setdefault(kind, {"tensors": 0, "numel": 0, "names": []})
        r["tensors"] += 1
        r["numel"] += p.numel()
        if kind != "norms_and_biases":
            r["names"].append(n)
    total = sum(p.numel() for p in params.values())
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / max(numel, 1),
            "per_tensor": per, "per_kind": {k: kinds[k] for k in KINDS if k in kinds},
            "not_pruned": rest, "model_sparsity": zeros / max(total, 1)}


def describe_report(rep: dict) -> str:
    """One line of a ``sparsity_report``: the share per kind and what was not pruned."""
    kinds = "; ".join(f"{k} {v['sparsity']:.4f} of {v['numel']:,}"
                      for k, v in rep["per_kind"].items())
    rest = ", ".join(f"{k.replace('_', ' ')} {v['numel']:,} ({v['tensors']} tensor"
                     f"{'s' if v['tensors'] != 1 else ''})"
                     for k, v in rep["not_pruned"].items())
    return (f"sparsity {rep['sparsity']:.4f} of {rep['numel']:,} weights ({kinds}); "
            f"not pruned: {rest or 'nothing'}; {rep['model_sparsity']:.4f} of all parameters")
