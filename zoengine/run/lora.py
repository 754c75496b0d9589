"""``--lora``: PEFT LoRA adapters on the frozen base; on a pruned base each adapter's delta is
masked by the base weight's keep-mask, so ``zoengine merge`` refills no pruned zero
(``zoengine.sparsity.lora``; docs/sparsity.md, "Recovering a pruned model")."""

from __future__ import annotations


def lora_for_run(cfg, model, masks):
    """PEFT LoRA on ``model`` (base frozen; ``--lora-scaling``), its deltas masked by ``masks``
    (keep-masks of the pruned base weights) when the model is pruned."""
    from zoengine.extras import require

    require("peft", "lora", "--train lora")
    from peft import get_peft_model

    from zoengine.sparsity.lora import lora_config, mask_lora

    targets = lora_targets(cfg.lora_targets, model)
    for p in model.parameters():
        p.requires_grad_(False)
    pc = lora_config(cfg.lora_r, cfg.lora_alpha, targets, scaling=cfg.lora_scaling)
    model = get_peft_model(model, pc)
    if masks:
        mask_lora(model, masks)
    model.eval()
    return model


def lora_targets(targets, model) -> list[str]:
    """``--lora-targets``: the names given, or for ``auto`` the architecture table's (query and
    value projections, or the fused q/k/v one); an architecture not in the table is refused
    with the flag to pass."""
    from zoengine.architectures import known, layout_of, model_type
    from zoengine.tasks import TaskError

    if list(targets) != ["auto"]:
        return list(targets)
    layout = layout_of(model)
    if layout is None:
        raise TaskError("--lora-targets", f"auto: model type {model_type(model)!r} is not in "
                        f"zoengine's architecture table ({known()}); name the modules to adapt, "
                        "e.g. --lora-targets q_proj,v_proj")
    return layout.lora_targets()


def apply_lora(cfg, model):
    """Freeze the base and wrap ``model`` with PEFT LoRA adapters (``cfg.lora_*``), unmasked."""
    return lora_for_run(cfg, model, None)
