"""The ``zoengine train`` flags, the run configuration they build, and its validation.

Every error raises ``UsageError`` naming its flag; ``zoengine.cli.main`` turns it into exit
status 2 with that message (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from dataclasses import fields

EXIT_USAGE = 2


class UsageError(Exception):
    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise (so every usage error takes the same exit-2 path)."""

    def error(self, message):
        raise UsageError("argument", message)


def _csv_list(s: str) -> list[str]:
    return [x for x in s.split(",") if x != ""]


def _options_list(s: str) -> list[str]:
    # options keep a leading space if given (" negative"); "neg,pos" becomes [" neg", " pos"]
    return [x if x.startswith(" ") else " " + x for x in s.split(",") if x.strip()]


TRAIN_FLAGS = [  # (flag, dest, type, help)
    ("--model", "model", str, "'smollm2-135m' (embedded, default) or a local HF model folder"),
    ("--task", "task", str, "sentiment | sentiment3 | shakespeare | a .csv/.json/.jsonl/.txt file"),
    ("--method", "method", str, "ZO method from the registry (zoengine methods lists them)"),
    ("--train", "train", str, "what to train: auto | head | full | lora | norms (auto: head "
                              "for classification, lora for LM; norms: the RMSNorm/LayerNorm "
                              "gains only, the fast recovery of a pruned model)"),
    ("--steps", "steps", int, "ZO steps (default: head 8000, full 60, lora 100, norms 300)"),
    ("--batch-size", "batch_size", int, "examples per step (default 16)"),
    ("--lr", "lr", float, "learning rate (default per --train: head 1e-4, full 1e-5, lora 1e-3, "
                          "norms 1e-4)"),
    ("--eps", "eps", float, "perturbation scale (default: head/full/norms 1e-3, lora 1e-2)"),
    ("--seed", "seed", int, "seed of the data split, batches and noise (default 0)"),
    ("--output-dir", "output_dir", str, "where metrics.json, curve.png and weights go "
                                        "(default outputs/<task>-<train>-<method>-s<seed>)"),
    ("--train-examples", "train_examples", int, "head: training prompts cached (default 512)"),
    ("--eval-limit", "eval_limit", int, "score only the first N dev/test rows (LM tasks: "
                                        "blocks; 0: all)"),
    ("--eval-every", "eval_every", int, "dev evaluation every N steps (head default 250)"),
    ("--max-length", "max_length", int, "prompt tokens kept (default 128)"),
    ("--eval-batch-size", "eval_batch_size", int, "batch size of evaluation (default 16)"),
    ("--lora-r", "lora_r", int, "LoRA rank (default 8)"),
    ("--lora-alpha", "lora_alpha", int, "LoRA alpha (default 16)"),
    ("--lora-targets", "lora_targets", _csv_list, "LoRA modules (default q_proj,v_proj)"),
    ("--template", "template", str, "prompt template with {text} (user classification task)"),
    ("--options", "options", _options_list, "comma-separated answer words (user task)"),
    ("--text-column", "text_column", str, "column of the text in a task file (default text)"),
    ("--label-column", "label_column", str, "column of the label in a task file (default label)"),
    ("--block-size", "block_size", int, "LM tasks: tokens per block (default 128)"),
    ("--threads", "threads", int, "torch threads (default: torch's choice)"),
    ("--dizo-interval", "dizo_interval", int, "--method dizo: steps between projections "
                                              "(default 50)"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints (default: head "
                                                    "1000, full 10, lora 50; 0: never)"),
    ("--checkpoint-minutes", "checkpoint_minutes", float, "also checkpoint every N minutes "
                                                          "(default 10; 0: never)"),
    ("--perturbation", "perturbation", str, "inplace (default) | virtual: θ is never written "
                                            "during the two evaluations (full/LoRA training; "
                                            "docs/virtual.md)"),
    ("--replica-check-every", "replica_check_every", int, "under torchrun: compare a checksum "
                                                          "of the ranks' weights every N steps "
                                                          "(default 100; 0: never)"),
    ("--lora-scaling", "lora_scaling", str, "lora (alpha/r, default) | rslora (alpha/sqrt(r))"),
    ("--objective", "objective", str, "LM tasks: lm (default) | kd (distil the dense model's "
                                      "top-k logits) | kd+lm"),
    ("--kd-weight", "kd_weight", float, "--objective kd+lm: weight of the KD term (default 0.5)"),
    ("--kd-top-k", "kd_top_k", int, "teacher logits kept per position (default 64)"),
    ("--kd-blocks", "kd_blocks", int, "training blocks the teacher cache covers (default 256)"),
    ("--dtype", "dtype", str, "float32 (default) | bfloat16 | float16: the dtype the model "
                              "loads and trains in (with --max-memory: the widest that fits)"),
    ("--journal-fsync", "journal_fsync", str, "journal durability: step | checkpoint | every "
                                              "K steps (default 100; a kill -9 loses nothing "
                                              "either way, a power cut at most K steps)"),
]
DTYPES = ("float32", "bfloat16", "float16")  # --dtype
_FLAG_OF = {dest: flag for flag, dest, _, _ in TRAIN_FLAGS}


# ---- config -----------------------------------------------------------------------------------

def read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError("--config", f"{path!r}: no such file")
    text = open(path, encoding="utf-8").read()
    if path.endswith((".yaml", ".yml")):
        if importlib.util.find_spec("yaml") is None:
            raise UsageError("--config", "YAML needs pyyaml (pip install pyyaml); or use JSON")
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError("--config", f"{path}: not valid YAML ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError("--config", f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError("--config", f"{path}: must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def make_run_config(args, *, check: bool = True):
    from zoengine.run.config import RunConfig

    known = {f.name for f in fields(RunConfig)}
    values = {}
    if args.config:
        for k, v in read_config(args.config).items():
            if k not in known:
                raise UsageError("--config", f"unknown key {k!r} (known: {sorted(known)})")
            values[k] = v
    for dest in known:
        v = getattr(args, dest, None)
        if v is not None:
            values[dest] = v
    if args.lora:
        if values.get("train") not in (None, "auto", "lora"):
            raise UsageError("--lora", f"conflicts with --train {values['train']}")
        values["train"] = "lora"
    if isinstance(values.get("options"), str):
        values["options"] = _options_list(values["options"])
    if isinstance(values.get("lora_targets"), str):
        values["lora_targets"] = _csv_list(values["lora_targets"])
    cfg = RunConfig(**values)
    if check:
        validate(cfg)
    return cfg


def _flag(dest: str) -> str:
    return _FLAG_OF.get(dest, "--" + dest.replace("_", "-"))


def validate(cfg) -> None:
    """Reject bad input before any work starts; each error names its flag."""
    from zoengine.optim import available_methods
    from zoengine.run.config import DEFAULT_MODEL, TRAIN_MODES

    def need(dest, ok, what):
        v = getattr(cfg, dest)
        if not ok(v):
            raise UsageError(_flag(dest), f"{v!r}: {what}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v \
            and abs(v) != float("inf")

    need("steps", lambda v: v is None or (is_int(v) and v > 0), "must be an integer > 0")
    for d in ("batch_size", "eval_batch_size", "train_examples", "max_length", "block_size",
              "lora_r", "lora_alpha"):
        need(d, lambda v: is_int(v) and v > 0, "must be an integer > 0")
    need("eval_limit", lambda v: is_int(v) and v >= 0, "must be an integer >= 0")
    need("eval_every", lambda v: is_int(v) and v >= 0, "must be an integer >= 0")
    need("seed", lambda v: is_int(v) and v >= 0, "must be an integer >= 0")
    need("threads", lambda v: v is None or (is_int(v) and v > 0), "must be an integer > 0")
    need("dizo_interval", lambda v: v is None or (is_int(v) and v > 0), "must be an integer > 0")
    need("dizo_interval", lambda v: v is None or cfg.method == "dizo",
         "applies to --method dizo only")
    need("lr", lambda v: v is None or (is_num(v) and v >= 0), "must be a finite number >= 0")
    need("eps", lambda v: v is None or (is_num(v) and v > 0), "must be a finite number > 0")
    need("train", lambda v: v in TRAIN_MODES, f"must be one of {TRAIN_MODES}")
    need("perturbation", lambda v: v in ("inplace", "virtual"), "must be inplace or virtual")
    need("replica_check_every", lambda v: is_int(v) and v >= 0, "must be an integer >= 0")
    need("lora_scaling", lambda v: v in ("lora", "rslora"), "must be lora or rslora")
    need("dtype", lambda v: v in DTYPES, f"must be one of {', '.join(DTYPES)}")
    need("objective", lambda v: v in ("lm", "kd", "kd+lm"), "must be lm, kd or kd+lm")
    need("kd_weight", lambda v: is_num(v) and 0 <= v <= 1, "must be a number in [0, 1]")
    for d in ("kd_top_k", "kd_blocks"):
        need(d, lambda v: is_int(v) and v > 0, "must be an integer > 0")
    methods = available_methods()
    need("method", lambda v: v in methods, f"unknown method; available: {', '.join(methods)}")
    need("model", lambda v: v == DEFAULT_MODEL or os.path.isfile(os.path.join(str(v),
                                                                                 "config.json")),
         f"not {DEFAULT_MODEL!r} and not a local Hugging Face model folder with config.json")
    from zoengine.tasks import BUNDLED

    need("task", lambda v: isinstance(v, str) and (v in BUNDLED or os.path.isfile(v)),
         f"neither a bundled task ({', '.join(BUNDLED)}) nor an existing file")
    need("template", lambda v: v is None or "{text}" in v, "must contain {text}")
    need("prune_sparsity", lambda v: v is None or (is_num(v) and 0 < v < 1),
         "must be a fraction in (0, 1)")
    from zoengine.sparsity import parse_prune_spec
    from zoengine.sparsity.memory import parse_size

    for dest, parse in (("prune", parse_prune_spec), ("max_memory", parse_size)):
        if getattr(cfg, dest) is not None:
            try:
                parse(getattr(cfg, dest))
            except ValueError as exc:
                raise UsageError(_flag(dest), str(exc)) from None


