"""Masks of pruned models, and pruners (magnitude, Wanda) that make them.

A mask is a keep-mask: True where a weight lives, False where it was pruned (and is exactly 0).
Every zoengine optimizer takes ``masks=``: a pruned weight gets no perturbation, no update and no
weight decay, so it stays exactly zero for any number of steps (docs/sparsity.md).

Sources of masks: ``prune`` (this module), ``masks_from_zeros`` (a dense checkpoint whose pruned
weights are stored as zeros), ``remove_prune_reparam`` / ``masks_from_prune``
(``torch.nn.utils.prune``), or any dict name -> bool tensor. Optimizers store masks as bits
(``pack_mask``): 1/32 of an fp32 weight, 1/16 of a bf16 one.
"""

from __future__ import annotations

import re

import torch

PATTERNS = ("unstructured", "2:4", "4:8")
METHODS = ("magnitude", "wanda")
GROUPS = ("row", "layer")
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


# ---- compact storage ---------------------------------------------------------------------------

def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A keep-mask as bits: uint8 of ceil(numel / 8) bytes, element i in bit i % 8 of byte i // 8."""
    flat = mask.reshape(-1).to(torch.bool)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = _BITS.to(flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of ``pack_mask``: a bool tensor of ``shape``."""
    shape = torch.Size(shape)
    n = shape.numel()
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = (bits.to(torch.uint8).unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)[:n]
    return flat.view(torch.bool).view(shape)  # 0/1 bytes are valid bools: no copy


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


def _block_of(model: torch.nn.Module, name: str) -> str | None:
    """The name of the ModuleList entry (decoder block) that holds module ``name``."""
    for lname, ml in model.named_modules():
        if isinstance(ml, torch.nn.ModuleList) and name.startswith(lname + "."):
            return lname + "." + name[len(lname) + 1:].split(".")[0]
    return None


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
            order.setdefault(_block_of(model, n), []).append((n, m))
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


# ---- command line (wired into zoengine/cli.py) -------------------------------------------------

def parse_prune_spec(spec: str) -> tuple[str, str]:
    """``"wanda"`` / ``"magnitude:2:4"`` / ``"wanda:unstructured"`` -> (method, pattern)."""
    method, _, pattern = str(spec).partition(":")
    pattern = pattern or "unstructured"
    if method not in METHODS:
        raise ValueError(f"--prune {spec!r}: method must be one of {METHODS} "
                         "(e.g. 'wanda', 'wanda:2:4', 'magnitude:4:8')")
    parse_pattern(pattern)
    return method, pattern


def add_cli(subparsers) -> None:
    """Register ``zoengine prune``: prune a model and save it (zeros in a dense checkpoint)."""
    p = subparsers.add_parser("prune", help="prune a model (magnitude or Wanda, unstructured "
                                            "or N:M) and save it")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--output-dir", required=True, help="folder for the pruned model")
    p.add_argument("--method", choices=METHODS, default="wanda")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction removed per layer (default 0.5; N:M fixes it)")
    p.add_argument("--pattern", default="unstructured", help="unstructured | 2:4 | 4:8")
    p.add_argument("--calib-task", default="shakespeare",
                   help="task whose *train* split calibrates Wanda (default shakespeare)")
    p.add_argument("--calib-blocks", type=int, default=16, help="128-token blocks (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_prune)


def add_train_args(p) -> None:
    """``zoengine train`` flags: ``--prune``, ``--prune-sparsity``, ``--keep-zeros``."""
    p.add_argument("--prune", dest="prune", default=None, metavar="METHOD[:PATTERN]",
                   help="prune before training: wanda | magnitude, optionally :2:4 / :4:8 "
                        "(e.g. wanda:2:4); the training keeps the pruned zeros")
    p.add_argument("--prune-sparsity", dest="prune_sparsity", type=float, default=None,
                   help="fraction removed per layer for --prune (default 0.5)")
    p.add_argument("--keep-zeros", dest="keep_zeros", action="store_true", default=None,
                   help="the model is already pruned: keep its exact zeros (masks='zeros')")


def calibration_blocks(tok, task_name: str = "shakespeare", n_blocks: int = 16,
                       block_size: int = 128, seed: int = 0) -> torch.Tensor:
    """(n_blocks, block_size) token ids from a task's *train* split (never dev/test)."""
    from zoengine.data import load_task

    task = load_task(task_name, seed=seed, block_size=block_size)
    split = task.splits["train"]
    text = (split["text"][0] if task.kind == "lm" else
            "\n".join(task.prompt(t) for t in split[: 8 * n_blocks]["text"]))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = min(n_blocks, len(ids) // block_size)
    if n == 0:
        raise ValueError(f"calibration text of {task_name!r} has only {len(ids)} tokens")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(len(ids) // block_size, generator=g)[:n] * block_size
    return torch.stack([torch.tensor(ids[s:s + block_size]) for s in starts.tolist()])


def masks_for_run(model, tok, *, prune_spec: str | None = None, sparsity: float | None = None,
                  keep_zeros: bool = False, calib_task: str = "shakespeare",
                  calib_blocks: int = 16, seed: int = 0, log=print):
    """What ``zoengine train`` passes as ``masks=``: None, ``"zeros"``, or the masks of a fresh
    ``prune`` (Wanda calibrated on ``calib_task``'s train split). Logs a one-line summary."""
    if prune_spec is None:
        return "zeros" if keep_zeros else None
    method, pattern = parse_prune_spec(prune_spec)
    calib = None
    if method == "wanda":
        calib = list(calibration_blocks(tok, calib_task, calib_blocks, seed=seed).split(4))
    masks = prune(model, method, sparsity, pattern, calib)
    rep, mem = sparsity_report(model, masks), mask_memory(masks)
    log(f"pruned {len(masks)} Linear weights ({method}, {pattern}): sparsity "
        f"{rep['sparsity']:.4f} of {rep['numel']:,} weights; masks as bits "
        f"{mem['bit_bytes'] / 2**20:.1f} MiB")
    return masks


def cmd_prune(args) -> int:
    from zoengine.train import atomic_dir, load_model

    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    spec = f"{args.method}:{args.pattern}"
    masks_for_run(model, tok, prune_spec=spec, sparsity=args.sparsity,
                  calib_task=args.calib_task, calib_blocks=args.calib_blocks, seed=args.seed)
    with atomic_dir(args.output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    print(f"wrote {args.output_dir}; recover it with: zoengine train --model "
          f"{args.output_dir} --train full --keep-zeros", flush=True)
    return 0
