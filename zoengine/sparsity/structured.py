"""Structured pruning of decoders: remove whole KV groups or MLP channels and shrink
the tensors and the config (which architectures, and where their units are:
``structured_layouts``), so the result is a smaller *dense* model that plain transformers
loads (``AutoModelForCausalLM.from_pretrained``) and the ZO optimizers train like any other.

Scores are Wanda's |W_ij|·‖X_j‖₂ summed over the weights a structure feeds into the residual
stream (down_proj's columns of a channel, o_proj's columns of a group's query heads); without
calibration data only the |W| part is used. Mixture-of-experts channels: ``structured_moe``.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import torch

from zoengine.architectures import LAYOUTS, Layout
from zoengine.sparsity import structured_layouts as L
from zoengine.sparsity import structured_moe as M
from zoengine.sparsity.pruners import input_norms
from zoengine.sparsity.structured_calib import _run_block, block_inputs
from zoengine.sparsity.structured_layouts import channels_to_remove

STRUCTURES = ("heads", "channels")
SPARSITY_TOL = 0.01  # a heads sparsity may be this far from an achievable k/G
_CONFIG_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")


# ---- architecture ------------------------------------------------------------------------------

def _parts(layer, spec: L.Spec, lay, structure: str):
    """(container, input projection names, output projection name) of one block's unit."""
    if structure == "heads":
        names = (lay.fused_qkv,) if lay.fused else (lay.q, lay.k, lay.v)
        return getattr(layer, spec.attn, None), names, lay.attn_out
    return (getattr(layer, spec.mlp, None) if spec.mlp else layer), lay.mlp_in, lay.mlp_out


def _config_ints(model, cfg, spec: L.Spec, structure: str) -> None:
    keys = ("num_attention_heads", "num_key_value_heads", "hidden_size") if structure == "heads" \
        else ("hidden_size",)
    missing = [k for k in keys if not isinstance(getattr(cfg, k, None), int)]
    if structure == "channels" and L.width(cfg, spec) is None:
        missing.append(spec.width)
    if missing:
        raise L.refusal(model, structure, f"its config has no integer {', '.join(missing)}")


def _expected(cfg, spec: L.Spec, lay, structure: str) -> tuple[list[int], int]:
    """(output features of each input projection, input features of the output one)."""
    if structure == "channels":
        w = L.width(cfg, spec)
        return [w * (2 if spec.halves else 1)] * len(lay.mlp_in), w
    d, h, kv = _head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    return ([(h + 2 * kv) * d] if lay.fused else [h * d, kv * d, kv * d]), h * d


def _check_block(model, i: int, layer, spec: L.Spec, lay, structure: str) -> None:
    cfg = model.config
    mod, names, out = _parts(layer, spec, lay, structure)
    where = f"layers[{i}].{(spec.attn if structure == 'heads' else spec.mlp) or '(block)'}"
    if mod is None or not all(L.is_proj(getattr(mod, n, None)) for n in (*names, out)):
        raise L.refusal(model, structure, f"{where} lacks one of {(*names, out)} as nn.Linear "
                                          "or Conv1D")
    if mod is not layer:
        for pname, p in mod.named_parameters():
            # per-head norms (Qwen3's q_norm/k_norm, shape (head_dim,)) survive head removal
            if pname.split(".")[0] not in (*names, out) and (
                    structure == "channels" or tuple(p.shape) != (_head_dim(cfg),)):
                raise L.refusal(model, structure, f"{where}.{pname} {tuple(p.shape)} would not "
                                                  "shrink with the projections")
    rows, cols = _expected(cfg, spec, lay, structure)
    if [L.out_features(getattr(mod, n)) for n in names] != rows or L.in_features(getattr(mod, out)) != cols:
        raise L.refusal(model, structure, f"{where} does not match the config's "
                        f"{'head' if structure == 'heads' else 'MLP'} sizes")


def checked_layers(model, structure: str):
    """(decoder blocks, spec, layout) of ``model`` for ``structure``; ValueError naming the
    class, the structure and why otherwise."""
    spec, lay = L.spec_of(model)
    why = spec.no_heads if structure == "heads" else spec.no_channels
    if why is not None:
        raise L.refusal(model, structure, why)
    if structure == "heads" and lay.fused and lay.qkv_split != "blocks":
        raise L.refusal(model, structure, f"its fused {lay.fused_qkv} is split per head "
                                          f"({lay.qkv_split!r}), which is not implemented")
    layers = L.blocks(model, spec, structure)
    if structure == "channels" and spec.experts_width is not None:
        M.moe_units(model, layers, spec)  # sparse blocks, their shared experts, dense layers
        return layers, spec, lay
    _config_ints(model, model.config, spec, structure)
    for i, layer in enumerate(layers):
        _check_block(model, i, layer, spec, lay, structure)
    return layers, spec, lay


def decoder_layers(model, structure: str | None = None) -> list[torch.nn.Module]:
    """The decoder blocks of a supported model, checked for ``structure`` (both when None);
    ValueError naming the class otherwise."""
    for s in ((structure,) if structure else STRUCTURES):
        layers = checked_layers(model, s)[0]
    return layers


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


# ---- scores ------------------------------------------------------------------------------------

def channel_scores(mlp, x_norm: torch.Tensor | None, out: str = "down_proj") -> torch.Tensor:
    """score_j = ‖X_out[:, j]‖₂ · Σ_i |W_out[i, j]| (Σ_i |W_out[i, j]| without calibration),
    ``out`` being the MLP's output projection (down_proj, fc2, c_proj, dense_4h_to_h)."""
    s = L.column_mass(getattr(mlp, out))
    return s if x_norm is None else s * x_norm.to(torch.float64)


def group_scores(attn, x_norm: torch.Tensor | None, groups: int, head_dim: int,
                 out: str = "o_proj") -> torch.Tensor:
    """score_g = Σ_{c in C_g} ‖X_o[:, c]‖₂ · Σ_i |W_o[i, c]|, C_g = the o_proj input columns of
    query heads g·r … g·r + r − 1 (r = heads per KV head); without calibration ‖X_o‖ ≡ 1."""
    s = L.column_mass(getattr(attn, out))
    if x_norm is not None:
        s = s * x_norm.to(torch.float64)
    return s.view(groups, -1).sum(1)  # columns are head-major: group g is one contiguous run


_keep = L.keep_indices  # shared with structured_moe, which cannot import this module back


# ---- shrinking ---------------------------------------------------------------------------------

def shrink_heads(attn, keep_groups: torch.Tensor, ratio: int, head_dim: int,
                 layout: Layout | None = None) -> None:
    """Keep KV heads ``keep_groups`` and, for each, its ``ratio`` query heads (g·r … g·r + r − 1),
    in order, so query head j of the result still maps to KV head j // r. A fused ``blocks``
    q/k/v projection keeps the same rows of its q, k and v blocks."""
    lay = layout or LAYOUTS["llama"]
    kv = (keep_groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
    q_heads = (keep_groups[:, None] * ratio + torch.arange(ratio)).flatten()
    q = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
    out = getattr(attn, lay.attn_out)
    heads = L.in_features(out) // head_dim
    if lay.fused:
        L.shrink(getattr(attn, lay.fused_qkv), L.fused_rows(q, kv, heads, heads // ratio,
                                                            head_dim), True)
    else:
        for name, idx in ((lay.q, q), (lay.k, kv), (lay.v, kv)):
            L.shrink(getattr(attn, name), idx, True)
    L.shrink(out, q, False)
    L.set_ints(attn, num_heads=len(q_heads), num_attention_heads=len(q_heads),
               num_key_value_heads=len(keep_groups))


def shrink_channels(mlp, keep: torch.Tensor, layout: Layout | None = None,
                    halves: bool = False) -> None:
    """Keep intermediate channels ``keep``: output features of the input projections (rows of
    gate/up_proj; both halves of a [gate | up] one), input features of the output one."""
    lay = layout or LAYOUTS["llama"]
    for name in lay.mlp_in:
        mod = getattr(mlp, name)
        L.shrink(mod, L.gate_up_rows(keep, L.out_features(mod) // 2) if halves else keep, True)
    L.shrink(getattr(mlp, lay.mlp_out), keep, False)
    L.set_ints(mlp, intermediate_size=len(keep))


# ---- the pruner --------------------------------------------------------------------------------

def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


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
    one pass over the dense model. sparsity=0 leaves the model untouched. Other layouts use their
    own names (fc1/fc2, Conv1D c_fc/c_proj, a fused [gate | up] or [q | k | v] projection) and
    width field (``structured_layouts.SPECS``); unsupported ones raise ValueError first. MoE
    ``"channels"``: per expert, each by its own scores (``structured_moe.prune_moe_channels``).
    Embeddings, norms, routers and ``lm_head`` (tied or not) are never changed.
    """
    sparsity = _check_args(structure, sparsity)
    layers, spec, lay = checked_layers(model, structure)
    if structure == "channels" and spec.experts_width is not None:
        return M.prune_moe_channels(model, layers, spec, sparsity, calib, sequential)
    cfg = model.config
    if structure == "heads":
        total, remove = cfg.num_key_value_heads, heads_to_remove(cfg, sparsity)
    else:
        total = L.width(cfg, spec)
        remove = channels_to_remove(cfg, sparsity, total)
    before = _n_params(model)
    kept = [list(range(total)) for _ in layers] if remove == 0 else \
        _prune_layers(model, (layers, spec, lay), structure, remove, calib, sequential)
    if structure == "heads":
        ratio, head_dim = cfg.num_attention_heads // total, _head_dim(cfg)
        cfg.num_attention_heads, cfg.num_key_value_heads = (total - remove) * ratio, total - remove
        cfg.head_dim = head_dim
    else:
        setattr(cfg, spec.width, total - remove)
    keys = _CONFIG_KEYS if structure == "heads" else (*_CONFIG_KEYS, spec.width)
    return {
        "structure": structure,
        "unit": "kv_group" if structure == "heads" else "mlp_channel",
        "sparsity_requested": sparsity, "sparsity_achieved": remove / total,
        "removed_per_layer": remove, "per_layer_before": total, "layers": len(layers),
        "score": "none" if remove == 0 else "wanda" if calib is not None else "magnitude",
        "sequential": bool(sequential and calib is not None),
        "params_before": before, "params_after": _n_params(model),
        "kept": kept,
        "config": {k: getattr(cfg, k) for k in dict.fromkeys(keys) if hasattr(cfg, k)},
    }


def _own_config(mod, cfg, heads: int, kv_heads: int) -> bool:
    """A pruned attention that reads the shared config in its forward (Phi-3 splits its fused
    q/k/v at config.num_attention_heads · head_dim) gets a copy with its own head counts while
    the blocks after it still run unpruned; ``_prune_layers`` gives the shared one back."""
    if getattr(mod, "config", None) is cfg:
        own = copy.copy(cfg)
        own.num_attention_heads, own.num_key_value_heads = heads, kv_heads
        own.head_dim = _head_dim(cfg)
        mod.config = own
        return True
    return False


def _prune_layers(model, found, structure: str, remove: int, calib, sequential: bool):
    """Score and shrink every block in order; the kept indices per block. Sequential: block i's
    inputs are block i−1's outputs *after* its pruning (Wanda's procedure), run block by block
    from one captured pass, so calibration costs about three forwards in all."""
    layers, spec, lay = found
    cfg = model.config
    mods = [_parts(layer, spec, lay, structure)[0] for layer in layers]
    out = lay.attn_out if structure == "heads" else lay.mlp_out
    lins = [(str(i), getattr(mod, out)) for i, mod in enumerate(mods)]
    norms, hidden, extra = {}, [], []
    if calib is not None and sequential:
        hidden, extra = block_inputs(model, layers, calib)
    elif calib is not None:
        norms = input_norms(model, lins, calib)
    kept, swapped = [], []
    for i, layer in enumerate(layers):
        if hidden:
            feed = [(lambda _m, h=h, e=e, b=layer: _run_block(b, [h], [e])) for h, e in
                    zip(hidden, extra[i])]
            norms = input_norms(layer, [lins[i]], feed)
        x = norms.get(str(i))
        if structure == "heads":
            head_dim, groups = _head_dim(cfg), cfg.num_key_value_heads
            keep = _keep(group_scores(mods[i], x, groups, head_dim, out), remove)
            ratio = cfg.num_attention_heads // groups
            shrink_heads(mods[i], keep, ratio, head_dim, lay)
            if _own_config(mods[i], cfg, (groups - remove) * ratio, groups - remove):
                swapped.append(mods[i])
        else:
            keep = _keep(channel_scores(mods[i], x, out), remove)
            shrink_channels(mods[i], keep, lay, spec.halves)
        kept.append(keep.tolist())
        if hidden and i + 1 < len(layers):
            hidden = _run_block(layer, hidden, extra[i])
    for mod in swapped:  # the shared config again, which prune_structured updates
        mod.config = cfg
    return kept


def heads_sparsities(cfg) -> list[float]:
    """The heads sparsities ``prune_structured`` accepts for ``cfg`` (0 included)."""
    return [k / cfg.num_key_value_heads for k in _removable_groups(cfg)]


__all__ = ["STRUCTURES", "channel_scores", "channels_to_remove", "decoder_layers",
           "group_scores", "heads_sparsities", "heads_to_remove", "prune_structured",
           "shrink_channels", "shrink_heads"]
