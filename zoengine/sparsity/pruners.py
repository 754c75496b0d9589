"""Pruners that make keep-masks: magnitude and Wanda, unstructured or N:M.

Scores are |W| (magnitude) or |W_ij|·‖X_j‖₂ over calibration inputs (Wanda, Sun et al. 2023);
the lowest of each comparison group are set to exactly zero and their keep-mask returned.
"""

from __future__ import annotations

import torch

from zoengine.sparsity.masks import block_of, parse_pattern, prunable_layers

METHODS = ("magnitude", "wanda")
GROUPS = ("row", "layer")


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


@torch.no_grad()
def input_norms(model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]], calib,
                stop_after: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of every input feature j of each Linear over all calibration tokens (float64)."""
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in modules}
    hooks = []

    def make(n):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[n] += x.pow(2).sum(0).cpu()
        return hook

    def stop(*_a):
        raise _StopForward

    try:
        hooks = [m.register_forward_pre_hook(make(n)) for n, m in modules]
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
    return {n: s.sqrt() for n, s in sums.items()}


# ---- pruners -----------------------------------------------------------------------------------

def keep_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
              group: str = "row") -> torch.Tensor:
    """Keep-mask that drops the lowest scores: ``round(sparsity * cols)`` per row (``group="row"``,
    the Wanda paper's comparison group), ``round(sparsity * numel)`` per tensor (``"layer"``), or
    the M-N lowest of every M consecutive inputs (N:M). Ties break by position (stable sort)."""
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


@torch.no_grad()
def prune(model: torch.nn.Module, method: str = "magnitude", sparsity: float | None = 0.5,
          pattern: str = "unstructured", calib=None, *, layers="auto", group: str = "row",
          sequential: bool = True) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place and return its keep-masks ``{"<module>.weight": bool}``.

    Scores: ``"magnitude"`` |W|; ``"wanda"`` |W_ij|·‖X_j‖₂ with X the layer's inputs on
    ``calib`` (Sun et al. 2023). The lowest scores of each comparison group are set to exactly 0
    (``keep_mask``). ``sequential=True`` (Wanda) prunes decoder block by block, each block's
    activations taken with the blocks before it already pruned (the paper's procedure); each
    block's pass stops after that block. The masks go straight into ``masks=`` of any optimizer.

    Args:
        sparsity: fraction of weights removed per layer (N:M patterns fix it at 1 - N/M).
        pattern: ``"unstructured"``, ``"2:4"``, ``"4:8"`` (any N:M).
        calib: Wanda's data: a (B, T) token tensor, a dict of model inputs, a callable
            ``model -> None`` or a list of those.
        layers: ``"auto"`` (Linear layers of the decoder blocks), a regex, or a callable.
        group: ``"row"`` (per output row; default) or ``"layer"`` (unstructured only).
    """
    sparsity, nm = _check_prune_args(method, sparsity, pattern, calib, group)
    mods = prunable_layers(model, layers)
    if not mods:
        raise ValueError(f"layers={layers!r} selects no nn.Linear layer of the model")
    stages: list[tuple[torch.nn.Module | None, list]] = [(None, mods)]
    if method == "wanda" and sequential:
        blocks = dict(model.named_modules())
        order: dict[str | None, list] = {}
        for n, m in mods:
            order.setdefault(block_of(model, n), []).append((n, m))
        stages = [(blocks[b], ms) for b, ms in order.items() if b is not None]
        if None in order:
            stages.append((None, order[None]))
    masks = {}
    for stop_after, group_mods in stages:
        norms = (input_norms(model, group_mods, calib, stop_after) if method == "wanda"
                 else None)
        for n, m in group_mods:
            w = m.weight
            score = w.detach().abs().float()
            if norms is not None:
                score = score * norms[n].to(score.device, torch.float32).unsqueeze(0)
            keep = keep_mask(score, sparsity, nm, group).to(w.device)
            w.masked_fill_(~keep, 0.0)
            masks[f"{n}.weight"] = keep
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
