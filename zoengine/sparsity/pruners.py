"""Pruners that make keep-masks: magnitude and Wanda, unstructured or N:M.

Scores are |W| (magnitude) or |W_ij|·‖X_j‖₂ over calibration inputs (Wanda, Sun et al. 2023);
the lowest of each comparison group are set to exactly zero and their keep-mask returned.
Every prunable weight (``prunable_weights``: nn.Linear, Conv1D, 3-D expert tensors) is scored as
one or more (out, in) matrices, each expert its own, so rows, groups and N:M run along the input
dimension whatever the storage layout.
"""

from __future__ import annotations

import inspect

import torch

from zoengine.sparsity.masks import parse_pattern
from zoengine.sparsity.weights import (
    PrunableWeight,
    block_of,
    is_conv1d,
    prunable_weights,
)

METHODS = ("magnitude", "wanda")
GROUPS = ("row", "layer")


class PruneMasks(dict):
    """``prune``'s result: a plain dict ``{"<module>.<param>": bool keep-mask}`` with
    ``notes``, the things a user should know about how it was made (e.g. an expert that no
    calibration token reached, scored by |W| alone)."""

    def __init__(self, *args, notes: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.notes = list(notes or [])


# ---- calibration -------------------------------------------------------------------------------

class _StopForward(Exception):
    pass


def _run_calib(model: torch.nn.Module, calib) -> None:
    items = calib if isinstance(calib, (list, tuple)) else [calib]
    for item in items:
        if callable(item):
            item(model)
        elif isinstance(item, dict):
            model(**item)
        elif isinstance(item, torch.Tensor):
            model(item)
        else:
            raise ValueError(f"calib item of type {type(item).__name__}: give token-id tensors, "
                             "dicts of model inputs, callables model -> None, or a list of those")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _routed_args(mod, args, kwargs):
    """(hidden_states, top_k_index, top_k_weights) of a transformers experts forward, by
    position in its signature (the names differ between models)."""
    sig = inspect.signature(type(mod).forward)
    bound = sig.bind(mod, *args, **kwargs).arguments
    vals = [bound.get(p) for p in list(sig.parameters)[1:4]]
    if len(vals) < 3 or any(v is None for v in vals):
        return None
    return vals


def _expert_recompute(mod: torch.nn.Module, args, kwargs):
    """Recompute an experts module's forward expert by expert: (output, per-expert Σx² of the
    first projection's inputs, per-expert Σh² of ``down_proj``'s inputs), or None when the
    module's call does not have the shape zoengine knows.

    transformers' experts modules (``use_experts_implementation``): each token goes to the
    experts of its ``top_k_index`` row; expert e computes h = gate(x W1[e] + b1[e]) (or
    act(x W1[e] + b1[e]) without a gate), y = h W2[e] + b2[e] (an optional post-expert norm)
    and adds y times its routing weight. Llama4's: every token goes to every expert, already
    scaled by its router score (0 where not routed), h = up · act(gate)."""
    w2 = mod.down_proj
    ct = _compute_dtype(w2)
    if type(mod).__name__ == "Llama4TextExperts":
        return _llama4_recompute(mod, args, kwargs, ct)
    routed = _routed_args(mod, args, kwargs)
    if routed is None:
        return None
    hs, idx, wts = routed
    hs = hs.reshape(-1, hs.shape[-1])
    idx = idx.reshape(hs.shape[0], -1)
    wts = wts.reshape(hs.shape[0], -1)
    gated = bool(getattr(mod, "has_gate", True))
    bias = bool(getattr(mod, "has_bias", False))
    tr = bool(mod.is_transposed)
    w1 = mod.gate_up_proj if gated else mod.up_proj
    b1 = (mod.gate_up_proj_bias if gated else mod.up_proj_bias) if bias else None
    e_n = w2.shape[0]
    d_in1 = w1.shape[1] if tr else w1.shape[2]
    d_in2 = w2.shape[1] if tr else w2.shape[2]
    d_out = w2.shape[2] if tr else w2.shape[1]
    y = torch.zeros(hs.shape[0], d_out, dtype=ct, device=hs.device)
    sx = torch.zeros(e_n, d_in1, dtype=torch.float64, device=hs.device)
    sh = torch.zeros(e_n, d_in2, dtype=torch.float64, device=hs.device)
    for e in range(e_n):
        tok, pos = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        x = hs[tok].to(ct)
        a = w1[e].to(ct)
        h = x @ (a if tr else a.t())
        if b1 is not None:
            h = h + b1[e].to(ct)
        h = mod._apply_gate(h) if gated else mod.act_fn(h)
        b = w2[e].to(ct)
        o = h @ (b if tr else b.t())
        if bias:
            o = o + mod.down_proj_bias[e].to(ct)
        if getattr(mod, "has_post_expert_norm", False):
            o = mod.post_expert_norm(o)
        y.index_add_(0, tok, o * wts[tok, pos, None].to(ct))
        sx[e] += x.to(torch.float64).pow(2).sum(0)
        sh[e] += h.to(torch.float64).pow(2).sum(0)
    return y, sx, sh


def _llama4_recompute(mod: torch.nn.Module, args, kwargs, ct: torch.dtype):
    """``_expert_recompute`` for Llama4TextExperts: hidden_states (experts x tokens, D), every
    token for every expert, scaled by its router score; (experts, D, 2I) and (experts, I, D)."""
    if len(args) != 1 or kwargs:
        return None
    hs, w2 = args[0], mod.down_proj
    x = hs.reshape(w2.shape[0], -1, hs.shape[-1]).to(ct)
    gate, up = torch.bmm(x, mod.gate_up_proj.to(ct)).chunk(2, dim=-1)
    h = up * mod.act_fn(gate)
    y = torch.bmm(h, w2.to(ct)).reshape(-1, w2.shape[-1])
    return y, x.to(torch.float64).pow(2).sum(1), h.to(torch.float64).pow(2).sum(1)


def _check_recompute(name: str, mod: torch.nn.Module, y, out) -> None:
    """Refuse (ValueError) when the recomputation differs from the module's own output by more
    than the rounding of its two matrix products: 2·(d_in1 + d_in2)·u relative (the worst-case
    bound of a sum of that many products in the output's dtype), capped at 0.1. A misread layout
    gives an unrelated output (relative error ~1)."""
    out = out[0] if isinstance(out, tuple) else out
    ref = out.reshape(y.shape).to(y.dtype)
    w1 = mod.gate_up_proj if hasattr(mod, "gate_up_proj") else mod.up_proj
    n = sum(w1.shape[1:]) + sum(mod.down_proj.shape[1:])
    tol = min(0.1, 2 * n * torch.finfo(out.dtype).eps)
    err = float((y - ref).norm())
    scale = float(ref.norm())
    if err > tol * scale + 1e-30:
        raise ValueError(
            f"method='wanda': zoengine's expert-by-expert recomputation of {name} "
            f"({type(mod).__name__}) differs from its forward (relative error "
            f"{err / max(scale, 1e-30):.2e} > {tol:.1e}), so the inputs of its expert tensors "
            "cannot be observed; pass method='magnitude' (|W| needs no activations), or "
            f"layers= leaving {name!r} out")


@torch.no_grad()
def _collect_norms(model: torch.nn.Module, weights: list[PrunableWeight], calib,
                   stop_after: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Σ of squared inputs per (matrix, input feature) of each weight: (matrices, in) float64,
    keyed by the weight's name. Linear/Conv1D: a forward pre-hook on the module; experts: a
    forward hook that recomputes the module expert by expert (``_expert_recompute``) and checks
    the result against the module's output (``_check_recompute``), so each expert sees only
    the tokens routed to it."""
    sums = {w.name: torch.zeros(w.matrices, w.in_features, dtype=torch.float64)
            for w in weights}
    flat = [w for w in weights if w.layout in ("linear", "conv1d")]
    experts: dict[str, list[PrunableWeight]] = {}
    for w in weights:
        if w.layout.startswith("experts"):
            experts.setdefault(w.module_name, []).append(w)

    def linear_hook(key):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[key][0] += x.pow(2).sum(0).cpu()
        return hook

    def experts_hook(name, ws):
        def hook(mod, args, kwargs, out):
            got = _expert_recompute(mod, args, kwargs)
            if got is None:
                raise ValueError(
                    f"method='wanda': {name} ({type(mod).__name__}) is called in a way zoengine "
                    "does not know, so the inputs of its expert tensors cannot be observed; "
                    f"pass method='magnitude', or layers= leaving {name!r} out")
            y, sx, sh = got
            _check_recompute(name, mod, y, out)
            for w in ws:
                sums[w.name] += (sh if w.attr == "down_proj" else sx).cpu()
        return hook

    def stop(*_a):
        raise _StopForward

    hooks = []
    try:
        hooks = [w.module.register_forward_pre_hook(linear_hook(w.name)) for w in flat]
        hooks += [ws[0].module.register_forward_hook(experts_hook(n, ws), with_kwargs=True)
                  for n, ws in experts.items()]
        if stop_after is not None:
            hooks.append(stop_after.register_forward_hook(stop))
        for item in (calib if isinstance(calib, (list, tuple)) else [calib]):
            try:
                _run_calib(model, item)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return sums


def input_norms(model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]], calib,
                stop_after: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of every input feature j of each Linear (or Conv1D) over all calibration tokens
    (float64), keyed by the names given. For expert tensors see ``prune`` (per-expert norms of
    the tokens routed to each expert)."""
    ws = [PrunableWeight(n, n, m, "weight", "conv1d" if is_conv1d(m) else "linear", "other")
          for n, m in modules]
    return {n: s[0].sqrt() for n, s in _collect_norms(model, ws, calib, stop_after).items()}


# ---- pruners -----------------------------------------------------------------------------------

def keep_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
              group: str = "row") -> torch.Tensor:
    """Keep-mask that drops the lowest scores of a (rows, cols) matrix, cols being the input
    dimension: ``round(sparsity * cols)`` per row (``group="row"``, the Wanda paper's comparison
    group), ``round(sparsity * numel)`` per matrix (``"layer"``), or the M-N lowest of every M
    consecutive inputs (N:M). Ties break by position (stable sort). A (matrices, rows, cols)
    score gives a mask per matrix (each expert its own)."""
    if score.dim() == 3:
        return torch.stack([keep_mask(s, sparsity, nm, group) for s in score])
    rows, cols = score.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    s = score.detach().float().cpu()
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"pattern {n}:{m} needs in_features divisible by {m}; got {cols}")
        idx = s.view(rows, cols // m, m).argsort(dim=2, stable=True)[:, :, : m - n]
        return keep.view(rows, cols // m, m).scatter_(2, idx, False).view(rows, cols)
    if group == "row":
        k = int(round(sparsity * cols))
        idx = s.argsort(dim=1, stable=True)[:, :k]
        return keep.scatter_(1, idx, False)
    k = int(round(sparsity * rows * cols))
    idx = s.view(-1).argsort(stable=True)[:k]
    return keep.view(-1).scatter_(0, idx, False).view(rows, cols)


def _check_prune_args(method, sparsity, pattern, calib, group):
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {METHODS}")
    if group not in GROUPS:
        raise ValueError(f"group={group!r}: must be one of {GROUPS}")
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is None:
            sparsity = implied
        elif abs(sparsity - implied) > 1e-9:
            raise ValueError(f"sparsity={sparsity!r} with pattern={pattern!r}: an N:M pattern "
                             f"fixes the sparsity at 1 - N/M = {implied:g}")
    if sparsity is None:
        sparsity = 0.5
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r}: must be a number in [0, 1)")
    if method == "wanda" and calib is None:
        raise ValueError("method='wanda' needs calib=: token-id tensors (or dicts of model "
                         "inputs) whose Linear-input activations weight |W| (a few sequences)")
    return float(sparsity), nm


def _prune_one(w: PrunableWeight, sparsity, nm, group, sq_norms, notes) -> torch.Tensor:
    """Zero the lowest-scored weights of one tensor, matrix by matrix; return its keep-mask."""
    t = w.weight
    mats = w.as_matrices(t.detach())
    keep = torch.empty(mats.shape, dtype=torch.bool)
    silent = []
    for g in range(mats.shape[0]):
        score = mats[g].abs().float()
        if sq_norms is not None:
            if bool((sq_norms[g] == 0).all()):
                silent.append(g)  # no calibration input reached it: |W| alone
            else:
                score = score * sq_norms[g].sqrt().to(score.device, torch.float32).unsqueeze(0)
        keep[g] = keep_mask(score, sparsity, nm, group)
    if silent:
        what = (f"expert{'s' if len(silent) > 1 else ''} {silent} of " if w.matrices > 1
                else "")
        notes.append(f"wanda: no calibration input reached {what}{w.name} (all-zero "
                     "activations); scored by |W| alone")
    full = w.from_matrices(keep).to(t.device)
    t.masked_fill_(~full, 0.0)
    return full


@torch.no_grad()
def prune(model: torch.nn.Module, method: str = "magnitude", sparsity: float | None = 0.5,
          pattern: str = "unstructured", calib=None, *, layers="auto", group: str = "row",
          sequential: bool = True) -> PruneMasks:
    """Prune ``model`` in place and return its keep-masks ``{"<module>.<param>": bool}``.

    Scores: ``"magnitude"`` |W|; ``"wanda"`` |W_ij|·‖X_j‖₂ with X the weight's inputs on
    ``calib`` (Sun et al. 2023). The lowest scores of each comparison group are set to exactly 0
    (``keep_mask``). Every weight is scored as (out, in) matrices whatever its layout: an
    ``nn.Linear``, a ``Conv1D`` (stored (in, out)), and each expert of a 3-D expert tensor as its
    own matrix, with Wanda's norms taken per expert over the tokens routed to it (``prunable_
    weights``; routers, embeddings and ``lm_head`` are never pruned). ``sequential=True``
    (Wanda) prunes decoder block by block, each block's activations taken with the blocks before
    it already pruned (the paper's procedure); each block's pass stops after that block. The
    masks go straight into ``masks=`` of any optimizer; ``notes`` on the result says what a user
    should know (e.g. an expert no calibration token reached, scored by |W| alone).

    Args:
        sparsity: fraction of weights removed per layer (N:M patterns fix it at 1 - N/M).
        pattern: ``"unstructured"``, ``"2:4"``, ``"4:8"`` (any N:M, along the input dimension).
        calib: Wanda's data: a (B, T) token tensor, a dict of model inputs, a callable
            ``model -> None`` or a list of those.
        layers: ``"auto"`` (the prunable weights of the decoder blocks), a regex, or a callable.
        group: ``"row"`` (per output row; default) or ``"layer"`` (per matrix, unstructured only).
    """
    sparsity, nm = _check_prune_args(method, sparsity, pattern, calib, group)
    ws = prunable_weights(model, layers)
    if not ws:
        raise ValueError(f"layers={layers!r} selects no prunable weight (nn.Linear, Conv1D or "
                         "expert tensor) of the model")
    if nm is not None:
        for w in ws:
            if w.in_features % nm[1]:
                raise ValueError(f"pattern={pattern!r} needs the input dimension of every "
                                 f"pruned weight divisible by {nm[1]}: {w.name} has "
                                 f"{w.in_features}")
    stages: list[tuple[torch.nn.Module | None, list]] = [(None, ws)]
    if method == "wanda" and sequential:
        blocks = dict(model.named_modules())
        order: dict[str | None, list] = {}
        for w in ws:
            order.setdefault(block_of(model, w.module_name), []).append(w)
        stages = [(blocks[b], group_ws) for b, group_ws in order.items() if b is not None]
        if None in order:
            stages.append((None, order[None]))
    masks = PruneMasks()
    for stop_after, group_ws in stages:
        sums = (_collect_norms(model, group_ws, calib, stop_after) if method == "wanda"
                else None)
        for w in group_ws:
            masks[w.name] = _prune_one(w, sparsity, nm, group,
                                       None if sums is None else sums[w.name], masks.notes)
    return masks


def parse_prune_spec(spec: str) -> tuple[str, str]:
    """``"wanda"`` / ``"magnitude:2:4"`` / ``"wanda:unstructured"`` -> (method, pattern)."""
    method, _, pattern = str(spec).partition(":")
    pattern = pattern or "unstructured"
    if method not in METHODS:
        raise ValueError(f"--prune {spec!r}: method must be one of {METHODS} "
                         "(e.g. 'wanda', 'wanda:2:4', 'magnitude:4:8')")
    parse_pattern(pattern)
    return method, pattern
