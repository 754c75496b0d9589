"""``zoengine eval``: score a model, optionally with a run's trained weights, on a task split."""

from __future__ import annotations

import json
import os

import torch

from zoengine.run.config import DTYPES
from zoengine.run.resources import auto_threads, load_model
from zoengine.run.strategies import split_seqs
from zoengine.storage.folder import RunFolder, nonfinite
from zoengine.storage.manifest import (
    MANIFEST,
    IntegrityError,
    names_under,
    read_manifest,
    verify_under,
)
from zoengine.storage.modeldir import verify_model_dir
from zoengine.tasks import (
    OptionScorer,
    TaskError,
    evaluate_scores,
    last_features,
    lm_blocks,
    lm_eval,
    load_task,
)

FLAG = "--weights"


def _manifest_of(folder: str) -> dict | None:
    try:
        return read_manifest(folder)
    except IntegrityError as exc:
        exc.flag = FLAG
        raise


def resolve_weights(weights: str) -> str:
    """The file or folder to load for ``--weights``, verified against its manifest when there
    is one: a run folder (its final weights), a pruned model folder, or a file or folder a
    run folder's manifest names. Folders written before manifests are read as they are."""
    path = os.path.abspath(weights)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, MANIFEST)):
        body = _manifest_of(path)
        if body.get("kind") == "run":
            return RunFolder(path).final_weights(flag=FLAG)
        verify_model_dir(path, flag=FLAG)
        return path
    if os.path.isfile(os.path.join(path, "metrics.json")):  # a run folder without a manifest
        with open(os.path.join(path, "metrics.json"), encoding="utf-8") as f:
            return os.path.join(path, json.load(f)["weights"])
    parent, name = os.path.split(path)
    if os.path.exists(os.path.join(parent, MANIFEST)):
        body = _manifest_of(parent)
        if body.get("kind") == "run" and names_under(body, name):
            return verify_under(parent, body, name, flag=FLAG)
    return path


def _run_folder_of(weights: str) -> str | None:
    """The ``zoengine train`` output folder ``weights`` is, or holds a file or folder of."""
    path = os.path.abspath(weights)
    for folder in (path, os.path.dirname(path)):
        if os.path.isfile(os.path.join(folder, "metrics.json")) or (
                os.path.isfile(os.path.join(folder, "run.json"))):
            return folder
    return None


def _recorded_config(run: str) -> dict:
    """The configuration a run folder records: ``metrics.json``'s (verified against the
    manifest when there is one), else ``run.json`` (an unfinished run)."""
    metrics = os.path.join(run, "metrics.json")
    if os.path.isfile(metrics):
        if os.path.exists(os.path.join(run, MANIFEST)):
            body = _manifest_of(run)
            if body.get("kind") == "run" and names_under(body, "metrics.json"):
                metrics = verify_under(run, body, "metrics.json", flag=FLAG)
        with open(metrics, encoding="utf-8") as f:
            return json.load(f).get("config") or {}
    with open(os.path.join(run, "run.json"), encoding="utf-8") as f:
        body = json.load(f)
    return body.get("config", body) if isinstance(body, dict) else {}


def run_dtype(run: str, weights: str | None = None) -> str:
    """The dtype the run in folder ``run`` trained and evaluated in: its ``--dtype``
    (``float32`` for runs made before the flag); with ``--max-memory`` (whose plan may pick
    bfloat16 after loading, unrecorded) the dtype its saved ``model`` folder holds, when
    ``weights`` is one."""
    config = _recorded_config(run)
    dtype = config.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise TaskError(FLAG, f"{run!r} records dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if (config.get("max_memory") and weights and os.path.isdir(weights)
            and os.path.exists(os.path.join(weights, "config.json"))):
        from zoengine.loading import checkpoint_dtype, checkpoint_tensors

        try:
            stored = str(checkpoint_dtype(checkpoint_tensors(weights))).removeprefix("torch.")
        except (OSError, ValueError):  # not safetensors: the recorded dtype
            stored = dtype
        dtype = stored if stored in DTYPES else dtype
    return dtype


def check_finite(weights: str) -> None:
    """Refuse weights holding NaN or inf (a head file, or every .safetensors file of an
    adapter or model folder), naming the file and the tensor."""
    from safetensors import safe_open

    files = [weights] if os.path.isfile(weights) else sorted(
        os.path.join(weights, n) for n in os.listdir(weights) if n.endswith(".safetensors"))
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                bad = nonfinite({key: f.get_tensor(key)})
                if bad:
                    raise IntegrityError(f"{path}: tensor {key!r} holds {bad[1]} NaN/inf "
                                         "values; refusing to evaluate these weights",
                                         path=path, flag=FLAG)


def run_eval(*, model_spec: str, task_name: str, weights: str | None, split: str, seed: int,
             max_length: int = 128, batch_size: int = 16, block_size: int = 128,
             task_kw: dict | None = None, dtype: str | None = None) -> dict:
    """Score a model (optionally with trained head rows, a LoRA adapter or saved model) on a
    task's split. Classification: accuracy, AUC, dev-calibrated accuracy; LM: loss, perplexity.
    ``dtype``: what the model loads in; None: the run's dtype when ``weights`` is a run folder
    or in one (``run_dtype``), float32 otherwise. The result names it (``dtype``)."""
    if dtype is not None and dtype not in DTYPES:
        raise TaskError("--dtype", f"{dtype!r}: must be one of {', '.join(DTYPES)}")
    torch.set_num_threads(auto_threads())
    task = load_task(task_name, seed=seed, block_size=block_size, **(task_kw or {}))
    head_rows = None
    if weights:
        run = _run_folder_of(weights)
        weights = resolve_weights(weights)
        if dtype is None and run is not None:
            dtype = run_dtype(run, weights)
        check_finite(weights)
        if os.path.isfile(weights):
            from safetensors.torch import load_file

            head_rows = load_file(weights)
        elif os.path.exists(os.path.join(weights, "adapter_config.json")):
            pass
        elif os.path.exists(os.path.join(weights, "config.json")):
            model_spec, weights = weights, None
        else:
            raise TaskError("--weights", f"{weights!r} is not a zoengine output folder, "
                                         "head .safetensors, adapter or model folder")
    dtype = dtype or "float32"
    model, tok = load_model(model_spec, dtype)
    if weights and head_rows is None:
        from zoengine.extras import require

        require("peft", "lora", "--weights with a LoRA adapter")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, weights)
        model.eval()
    if task.kind == "lm":
        blocks = lm_blocks(tok, task.splits[split]["text"][0], block_size)
        return {"task": task.name, "split": split, "dtype": dtype,
                **lm_eval(model, blocks, batch_size)}
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
    return {"task": task.name, "split": split, "dtype": dtype, **m["test"]}
