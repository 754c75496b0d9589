"""``zoengine merge RUN OUT``: a LoRA run's adapter merged into its base, pruned zeros kept."""

from __future__ import annotations

import os

from zoengine.run.mask_files import MASKS_FILE, read_masks
from zoengine.tasks import TaskError


def merge_run(run_dir: str, output_dir: str, log=print) -> str:
    """``zoengine merge RUN OUT``: the base model of a LoRA run with its adapter merged; on a
    pruned base the deltas are masked, so OUT has exactly the pruned zeros (checked per layer).
    The base loads, and OUT is written, in the run's dtype (``--dtype``; float32 for runs made
    before the flag): a bfloat16 run merges into a bfloat16 model."""
    import json

    import torch

    from zoengine.extras import require

    require("peft", "lora", "zoengine merge")
    from peft import PeftModel

    from zoengine.run.evaluate import run_dtype
    from zoengine.run.pruning import check_output_dir
    from zoengine.run.resources import load_model
    from zoengine.sparsity.lora import mask_lora, merge_masked_lora
    from zoengine.storage.modeldir import write_model_dir

    adapter = os.path.join(run_dir, "adapter")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise TaskError("RUN", f"{run_dir!r} holds no LoRA adapter (adapter/): merge needs a "
                               "finished --lora run")
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        cfg = json.load(f)["config"]
    check_output_dir(output_dir)
    dtype = run_dtype(run_dir)
    model, tok = load_model(cfg["model"], dtype)
    masks = None
    if os.path.isfile(os.path.join(run_dir, MASKS_FILE)):
        masks = read_masks(os.path.join(run_dir, MASKS_FILE))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, m in masks.items():  # the run's pruned base: pruning zeroed exactly these
                params[n][~m] = 0.0
    model = PeftModel.from_pretrained(model, adapter)
    if masks is not None or cfg.get("keep_zeros"):
        log(f"masked merge: {len(mask_lora(model, masks))} LoRA layers keep the pruned zeros")
    merged = merge_masked_lora(model)

    def write(folder: str) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
    write_model_dir(output_dir, write)
    log(f"wrote {output_dir} (a plain transformers model, {dtype})")
    return output_dir
