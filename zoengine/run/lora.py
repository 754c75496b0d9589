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

    for p in model.parameters():
        p.requires_grad_(False)
    pc = lora_config(cfg.lora_r, cfg.lora_alpha, list(cfg.lora_targets),
                     scaling=cfg.lora_scaling)
    model = get_peft_model(model, pc)
    if masks:
        mask_lora(model, masks)
    model.eval()
    return model


def apply_lora(cfg, model):
    """Freeze the base and wrap ``model`` with PEFT LoRA adapters (``cfg.lora_*``), unmasked."""
    return lora_for_run(cfg, model, None)
