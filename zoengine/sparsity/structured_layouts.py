"""Per-architecture layout of structured pruning: where the decoder blocks are, which config field
counts the MLP channels (and, for mixture-of-experts types, each expert's and the shared
expert's: ``structured_moe``), whether an MLP input projection holds [gate | up] halves, and why
an architecture's heads or channels are refused. The projections' names come from the architecture
table (zoengine.architectures); the shrinking primitives here handle ``nn.Linear`` (weight
(out, in), subclasses such as Falcon's included) and transformers' ``Conv1D`` (weight (in, out)).

A fused q/k/v projection is split as ``blocks`` (Phi-3: rows [q of every head | k | v]); the
``heads`` and ``falcon`` layouts of GPT-NeoX, BLOOM and Falcon are never split, because those
attentions derive head_dim from hidden_size / num_attention_heads (see ``_DERIVED``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoengine.architectures import LAYOUTS, Layout, model_type
from zoengine.sparsity.weights import is_conv1d

_DERIVED = ("its attention computes head_dim as hidden_size // num_attention_heads and sizes "
            "q/k/v from hidden_size, so no config can describe fewer heads of the same size")


@dataclass(frozen=True)
class Spec:
    """Where structured pruning finds an architecture's units (module docstring)."""

    layers: str = "model.layers"  # dotted path from the model to its decoder blocks
    attn: str = "self_attn"  # attribute of a block holding the attention projections
    mlp: str = "mlp"  # attribute of a block holding the MLP projections ("": the block)
    width: str = "intermediate_size"  # config field counting the MLP channels
    width_default: int | None = None  # the field may be None: then this × hidden_size
    halves: bool = False  # the one MLP input projection holds [gate | up] (chunk(2))
    experts_width: str | None = None  # MoE: config field of every expert's width
    shared: str | None = None  # MoE: attribute of the sparse block holding a dense shared expert
    shared_width: str | None = None  # MoE: config field of the shared expert's width
    no_heads: str | None = None  # why structure='heads' is refused
    no_channels: str | None = None  # why structure='channels' is refused


_LLAMA = Spec()
SPECS: dict[str, Spec] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "phi"), _LLAMA),
    # MoE (structured_moe): ``width`` counts the channels of the dense MLP layers, if any
    "mixtral": Spec(experts_width="intermediate_size"),
    "qwen2_moe": Spec(experts_width="moe_intermediate_size", shared="shared_expert",
                      shared_width="shared_expert_intermediate_size"),
    "qwen3_moe": Spec(experts_width="moe_intermediate_size"),
    "llama4_text": Spec(mlp="feed_forward", width="intermediate_size_mlp",
                        experts_width="intermediate_size", shared="shared_expert",
                        shared_width="intermediate_size"),
    "phi3": Spec(halves=True),
    "opt": Spec("model.decoder.layers", mlp="", width="ffn_dim", no_heads=_DERIVED),
    "gpt2": Spec("transformer.h", width="n_inner", width_default=4, no_heads=_DERIVED),
    "falcon": Spec("transformer.h", width="ffn_hidden_size", no_heads=_DERIVED),
    "gpt_neox": Spec("gpt_neox.layers", no_heads=_DERIVED),
    "bloom": Spec("transformer.h", no_heads=_DERIVED, no_channels=(
        "BloomMLP's width is 4 x hidden_size in transformers' code, and BloomConfig has no "
        "field that could describe fewer channels")),
}


def supported(structure: str) -> list[str]:
    """The model types whose ``structure`` structured pruning handles."""
    attr = "no_heads" if structure == "heads" else "no_channels"
    return sorted(t for t, s in SPECS.items() if getattr(s, attr) is None)


def spec_of(model) -> tuple[Spec, Layout]:
    """The entry for this model; a model type outside the table is tried as LLaMA-shaped (its
    modules are checked against the LLaMA names and the config before anything changes)."""
    t = model_type(model)
    return SPECS.get(t, _LLAMA), LAYOUTS.get(t, LAYOUTS["llama"])


def refusal(model, structure: str, why: str) -> ValueError:
    t = model_type(model)
    return ValueError(
        f"model of class {type(model).__name__} (model_type {t!r}): structure={structure!r} "
        f"is refused: {why}. Structured pruning supports LLaMA-layout decoders (separate or "
        f"block-fused q/k/v, gated or plain MLPs as nn.Linear or Conv1D, and the gated 3-D "
        f"expert tensors of mixtral, qwen2_moe, qwen3_moe and llama4_text); structure="
        f"{structure!r} works for model types {', '.join(supported(structure))}. For this "
        f"model pass {_instead(t, structure)}")


def _instead(t: str, structure: str) -> str:
    """What to pass instead of a refused structure for model type ``t``."""
    other = "channels" if structure == "heads" else "heads"
    if t in supported(other):
        return f"structure={other!r} (zoengine prune --structure {other}), or unstructured pruning"
    return ("unstructured pruning (zoengine prune --method wanda or magnitude, optionally "
            "N:M), which keeps the shapes")


def blocks(model, spec: Spec, structure: str) -> list[torch.nn.Module]:
    """The decoder blocks at ``spec.layers``; ValueError naming the class otherwise."""
    mod = model
    for part in spec.layers.split("."):
        mod = getattr(mod, part, None)
    if getattr(model, "config", None) is None or not isinstance(mod, torch.nn.ModuleList) \
            or len(mod) == 0:
        raise refusal(model, structure, f"it has no {spec.layers}")
    return list(mod)


def width(cfg, spec: Spec) -> int | None:
    """The MLP channel count of ``cfg`` (GPT-2's n_inner=None means 4 × n_embd)."""
    w = getattr(cfg, spec.width, None)
    if w is None and spec.width_default is not None:
        w = spec.width_default * cfg.hidden_size
    return w if isinstance(w, int) else None


def channels_to_remove(cfg, sparsity: float, n: int | None = None) -> int:
    """round(sparsity · n) channels per layer, n = the MLP width (``intermediate_size`` unless
    given); at least one is kept."""
    n = cfg.intermediate_size if n is None else n
    k = int(round(sparsity * n))
    if k >= n:
        raise ValueError(f"sparsity={sparsity!r} with structure='channels' would remove all "
                         f"{n} MLP channels: must be below {(n - 0.5) / n:.6g}")
    return k


def keep_indices(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices kept, ascending: all but the ``remove`` lowest scores (ties: lower index goes)."""
    drop = scores.argsort(stable=True)[:remove]
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[drop] = False
    return keep.nonzero().flatten()


def set_ints(mod, **values) -> None:
    """Update the head or channel counts a module keeps as attributes (Phi-3's attention reads
    its own ``num_key_value_heads``), where it has them."""
    for key, value in values.items():
        if isinstance(getattr(mod, key, None), int) and not isinstance(getattr(mod, key), bool):
            setattr(mod, key, value)


# ---- tensors -----------------------------------------------------------------------------------

def is_proj(mod) -> bool:
    return isinstance(mod, torch.nn.Linear) or is_conv1d(mod)


def in_features(mod) -> int:
    return mod.weight.shape[0 if is_conv1d(mod) else 1]


def out_features(mod) -> int:
    return mod.weight.shape[1 if is_conv1d(mod) else 0]


def column_mass(mod) -> torch.Tensor:
    """Σ_i |W[i, j]| for every input feature j (float64, CPU)."""
    return mod.weight.detach().abs().sum(1 if is_conv1d(mod) else 0, dtype=torch.float64).cpu()


def _param(p: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(p.detach().index_select(dim, idx.to(p.device)).clone(),
                              requires_grad=p.requires_grad)


def shrink(mod, idx: torch.Tensor, outputs: bool) -> None:
    """Keep output features (``outputs``: rows of an nn.Linear and its bias) or input features
    ``idx`` of ``mod``; a Conv1D keeps the matching columns (outputs, and its bias) or rows."""
    conv = is_conv1d(mod)
    mod.weight = _param(mod.weight, int(outputs == conv), idx)
    if outputs:
        if mod.bias is not None:
            mod.bias = _param(mod.bias, 0, idx)
        setattr(mod, "nf" if conv else "out_features", len(idx))
    else:
        setattr(mod, "nx" if conv else "in_features", len(idx))


def gate_up_rows(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of a [gate | up] projection (each half ``n`` rows) for channels ``keep``."""
    return torch.cat([keep, keep + n])


def fused_rows(q: torch.Tensor, kv: torch.Tensor, heads: int, kv_heads: int, d: int):
    """Rows of a ``blocks`` fused q/k/v projection ([q | k | v]) for query rows ``q`` and
    key/value rows ``kv``."""
    return torch.cat([q, heads * d + kv, (heads + kv_heads) * d + kv])


__all__ = ["SPECS", "Spec", "blocks", "channels_to_remove", "column_mass", "fused_rows",
           "gate_up_rows", "in_features", "is_proj", "keep_indices", "out_features", "refusal",
           "set_ints", "shrink", "spec_of", "supported", "width"]
