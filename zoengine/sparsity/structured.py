"""Structured pruning of LLaMA-layout decoders: remove whole KV groups or MLP channels and shrink
the tensors and the config, so the result is a smaller *dense* model that plain transformers
loads (``AutoModelForCausalLM.from_pretrained``) and the ZO optimizers train like any other.

Scores are Wanda's |W_ij|·‖X_j‖₂ summed over the weights a structure feeds into the residual
stream (down_proj's columns of a channel, o_proj's columns of a group's query heads); without
calibration data only the |W| part is used.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import torch

from zoengine.sparsity.pruners import input_norms

STRUCTURES = ("heads", "channels")
SPARSITY_TOL = 0.01  # a heads sparsity may be this far from an achievable k/G
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")


# ---- architecture ------------------------------------------------------------------------------

def _refuse(model, why: str) -> ValueError:
    return ValueError(
        f"model of class {type(model).__name__}: structured pruning supports LLaMA-layout decoders "
        "(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, ...: model.layers[i].self_attn."
        "{q,k,v,o}_proj and mlp.{gate,up,down}_proj as nn.Linear); " + why)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder blocks of a LLaMA-layout model; ValueError naming the class otherwise."""
    cfg = getattr(model, "config", None)
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if cfg is None or not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise _refuse(model, "it has no model.layers")
    missing = [k for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size",
                           "hidden_size") if not isinstance(getattr(cfg, k, None), int)]
    if missing:
        raise _refuse(model, f"its config has no integer {', '.join(missing)}")
    d = _head_dim(cfg)
    for i, layer in enumerate(layers):
        for part, names in (("self_attn", _ATTN), ("mlp", _MLP)):
            mod = getattr(layer, part, None)
            if mod is None or not all(isinstance(getattr(mod, n, None), torch.nn.Linear)
                                      for n in names):
                raise _refuse(model, f"layers[{i}].{part} lacks one of {names}")
            for pname, p in mod.named_parameters():
                # per-head norms (Qwen3's q_norm/k_norm, shape (head_dim,)) survive head removal
                if pname.split(".")[0] not in names and tuple(p.shape) != (d,):
                    raise _refuse(model, f"layers[{i}].{part}.{pname} {tuple(p.shape)} would "
                                  "not shrink with the projections")
        attn, mlp = layer.self_attn, layer.mlp
        if (attn.q_proj.out_features != cfg.num_attention_heads * d
                or attn.k_proj.out_features != cfg.num_key_value_heads * d
                or mlp.down_proj.in_features != cfg.intermediate_size):
            raise _refuse(model, f"layers[{i}] does not match the config's head and MLP sizes")
    return list(layers)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# ---- arguments ---------------------------------------------------------------------------------

def _check_args(structure, sparsity) -> float:
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r}: must be one of {STRUCTURES}")
    if (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
            or not 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity={sparsity!r}: must be a number in [0, 1) (the fraction of "
                         f"{'KV groups' if structure == 'heads' else 'MLP channels'} removed "
                         "in every layer)")
    return float(sparsity)


def _config_ok(cfg, heads: int, kv_heads: int) -> bool:
    """Would transformers accept the config with these head counts (its own validation)?"""
    trial = copy.deepcopy(cfg)
    trial.num_attention_heads, trial.num_key_value_heads = heads, kv_heads
    trial.head_dim = _head_dim(cfg)
    try:
        if hasattr(trial, "validate"):
            trial.validate()
    except Exception:  # noqa: BLE001 - any validation failure means "not loadable"
        return False
    return True


def _removable_groups(cfg) -> list[int]:
    """Numbers of KV groups one can remove per layer: 0, and each k < G whose config validates."""
    groups, r = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    return [0] + [k for k in range(1, groups) if _config_ok(cfg, (groups - k) * r, groups - k)]


def heads_to_remove(cfg, sparsity: float) -> int:
    """Number of KV groups removed per layer for ``sparsity``; ValueError listing the achievable
    values when it is not within ``SPARSITY_TOL`` of one (k/G, at least one group kept, and a
    config that transformers validates: LlamaConfig wants hidden_size % num_heads == 0)."""
    groups, r = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    ok = _removable_groups(cfg)
    k = round(sparsity * groups)
    if k in ok and abs(sparsity - k / groups) <= SPARSITY_TOL:
        return k
    if k >= groups:
        why = "it would remove every group"
    elif abs(sparsity - k / groups) > SPARSITY_TOL:
        why = f"{sparsity:g} x {groups} groups = {sparsity * groups:.3g} is not a whole number"
    else:
        why = (f"removing {k} would leave {(groups - k) * r} attention heads, which "
               f"{type(cfg).__name__} refuses (hidden_size {cfg.hidden_size} must divide by it)")
    values = ", ".join(str(Fraction(j, groups)) for j in ok if j) or "none"
    raise ValueError(
        f"sparsity={sparsity!r} with structure='heads': whole KV groups are removed (one KV head "
        f"and its {r} query heads), the same number in every layer; {why}. With {groups} KV "
        f"groups, heads sparsity must round (within {SPARSITY_TOL}) to 0 or one of: {values}")


def channels_to_remove(cfg, sparsity: float) -> int:
    """round(sparsity · intermediate_size) channels per layer; at least one is kept."""
    n = cfg.intermediate_size
    k = int(round(sparsity * n))
    if k >= n:
        raise ValueError(f"sparsity={sparsity!r} with structure='channels' would remove all "
                         f"{n} MLP channels: must be below {(n - 0.5) / n:.6g}")
    return k


# ---- scores ------------------------------------------------------------------------------------

def _column_mass(lin: torch.nn.Linear) -> torch.Tensor:
    """Σ_i |W[i, j]| for every input column j (float64, CPU)."""
    return lin.weight.detach().abs().sum(0, dtype=torch.float64).cpu()


def channel_scores(mlp, x_norm: torch.Tensor | None) -> torch.Tensor:
    """score_j = ‖X_down[:, j]‖₂ · Σ_i |W_down[i, j]| (Σ_i |W_down[i, j]| without calibration)."""
    s = _column_mass(mlp.down_proj)
    return s if x_norm is None else s * x_norm.to(torch.float64)


def group_scores(attn, x_norm: torch.Tensor | None, groups: int, head_dim: int) -> torch.Tensor:
    """score_g = Σ_{c in C_g} ‖X_o[:, c]‖₂ · Σ_i |W_o[i, c]|, C_g = the o_proj input columns of
    query heads g·r … g·r + r − 1 (r = heads per KV head); without calibration ‖X_o‖ ≡ 1."""
    s = _column_mass(attn.o_proj)
    if x_norm is not None:
        s = s * x_norm.to(torch.float64)
    return s.view(groups, -1).sum(1)  # columns are head-major: group g is one contiguous run


def _keep(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices kept, ascending: all but the ``remove`` lowest scores (ties: lower index goes)."""
    drop = scores.argsort(stable=True)[:remove]
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero().flatten()


# ---- shrinking ---------------------------------------------------------------------------------

def _shrink(lin: torch.nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0: outputs, and the bias) or columns (dim 1: inputs) ``idx`` of ``lin``."""
    w = lin.weight
    idx = idx.to(w.device)
    lin.weight = torch.nn.Parameter(w.detach().index_select(dim, idx).clone(),
                                    requires_grad=w.requires_grad)
    if dim == 0:
        lin.out_features = len(idx)
        if lin.bias is not None:
            b = lin.bias
            lin.bias = torch.nn.Parameter(b.detach().index_select(0, idx).clone(),
                                          requires_grad=b.requires_grad)
    else:
        lin.in_features = len(idx)


def shrink_heads(attn, keep_groups: torch.Tensor, ratio: int, head_dim: int) -> None:
    """Keep KV heads ``keep_groups`` and, for each, its ``ratio`` query heads (g·r … g·r + r − 1),
    in order, so query head j of the result still maps to KV head j // r."""
    kv = (keep_groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
    q_heads = (keep_groups[:, None] * ratio + torch.arange(ratio)).flatten()
    q = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
    for name, idx in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        _shrink(getattr(attn, name), idx, 0)
    _shrink(attn.o_proj, q, 1)


def shrink_channels(mlp, keep: torch.Tensor) -> None:
    """Keep intermediate channels ``keep``: rows of gate/up_proj, columns of down_proj."""
    _shrink(mlp.gate_proj, keep, 0)
    _shrink(mlp.up_proj, keep, 0)
    _shrink(mlp.down_proj, keep, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


# ---- the pruner --------------------------------------------------------------------------------

def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class _StopForward(Exception):
    pass


def _call_model(model, item) -> None:
    """One calibration item through ``model`` without a KV cache (see ``input_norms``)."""
    if isinstance(item, torch.Tensor):
        model(input_ids=item, use_cache=False)
    elif isinstance(item, dict):
        model(**{**item, "use_cache": False})
    elif callable(item):
        item(model)
    else:
        raise ValueError(f"calib item of type {type(item).__name__}: give token-id tensors, "
                         "dicts of model inputs, callables model -> None, or a list of those")


def block_inputs(model, layers, calib) -> tuple[list, list]:
    """One pass over the model, stopped after the last block: block 0's input hidden states and
    every block's other arguments (masks, position embeddings: they may differ per block, e.g.
    sliding-window layers), one entry per calibration item. No KV cache is kept."""
    hidden, extra = [], [[] for _ in layers]

    def make(i):
        def hook(_mod, args, kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(h.detach())
            for key, off in (("past_key_values", None), ("past_key_value", None),
                             ("use_cache", False)):
                if key in kwargs:
                    kwargs[key] = off
            extra[i].append((tuple(args[1:]), kwargs))
        return hook

    def stop(*_a):
        raise _StopForward

    hooks = [layer.register_forward_pre_hook(make(i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    hooks.append(layers[-1].register_forward_hook(stop))
    try:
        for item in (calib if isinstance(calib, (list, tuple)) else [calib]):
            try:
                _call_model(model, item)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return hidden, extra


def _run_block(layer, hidden: list, extra: list) -> list:
    outs = []
    for h, (args, kwargs) in zip(hidden, extra):
        out = layer(h, *args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


@torch.no_grad()
def prune_structured(model: torch.nn.Module, structure: str, sparsity: float, calib=None, *,
                     sequential: bool = True) -> dict:
    """Remove whole KV groups (``"heads"``) or MLP channels (``"channels"``) in place, the same
    number in every layer, shrink the tensors and ``model.config``, and return a report.

    Scores (Wanda's |W_ij|·‖X_j‖₂ summed over the weights a structure writes through; X over all
    calibration tokens, float64; the lowest-scoring structures go, ties by lower index):

    - ``"channels"``: channel j scores ‖X_down[:, j]‖₂ · Σ_i |W_down[i, j]|, X_down being
      down_proj's input (act(gate)·up). Removes round(sparsity · intermediate_size) rows of
      gate_proj/up_proj (and their bias) and columns of down_proj; sets
      ``config.intermediate_size``.
    - ``"heads"``: KV group g (KV head g and query heads g·r … g·r+r−1, r = heads per KV head)
      scores Σ_{c ∈ its o_proj input columns} ‖X_o[:, c]‖₂ · Σ_i |W_o[i, c]|. Removes
      sparsity · num_key_value_heads groups (must be within 0.01 of an achievable k/G: see
      ``heads_to_remove``); shrinks q/k/v rows and o_proj columns; sets
      ``config.num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` (explicit, since
      hidden_size / num_heads no longer equals it).

    ``calib``: token-id batches (a (B, T) LongTensor, a dict of model inputs, or a list of those;
    see ``input_norms``). ``None`` uses the weights alone (‖X‖ ≡ 1; the report says
    ``"score": "magnitude"``). ``sequential=True`` takes block i's activations with blocks
    < i already pruned (one captured pass, then block by block: ~3 forwards in all); ``False``:
    one pass over the dense model. sparsity=0 leaves the model untouched. Embeddings, norms and
    ``lm_head`` (tied or not) are never changed.
    """
    sparsity = _check_args(structure, sparsity)
    layers = decoder_layers(model)
    cfg = model.config
    head_dim, groups = _head_dim(cfg), cfg.num_key_value_heads
    ratio = cfg.num_attention_heads // groups
    if structure == "heads":
        total, remove = groups, heads_to_remove(cfg, sparsity)
    else:
        total, remove = cfg.intermediate_size, channels_to_remove(cfg, sparsity)
    before = _n_params(model)
    kept = [list(range(total)) for _ in layers] if remove == 0 else \
        _prune_layers(model, layers, structure, remove, calib, sequential)
    if structure == "heads":
        cfg.num_attention_heads, cfg.num_key_value_heads = (groups - remove) * ratio, groups - remove
        cfg.head_dim = head_dim
    else:
        cfg.intermediate_size = total - remove
    return {
        "structure": structure,
        "unit": "kv_group" if structure == "heads" else "mlp_channel",
        "sparsity_requested": sparsity, "sparsity_achieved": remove / total,
        "removed_per_layer": remove, "per_layer_before": total, "layers": len(layers),
        "score": "none" if remove == 0 else "wanda" if calib is not None else "magnitude",
        "sequential": bool(sequential and calib is not None),
        "params_before": before, "params_after": _n_params(model),
        "kept": kept,
        "config": {k: getattr(cfg, k) for k in _CONFIG_KEYS if hasattr(cfg, k)},
    }


def _prune_layers(model, layers, structure: str, remove: int, calib, sequential: bool):
    """Score and shrink every block in order; the kept indices per block. Sequential: block i's
    inputs are block i−1's outputs *after* its pruning (Wanda's procedure), run block by block
    from one captured pass, so calibration costs about three forwards in all."""
    cfg = model.config
    head_dim, groups = _head_dim(cfg), cfg.num_key_value_heads
    ratio = cfg.num_attention_heads // groups
    part, name = ("self_attn", "o_proj") if structure == "heads" else ("mlp", "down_proj")
    lins = [(str(i), getattr(getattr(layer, part), name)) for i, layer in enumerate(layers)]
    norms, hidden, extra = {}, [], []
    if calib is not None and sequential:
        hidden, extra = block_inputs(model, layers, calib)
    elif calib is not None:
        norms = input_norms(model, lins, calib)
    kept = []
    for i, layer in enumerate(layers):
        if hidden:
            feed = [(lambda _m, h=h, e=e, b=layer: _run_block(b, [h], [e])) for h, e in
                    zip(hidden, extra[i])]
            norms = input_norms(layer, [lins[i]], feed)
        x = norms.get(str(i))
        if structure == "heads":
            keep = _keep(group_scores(layer.self_attn, x, groups, head_dim), remove)
            shrink_heads(layer.self_attn, keep, ratio, head_dim)
        else:
            keep = _keep(channel_scores(layer.mlp, x), remove)
            shrink_channels(layer.mlp, keep)
        kept.append(keep.tolist())
        if hidden and i + 1 < len(layers):
            hidden = _run_block(layer, hidden, extra[i])
    return kept


def heads_sparsities(cfg) -> list[float]:
    """The heads sparsities ``prune_structured`` accepts for ``cfg`` (0 included)."""
    return [k / cfg.num_key_value_heads for k in _removable_groups(cfg)]


__all__ = ["STRUCTURES", "channel_scores", "channels_to_remove", "decoder_layers",
           "group_scores", "heads_sparsities", "heads_to_remove", "prune_structured",
           "shrink_channels", "shrink_heads"]
