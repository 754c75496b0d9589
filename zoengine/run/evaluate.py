"""``zoengine eval``: score a model, optionally with a run's trained weights, on a task split."""

from __future__ import annotations

import json
import os

import torch

from zoengine.run.job import auto_threads, load_model
from zoengine.run.strategies import split_seqs
from zoengine.tasks import (
    OptionScorer,
    TaskError,
    evaluate_scores,
    last_features,
    lm_blocks,
    lm_eval,
    load_task,
)


def run_eval(*, model_spec: str, task_name: str, weights: str | None, split: str, seed: int,
             max_length: int = 128, batch_size: int = 16, block_size: int = 128,
             task_kw: dict | None = None) -> dict:
    """Score a model (optionally with trained head rows, a LoRA adapter or saved model) on a
    task's split. Classification: accuracy, AUC, dev-calibrated accuracy; LM: loss, perplexity."""
    torch.set_num_threads(auto_threads())
    task = load_task(task_name, seed=seed, block_size=block_size, **(task_kw or {}))
    head_rows = None
    if weights:
        if os.path.isfile(os.path.join(weights, "metrics.json")):  # a run's output folder
            w = json.load(open(os.path.join(weights, "metrics.json")))["weights"]
            weights = os.path.join(weights, w)
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            head_rows = load_file(weights)
        elif os.path.exists(os.path.join(weights, "adapter_config.json")):
            pass
        elif os.path.exists(os.path.join(weights, "config.json")):
            model_spec, weights = weights, None
        else:
            raise TaskError("--weights", f"{weights!r} is not a zoengine output folder, "
                                         "head .safetensors, adapter or model folder")
    model, tok = load_model(model_spec)
    if weights and head_rows is None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, weights)
        model.eval()
    if task.kind == "lm":
        blocks = lm_blocks(tok, task.splits[split]["text"][0], block_size)
        return {"task": task.name, "split": split, **lm_eval(model, blocks, batch_size)}
    scorer = OptionScorer(tok, task.options)
    dev_seqs, dev_y = split_seqs(task, tok, "dev", max_length)
    seqs, y = split_seqs(task, tok, split, max_length)
    if head_rows is not None:
        f = last_features(model, dev_seqs + seqs, scorer.pad_id, batch_size)
        s = f @ head_rows["head_rows"].T + head_rows["head_bias"]
        d, t = s[:len(dev_seqs)], s[len(dev_seqs):]
    else:
        d = scorer.score_all(model, dev_seqs, batch_size)
        t = scorer.score_all(model, seqs, batch_size)
    m = evaluate_scores(d, dev_y, t, y)
    return {"task": task.name, "split": split, **m["test"]}
