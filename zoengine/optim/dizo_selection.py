"""Which tensors DiZO projects: its presets, resolved with the architecture's own names."""

from __future__ import annotations

from zoengine.architectures import layout_from_names

# Which tensors are projected. The authors' code projects k_proj and v_proj of OPT; the paper
# text and its reviewers say query and value. LLaMA uses the same k_proj/v_proj/q_proj names;
# for LoRA every A and B tensor is projected separately (as the code does). "all" projects every
# trainable tensor (e.g. a classification head trained alone): anchors = a copy of them all, so
# "auto" never falls back to it silently.
PROJECTED_PRESETS = {
    "code": r"self_attn\.(k_proj|v_proj)\.weight$",
    "paper": r"self_attn\.(q_proj|v_proj)\.weight$",
    "lora": r"lora_[AB]\b",
    "all": r"",
}


def projected_regex(projected: str, names: list[str]) -> str:
    """The regex of a preset or of ``projected`` itself. ``code``/``paper`` follow the
    architecture's own names (zoengine.architectures, found from the tensor names: a fused q/k/v
    weight is projected whole); the LLaMA-named pattern when no table entry matches."""
    if projected == "auto":
        projected = "lora" if any("lora_" in n for n in names) else "code"
    if projected in ("code", "paper"):
        layout = layout_from_names(names)
        if layout is not None:
            return layout.dizo_projected(projected)
    return PROJECTED_PRESETS.get(projected, projected)
