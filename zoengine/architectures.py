"""What each Hugging Face architecture calls its parts: one table for every feature that has to
name tensors by role (DiZO's projected set, LoRA's default targets), the way PEFT keeps its
per-model LoRA targets. An architecture not in the table gets an error naming the flag or
argument to pass instead, never a guess.

Names are the last component of a module's path (``q_proj`` in
``model.layers.3.self_attn.q_proj``). ``fused_qkv``: one projection computing q, k and v
(GPT-2's ``c_attn``, Phi-3's ``qkv_proj``, GPT-NeoX/Falcon/BLOOM's ``query_key_value``); its
output splits as ``blocks`` ([q | k | v] along the output features) or ``heads`` (per head
[q k v], GPT-NeoX and BLOOM; Falcon's new layout groups each key/value head with its queries).
Every entry is exercised by tests/test_arch_matrix.py on a tiny model of that architecture
(docs/models.md). Stdlib only: every layer may read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """One architecture's names (see the module docstring)."""

    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    fused_qkv: str | None = None
    qkv_split: str | None = None  # "blocks" | "heads" | "falcon" when fused_qkv is set
    attn_out: str = "o_proj"
    mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out: str = "down_proj"
    experts: str | None = None  # the module holding the 3-D expert tensors
    router: str | None = None

    @property
    def fused(self) -> bool:
        return self.fused_qkv is not None

    def lora_targets(self) -> list[str]:
        """PEFT's usual choice: the query and value projections, or the fused q/k/v one."""
        return [self.fused_qkv] if self.fused else [self.q, self.v]

    def dizo_projected(self, preset: str) -> str:
        """The regex of DiZO's projected weights: ``code`` (k and v, the authors' code) or
        ``paper`` (q and v, the paper's text). A fused q/k/v weight is projected whole (one
        ratio for its q, k and v rows: DiZO's projection is per tensor)."""
        if self.fused:
            return rf"(^|\.){re.escape(self.fused_qkv)}\.weight$"
        pair = (self.k, self.v) if preset == "code" else (self.q, self.v)
        return rf"(^|\.)({'|'.join(map(re.escape, pair))})\.weight$"


_LLAMA = Layout()
_MOE = Layout(experts="experts", router="gate")
LAYOUTS: dict[str, Layout] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
                    _LLAMA),
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe"), _MOE),
    "llama4_text": Layout(experts="experts", router="router"),
    "opt": Layout(attn_out="out_proj", mlp_in=("fc1",), mlp_out="fc2"),
    "phi": Layout(attn_out="dense", mlp_in=("fc1",), mlp_out="fc2"),
    "phi3": Layout(q=None, k=None, v=None, fused_qkv="qkv_proj", qkv_split="blocks",
                   mlp_in=("gate_up_proj",)),
    "gpt2": Layout(q=None, k=None, v=None, fused_qkv="c_attn", qkv_split="blocks",
                   attn_out="c_proj", mlp_in=("c_fc",), mlp_out="c_proj"),
    "gpt_neox": Layout(q=None, k=None, v=None, fused_qkv="query_key_value", qkv_split="heads",
                       attn_out="dense", mlp_in=("dense_h_to_4h",), mlp_out="dense_4h_to_h"),
    "bloom": Layout(q=None, k=None, v=None, fused_qkv="query_key_value", qkv_split="heads",
                    attn_out="dense", mlp_in=("dense_h_to_4h",), mlp_out="dense_4h_to_h"),
    "falcon": Layout(q=None, k=None, v=None, fused_qkv="query_key_value", qkv_split="falcon",
                     attn_out="dense", mlp_in=("dense_h_to_4h",), mlp_out="dense_4h_to_h"),
}


def model_type(model_or_config) -> str | None:
    """``config.model_type`` of a model (or of a PEFT model's base) or of a config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "model_type", None)


def layout_of(model_or_config) -> Layout | None:
    """The table's entry for this model's architecture, or None."""
    return LAYOUTS.get(model_type(model_or_config))


def layout_from_names(names) -> Layout | None:
    """The layout whose attention projections appear among tensor or module ``names`` (for an
    optimizer that sees parameter names only), or None when no entry matches or entries with
    different projected names match."""
    parts = {p for n in names for p in n.split(".")}
    found = {(lay.q, lay.k, lay.v, lay.fused_qkv): lay for lay in LAYOUTS.values()
             if (lay.fused_qkv in parts) or (not lay.fused and {lay.q, lay.k, lay.v} <= parts)}
    return next(iter(found.values())) if len(found) == 1 else None


def known() -> str:
    """The model types in the table, for error messages."""
    return ", ".join(sorted(LAYOUTS))
