"""The job behind ``zoengine train``: set up (task, model, pruning, memory plan, LoRA), build the
strategy and the optimizer, run the one loop, evaluate, write the output folder.

The optimizer always comes from ``zoengine.optim.create(method, ...)``; what is trained comes
from ``zoengine.run.strategies``; the steps from ``zoengine.run.loop``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

import torch

from zoengine.run.config import DEFAULT_MODEL, RunConfig
from zoengine.run.folder import atomic_write, clean_stale_temps, save_weights
from zoengine.run.loop import finish_curve, run_loop
from zoengine.run.report import plot_curve, run_summary_json, summary_lines
from zoengine.run.strategies import make_strategy
from zoengine.tasks import TaskError, load_task


def _log(msg: str) -> None:
    print(msg, flush=True)


def load_model(spec: str):
    """(model, tokenizer): the embedded default or a local Hugging Face model folder."""
    if spec == DEFAULT_MODEL:
        from zoengine.models import default_model_available, load_default_model

        reason = default_model_available()
        if reason:
            raise TaskError("--model", f"the default model cannot load: {reason}")
        return load_default_model()
    if not os.path.isdir(spec) or not os.path.exists(os.path.join(spec, "config.json")):
        raise TaskError("--model", f"{spec!r} is neither {DEFAULT_MODEL!r} nor a local Hugging "
                                   "Face model folder (with config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model, tok


def auto_threads() -> int:
    """torch's thread count, lowered to the cores other processes leave free.

    On a 2-core machine with one busy neighbour, 2 threads made a forward 2.5x slower than
    1 thread (spinning threads wait on a descheduled peer), so a busy machine gets fewer.
    """
    n = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        return n
    free = int((os.cpu_count() or n) - busy + 0.5)
    return max(1, min(n, free))


def apply_lora(cfg: RunConfig, model):
    """Freeze the base and wrap ``model`` with PEFT LoRA adapters (``cfg.lora_*``)."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    pc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                    target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    model = get_peft_model(model, pc)
    model.eval()
    return model


def make_optimizer(cfg: RunConfig, named_params, masks=None):
    """``zoengine.optim.create(cfg.method, ...)`` with the run's lr, eps, seed and masks."""
    from zoengine.optim import create

    extra = {} if masks is None else {"masks": masks}
    if cfg.method == "dizo" and cfg.dizo_interval is not None:
        extra["interval"] = cfg.dizo_interval
    return create(cfg.method, named_params, lr=cfg.lr, eps=cfg.eps, seed=cfg.seed, **extra)


def prune_and_plan(cfg: RunConfig, task, model, tok):
    """``--prune``/``--keep-zeros`` (masks for full fine-tuning) and ``--max-memory`` (a plan
    applied to the batch size, sequence length and dtype). Returns (masks, plan or None)."""
    masks = None
    if cfg.prune or cfg.keep_zeros:
        if cfg.train != "full":
            raise TaskError("--prune" if cfg.prune else "--keep-zeros",
                            "sparsity is preserved for full fine-tuning: add --train full "
                            "(head and LoRA never touch the pruned weights)")
        from zoengine.run.pruning import masks_for_run

        masks = masks_for_run(
            model, tok, prune_spec=cfg.prune, sparsity=cfg.prune_sparsity,
            keep_zeros=bool(cfg.keep_zeros),
            calib_task=cfg.task if task.kind == "lm" else "shakespeare", seed=cfg.seed, log=_log)
    if not cfg.max_memory:
        return masks, None
    from zoengine.sparsity import memory

    lm = task.kind == "lm"
    plan = memory.plan_for_run(model, cfg.max_memory, method=cfg.method,
                               batch_size=cfg.batch_size,
                               seq_len=cfg.block_size if lm else cfg.max_length,
                               masks=masks, log=_log)
    cfg.batch_size = plan.batch_size
    cfg.eval_batch_size = min(cfg.eval_batch_size, plan.batch_size)  # the budget covers eval too
    if lm:
        cfg.block_size = plan.seq_len
    else:
        cfg.max_length = plan.seq_len
    if plan.dtype != "float32":
        model.to(getattr(torch, plan.dtype))
    memory.reset_peak()
    return masks, plan


def _gain(report: dict) -> dict:
    b, a = report["before"]["test"], report["after"]["test"]
    return {"auc": a["auc"] - b["auc"], "accuracy": a["accuracy"] - b["accuracy"],
            "accuracy_vs_calibrated_baseline": a["accuracy"] - b["calibrated_accuracy"],
            "beats_calibrated_baseline": bool(a["accuracy"] > b["calibrated_accuracy"]
                                              and a["auc"] > b["auc"])}


def run_train(cfg: RunConfig) -> dict:
    """Load, evaluate, train, evaluate, write outputs. Returns the report (metrics.json)."""
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads or auto_threads())
    task = load_task(cfg.task, seed=cfg.seed, template=cfg.template, options=cfg.options,
                     text_column=cfg.text_column, label_column=cfg.label_column,
                     block_size=cfg.block_size)
    cfg = cfg.resolved(task)
    if task.kind == "lm" and cfg.train == "head":
        raise TaskError("--train", "head trains classification options; an LM task needs "
                                   "--train full or --lora")
    os.makedirs(cfg.output_dir, exist_ok=True)
    clean_stale_temps(cfg.output_dir)
    _log(f"loading model {cfg.model} ...")
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model)
    report = {"config": asdict(cfg), "timing": {"load_s": time.perf_counter() - t0},
              "torch_threads": torch.get_num_threads()}
    torch.manual_seed(cfg.seed)
    masks, plan = prune_and_plan(cfg, task, model, tok)
    if cfg.train == "lora":
        model = apply_lora(cfg, model)
    strategy = make_strategy(cfg, task, model, tok, log=_log)
    report["timing"].update(strategy.timing)
    params = strategy.named_params()
    report["trainable_params"] = int(sum(p.numel() for _, p in params))
    opt = make_optimizer(cfg, params, masks=masks)
    t1 = time.perf_counter()
    report["before"] = strategy.evaluate()
    report["timing"]["eval_before_s"] = time.perf_counter() - t1
    run_loop(cfg, strategy, opt, report, log=_log)
    t2 = time.perf_counter()
    report["after"] = strategy.evaluate()
    report["timing"]["eval_after_s"] = time.perf_counter() - t2
    finish_curve(report, cfg.steps)
    if task.kind == "classification":
        report["gain"] = _gain(report)
    if cfg.prune or cfg.keep_zeros:
        from zoengine.sparsity import sparsity_report

        report["sparsity_after"] = sparsity_report(model, masks if isinstance(masks, dict)
                                                   else None)
    if cfg.max_memory:
        from zoengine.sparsity import memory

        report["memory"] = memory.report_peak(plan, log=_log)
    return write_outputs(cfg, report, strategy.trained(), tok, t_start)


def write_outputs(cfg: RunConfig, report: dict, trained, tok, t_start: float) -> dict:
    """Weights, then curve.png, then metrics.json (its presence marks a finished run)."""
    report["weights"] = os.path.relpath(save_weights(cfg, cfg.output_dir, trained, tok),
                                        cfg.output_dir)
    report["timing"]["total_s"] = time.perf_counter() - t_start
    atomic_write(os.path.join(cfg.output_dir, "curve.png"), plot_curve(report))
    atomic_write(os.path.join(cfg.output_dir, "metrics.json"), run_summary_json(report))
    for line in summary_lines(report):
        _log(line)
    _log(f"wrote {cfg.output_dir}/metrics.json, curve.png, {report['weights']}")
    return report
