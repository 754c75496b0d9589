"""Channel pruning of mixture-of-experts decoders (mixtral, qwen2_moe, qwen3_moe, llama4_text;
their config fields: ``structured_layouts.SPECS``), called by ``structured.prune_structured``.

A sparse block's units: its experts (3-D ``gate_up_proj`` [gate | up] and ``down_proj``, stored
(experts, out, in), or (experts, in, out) for Llama 4) and, where the model has one, its dense
shared expert; a dense block's unit is its gated MLP. Every expert keeps the same number k of
channels, because the config has one expert width, but each chooses its own k by its own scores,
the dense rule applied per expert: ‖X_e[:, j]‖₂ · Σ_i |W_down,e[i, j]|, X_e being expert e's
down_proj input act(gate)·up over the calibration tokens routed to it (``pruners``' expert-by-
expert recomputation, checked against the module's own output). An expert that no calibration
token reached is scored by Σ_i |W_down,e[i, j]| alone and named in the report's ``notes``.
Shared experts and dense MLPs are pruned like any gated MLP, each by its own config field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoengine.sparsity import structured_layouts as L
from zoengine.sparsity.pruners import _collect_norms
from zoengine.sparsity.structured_calib import _run_block, block_inputs
from zoengine.sparsity.weights import PrunableWeight, experts_layout

_MLP = ("gate_proj", "up_proj", "down_proj")
_TENSORS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Unit:
    """Channels pruned together in one block: an experts module (every expert its own choice)
    or a gated MLP, whose width is the config field ``field``."""

    name: str  # "experts", the shared expert's attribute, or "mlp" (a dense block)
    where: str  # its path, for messages: layers[3].mlp.experts
    mod: torch.nn.Module | None
    field: str

    @property
    def experts(self) -> bool:
        return self.name == "experts"


def _tensor(mod, attr: str) -> PrunableWeight:
    return PrunableWeight(attr, "", mod, attr, experts_layout(mod), "experts")


def _matrices(mod, attr: str) -> torch.Tensor:
    """``mod.<attr>`` viewed as (experts, out, in), whatever its storage order."""
    w = _tensor(mod, attr)
    return w.as_matrices(w.weight.detach())


# ---- checks ------------------------------------------------------------------------------------

def _experts_problem(cfg, u: Unit, w: int) -> str | None:
    mod = u.mod
    if experts_layout(mod) is None or not all(
            isinstance(getattr(mod, a, None), torch.nn.Parameter) and getattr(mod, a).dim() == 3
            for a in _TENSORS):
        return "is not a transformers experts module with 3-D gate_up_proj and down_proj"
    if not getattr(mod, "has_gate", True) or not getattr(mod, "is_concatenated", True):
        return "does not hold concatenated [gate | up] halves in gate_up_proj"
    extra = [n for n, _ in mod.named_parameters() if n not in _TENSORS]
    if extra or getattr(mod, "has_bias", False) or getattr(mod, "has_post_expert_norm", False):
        return f"has tensors besides {_TENSORS} ({extra}), which would not shrink with them"
    gu, dn = (tuple(_matrices(mod, a).shape) for a in _TENSORS)
    e, h = dn[0], cfg.hidden_size
    if gu != (e, 2 * w, h) or dn != (e, h, w):
        return (f"holds (experts, out, in) matrices {gu} and {dn}, not the (E, 2·{w}, {h}) and "
                f"(E, {h}, {w}) of the config's {u.field} = {w}")
    return None


def _mlp_problem(u: Unit, w: int) -> str | None:
    if u.mod is None or not all(isinstance(getattr(u.mod, n, None), torch.nn.Linear)
                                for n in _MLP):
        return f"lacks one of {_MLP} as nn.Linear"
    extra = [n for n, _ in u.mod.named_parameters() if n.split(".")[0] not in _MLP]
    if extra:
        return f"has {extra[0]}, which would not shrink with the projections"
    if (u.mod.gate_proj.out_features, u.mod.up_proj.out_features,
            u.mod.down_proj.in_features) != (w, w, w):
        return f"does not match the config's {u.field} = {w}"
    return None


def _block_units(spec: L.Spec, i: int, layer) -> list[Unit]:
    ffn = getattr(layer, spec.mlp, None)
    where = f"layers[{i}].{spec.mlp}"
    if ffn is None or not hasattr(ffn, "experts"):
        return [Unit("mlp", where, ffn, spec.width)]
    units = [Unit("experts", f"{where}.experts", ffn.experts, spec.experts_width)]
    if spec.shared is not None:
        units.append(Unit(spec.shared, f"{where}.{spec.shared}", getattr(ffn, spec.shared, None),
                          spec.shared_width))
    return units


def moe_units(model, layers, spec: L.Spec) -> list[list[Unit]]:
    """Each block's units, checked against the config before anything changes; ValueError
    (``structured_layouts.refusal``) naming the part and why otherwise. A sparse block's
    tensors outside its units must be routers or gates reading the hidden state (2-D, last
    dimension hidden_size): they keep their shape."""
    cfg, out = model.config, []
    for i, layer in enumerate(layers):
        units = _block_units(spec, i, layer)
        for u in units:
            w = getattr(cfg, u.field, None)
            if not isinstance(w, int) or isinstance(w, bool):
                why = f"its config has no integer {u.field} (the width of {u.where})"
            else:
                why = _experts_problem(cfg, u, w) if u.experts else _mlp_problem(u, w)
                why = why and f"{u.where} ({type(u.mod).__name__}) {why}"
            if why:
                raise L.refusal(model, "channels", why)
        ffn = getattr(layer, spec.mlp)
        inside = {id(p) for u in units for p in u.mod.parameters()}
        for n, p in ffn.named_parameters():
            if id(p) not in inside and (p.dim() != 2 or p.shape[1] != cfg.hidden_size):
                raise L.refusal(model, "channels", f"layers[{i}].{spec.mlp}.{n} "
                                f"{tuple(p.shape)} is neither a unit nor a router or gate")
        out.append(units)
    return out


# ---- scores ------------------------------------------------------------------------------------

def _norm_weights(i: int, units: list[Unit]) -> list[PrunableWeight]:
    """What block i's calibration observes: each unit's down_proj input (per expert for the
    experts) and the experts' gate_up_proj input (zero for an expert no token reached)."""
    ws = []
    for u in units:
        key = f"{i}.{u.name}"
        if u.experts:
            lay = experts_layout(u.mod)
            ws += [PrunableWeight(f"{key}.{a}", key, u.mod, a, lay, "experts") for a in _TENSORS]
        else:
            ws.append(PrunableWeight(f"{key}.down_proj", f"{key}.down_proj", u.mod.down_proj,
                                     "weight", "linear", "mlp"))
    return ws


def _norms(model, target, weights, calib) -> dict[str, torch.Tensor]:
    try:
        return _collect_norms(target, weights, calib)
    except ValueError as exc:  # the per-expert recomputation did not match the module
        raise L.refusal(model, "channels", f"its expert inputs cannot be observed ({exc}); "
                        "calib=None scores by the weights alone") from None


def unit_scores(u: Unit, sums: dict | None, key: str) -> tuple[torch.Tensor, list[int]]:
    """(matrices, channels) float64 scores of ``u`` (one row per expert; one row for an MLP),
    and the experts no calibration token reached, which keep the weight-only score.
    ``sums``: the squared input sums of ``_norm_weights`` (None: weights alone)."""
    if u.experts:
        mass = _matrices(u.mod, "down_proj").abs().sum(1, dtype=torch.float64).cpu()
    else:
        mass = L.column_mass(u.mod.down_proj)[None]
    if sums is None:
        return mass, []
    scores = mass * sums[f"{key}.down_proj"].sqrt()
    if not u.experts:
        return scores, []
    silent = (sums[f"{key}.gate_up_proj"].sum(1) == 0).nonzero().flatten().tolist()
    scores[silent] = mass[silent]
    return scores, silent


# ---- shrinking ---------------------------------------------------------------------------------

def shrink_unit(u: Unit, keep: torch.Tensor) -> None:
    """Keep channels ``keep``: (experts, k), row e ascending, for the experts (rows e·(j, I + j)
    of gate_up_proj, so the halves stay paired, and columns j of down_proj, per expert); (1, k)
    for an MLP (rows of gate/up_proj, columns of down_proj)."""
    k = keep.shape[1]
    if not u.experts:
        for n in ("gate_proj", "up_proj"):
            L.shrink(getattr(u.mod, n), keep[0], True)
        L.shrink(u.mod.down_proj, keep[0], False)
        L.set_ints(u.mod, intermediate_size=k)
        return
    gu, dn = (_matrices(u.mod, a) for a in _TENSORS)  # (E, 2I, H), (E, H, I)
    keep = keep.to(gu.device)
    rows = torch.cat([keep, keep + gu.shape[1] // 2], 1)
    new = {"gate_up_proj": gu.gather(1, rows[:, :, None].expand(-1, -1, gu.shape[2])),
           "down_proj": dn.gather(2, keep[:, None, :].expand(-1, dn.shape[1], -1))}
    for a, t in new.items():
        old = getattr(u.mod, a)
        setattr(u.mod, a, torch.nn.Parameter(_tensor(u.mod, a).from_matrices(t),
                                             requires_grad=old.requires_grad))
    L.set_ints(u.mod, intermediate_dim=k, intermediate_size=k, expert_dim=k)


# ---- the pruner --------------------------------------------------------------------------------

def _prune_blocks(model, layers, units, remove: dict, calib, sequential: bool):
    """Score and shrink every unit, block by block (sequential: block i calibrated on the
    outputs of the blocks before it, already pruned, as ``structured._prune_layers``); per
    block ``{unit name: kept channels}`` and the notes."""
    hidden, extra, sums = [], [], None
    if calib is not None and sequential:
        hidden, extra = block_inputs(model, layers, calib)
    elif calib is not None:
        sums = _norms(model, model, [w for i, us in enumerate(units)
                                     for w in _norm_weights(i, us)], calib)
    kept, notes = [], []
    for i, layer in enumerate(layers):
        if hidden:
            feed = [(lambda _m, h=h, e=e, b=layer: _run_block(b, [h], [e])) for h, e in
                    zip(hidden, extra[i])]
            sums = _norms(model, layer, _norm_weights(i, units[i]), feed)
        row = {}
        for u in units[i]:
            scores, silent = unit_scores(u, sums, f"{i}.{u.name}")
            keep = torch.stack([L.keep_indices(s, remove[u.field]) for s in scores])
            shrink_unit(u, keep)
            row[u.name] = keep.tolist() if u.experts else keep[0].tolist()
            if silent:
                notes.append(f"{u.where}: experts {silent} received no calibration token and "
                             "were scored by their weights alone")
        kept.append(row)
        if hidden and i + 1 < len(layers):
            hidden = _run_block(layer, hidden, extra[i])
    return kept, notes


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def prune_moe_channels(model, layers, spec: L.Spec, sparsity: float, calib,
                       sequential: bool) -> dict:
    """``prune_structured(model, "channels", ...)`` for a mixture-of-experts model (module
    docstring): round(sparsity · width) channels go from every unit, width being the unit's
    config field, which is then set to the width kept. The report is the dense one's, with
    ``removed_per_layer``/``per_layer_before`` counting per expert, ``sparsity_achieved`` the
    share of all MLP channels removed (experts counted one by one), ``kept`` per block a dict
    ``{"experts": [[kept channels] per expert], "<shared expert>": [...]}`` or ``{"mlp":
    [...]}``, ``widths`` ``{field: [before, after]}`` and ``notes``."""
    cfg = model.config
    units = moe_units(model, layers, spec)
    widths = {u.field: getattr(cfg, u.field) for us in units for u in us}
    remove = {f: L.channels_to_remove(cfg, sparsity, n) for f, n in widths.items()}
    before, notes = _n_params(model), []
    if any(remove.values()):
        kept, notes = _prune_blocks(model, layers, units, remove, calib, sequential)
    else:
        kept = [{u.name: [list(range(widths[u.field])) for _ in range(u.mod.down_proj.shape[0])]
                 if u.experts else list(range(widths[u.field])) for u in us} for us in units]
    count = [(widths[u.field], remove[u.field], u.mod.down_proj.shape[0] if u.experts else 1)
             for us in units for u in us]
    for f, n in widths.items():
        setattr(cfg, f, n - remove[f])
    main = spec.experts_width if spec.experts_width in widths else spec.width
    return {
        "structure": "channels", "unit": "mlp_channel",
        "sparsity_requested": sparsity,
        "sparsity_achieved": sum(r * m for _, r, m in count) / sum(n * m for n, _, m in count),
        "removed_per_layer": remove[main], "per_layer_before": widths[main],
        "layers": len(layers),
        "score": "none" if not any(remove.values()) else "wanda" if calib is not None
        else "magnitude",
        "sequential": bool(sequential and calib is not None),
        "params_before": before, "params_after": _n_params(model),
        "kept": kept, "widths": {f: [n, n - remove[f]] for f, n in widths.items()},
        "notes": notes, "config": {f: getattr(cfg, f) for f in widths},
    }


__all__ = ["Unit", "moe_units", "prune_moe_channels", "shrink_unit", "unit_scores"]
