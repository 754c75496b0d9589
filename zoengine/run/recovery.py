"""What recovering a pruned model adds to a run: sparsity-preserving LoRA and distillation.

``--lora`` on a pruned model (``--prune`` / ``--keep-zeros``) masks each adapter's delta by the
base weight's keep-mask (``zoengine.sparsity.lora``), so ``zoengine merge`` writes a model with
exactly the pruned zeros. ``--objective kd | kd+lm`` distils from the dense model: its top-k
logits over the first ``--kd-blocks`` training blocks are stored once, before pruning, in the
run folder (``teacher_cache/``), and the step's loss reads them from disk (the teacher is never
resident while training). docs/sparsity.md ("Recovering a pruned model"), docs/distillation.md.
"""

from __future__ import annotations

import os

from zoengine.tasks import TaskError

OBJECTIVES = ("lm", "kd", "kd+lm")
LORA_SCALINGS = ("lora", "rslora")
TEACHER_DIR = "teacher_cache"


def kd_weight(cfg) -> float:
    """The KD term's weight: 1 for ``kd``, ``--kd-weight`` for ``kd+lm``, 0 for ``lm``."""
    return {"lm": 0.0, "kd": 1.0}.get(cfg.objective, cfg.kd_weight)


def check_objective(cfg, task) -> None:
    if cfg.objective == "lm":
        return
    if task.kind != "lm":
        raise TaskError("--objective", f"{cfg.objective!r} distils next-token distributions: "
                                       "it needs an LM task (e.g. --task shakespeare)")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise TaskError("--objective", f"{cfg.objective!r} under torchrun is not supported yet "
                                       "(every rank would build the teacher cache); run one "
                                       "process")


def teacher_for_run(cfg, task, model, tok, log=print):
    """The teacher cache of this run (built from ``model`` now, before any pruning, or opened
    when a resumed run already has it), or None for ``--objective lm``."""
    if cfg.objective == "lm":
        return None
    from zoengine.tasks import TeacherCache, build_teacher_cache, lm_blocks

    blocks = lm_blocks(tok, task.splits["train"]["text"][0], cfg.block_size)[:cfg.kd_blocks]
    path = os.path.join(cfg.output_dir, TEACHER_DIR)
    if os.path.isdir(path):  # a resumed run: the model may be pruned already, never rebuild
        cache = TeacherCache.open(path, blocks)
        log(f"teacher cache: {cache.describe()}")
        return cache
    log(f"teacher cache: top-{cfg.kd_top_k} logits of the dense model over {len(blocks)} "
        f"blocks of {cfg.block_size} tokens ...")
    cache = build_teacher_cache(model, blocks, path, k=cfg.kd_top_k,
                                progress=bool(getattr(cfg, "progress", True)))
    log(f"teacher cache: {cache.describe()}")
    return cache


def lora_for_run(cfg, model, masks):
    """PEFT LoRA on ``model`` (base frozen; ``--lora-scaling``), its deltas masked by ``masks``
    (keep-masks of the pruned base weights) when the model is pruned."""
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


def norms_for_run(model) -> None:
    """``--train norms``: freeze all but the normalisation gains (no pruned weight moves)."""
    from zoengine.sparsity.norms import train_norms_only

    try:
        train_norms_only(model)
    except ValueError as exc:
        raise TaskError("--train", str(exc)) from None


MASKS_FILE = "keep_masks.safetensors"


def masks_writer(masks: dict):
    """A writer of ``keep_masks.safetensors``: each keep-mask as bits (uint8) with its shape in
    the metadata, so ``zoengine merge`` restores the pruned base exactly (1/32 of fp32)."""
    from safetensors.torch import save_file

    from zoengine.optim.masks import pack_mask

    def write(path: str) -> None:
        tensors = {n: pack_mask(m) for n, m in masks.items()}
        meta = {n: ",".join(map(str, m.shape)) for n, m in masks.items()}
        save_file(tensors, path, metadata=meta)
    return write


def read_masks(path: str) -> dict:
    from safetensors import safe_open

    from zoengine.optim.masks import unpack_mask

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        return {n: unpack_mask(f.get_tensor(n), tuple(int(x) for x in meta[n].split(",") if x))
                for n in f.keys()}


def merge_run(run_dir: str, output_dir: str, log=print) -> str:
    """``zoengine merge RUN OUT``: the base model of a LoRA run with its adapter merged; on a
    pruned base the deltas are masked, so OUT has exactly the pruned zeros (checked per layer)."""
    import json

    import torch
    from peft import PeftModel

    from zoengine.run.job import load_model
    from zoengine.run.modeldir import write_model_dir
    from zoengine.run.pruning import check_output_dir
    from zoengine.sparsity.lora import mask_lora, merge_masked_lora

    adapter = os.path.join(run_dir, "adapter")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise TaskError("RUN", f"{run_dir!r} holds no LoRA adapter (adapter/): merge needs a "
                               "finished --lora run")
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        cfg = json.load(f)["config"]
    check_output_dir(output_dir)
    model, tok = load_model(cfg["model"])
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
    log(f"wrote {output_dir} (a plain transformers model)")
    return output_dir
