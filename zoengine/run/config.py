"""``RunConfig``: everything a ``zoengine train`` run needs, validated when it is built.

Each field carries its help, its check (``zoengine.checks``), its choices and, where it differs
from the field's name, its flag; ``zoengine train``'s parser is generated from these fields
(``zoengine.cli.flags.add_config_flags``) and ``--config`` files use the same keys. A bad value
raises ``ConfigError`` naming the flag, the value and what is allowed, whether it came from the
command line, a config file or a Python caller (``run_train(RunConfig(steps=-1))``).
"""

from __future__ import annotations

import os
import typing
from dataclasses import MISSING, asdict, dataclass, fields

from zoengine.checks import (
    BOOL,
    EXISTING_DIR,
    FRACTION,
    NAME,
    NONNEGATIVE_INT,
    NONNEGATIVE_NUMBER,
    OPTIONS,
    OUTPUT_DIR,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    PROBABILITY,
    SEED,
    STRINGS,
    TEMPLATE,
    ConfigError,
    optional,
)
from zoengine.run.config_fields import (  # noqa: F401  (MODEL, TASK: re-exported)
    DEFAULT_MODEL,
    DIZO_SET,
    JOURNAL_FSYNC,
    KERNEL_ORDER,
    TAU,
    METHOD,
    MODEL,
    PRUNE,
    SIZE,
    SPLIT_SIZES,
    TASK,
    _file_tasks,
    csv_list,
    option,
    options_list,
    split_sizes,
)

# The choices of four flags, here rather than with their owners (optim/virtual.py, run/kd.py,
# run/lora.py, optim/updates.py) so that building the parser (`zoengine --help`) imports no torch: 0.7 s instead
# of 3-6 s. tests/test_config.py checks PERTURBATIONS equals optim.virtual's.
PERTURBATIONS = ("inplace", "virtual")
OBJECTIVES = ("lm", "kd", "kd+lm", "accuracy", "f1")  # run/kd.py, run/objectives.py
LR_SCHEDULERS = ("constant", "linear", "cosine")  # = run/controls.py's
UPDATES = ("sgd", "momentum", "sign", "conservative", "adam")  # = optim.updates.UPDATES
LORA_SCALINGS = ("lora", "rslora")

# per trainable set: (lr, eps) defaults, from research/feasibility.md §2-4 and our runs
# norms: 1e-4 closed 23 % of Wanda-50 % SmolLM2's gap in 116 steps, 3e-5 12 %, 1e-3 diverged
MODE_DEFAULTS = {"head": (1e-4, 1e-3), "full": (1e-5, 1e-3), "lora": (1e-3, 1e-2),
                 "norms": (1e-4, 1e-3)}
DEFAULT_STEPS = {"head": 8000, "full": 60, "lora": 100, "norms": 300}
# a checkpoint costs a save of the trained tensors: ~ms for the head, ~1 s for SmolLM2 in full
# (0.5 GB hashed and written), so full checkpoints every 10 steps (~1 min of steps on a CPU)
DEFAULT_CHECKPOINT_EVERY = {"head": 1000, "full": 10, "lora": 50, "norms": 100}
TRAIN_MODES = ("auto", "head", "full", "lora", "norms")
DTYPES = ("float32", "bfloat16", "float16")


def _per_mode(table: dict) -> str:
    return ", ".join(f"{mode} {v:g}" for mode, v in table.items())


_LR = {mode: lr for mode, (lr, _) in MODE_DEFAULTS.items()}
_EPS = {mode: eps for mode, (_, eps) in MODE_DEFAULTS.items()}


@dataclass
class RunConfig:
    """Everything a run needs; ``zoengine train`` flags and ``--config`` keys have these names.

    Built with bad values it raises ``ConfigError`` (a ``ValueError``) naming the flag."""

    model: str = option(DEFAULT_MODEL, "the embedded model, or a local Hugging Face model folder "
                                       "(config.json + weights + tokenizer)", MODEL)
    task: str = option("sentiment", "sentiment | sentiment3 | shakespeare | a .csv/.tsv/.json/"
                                    ".jsonl/.parquet/.txt file | a task read from --data-dir: "
                                    "sst2, rte, cb, boolq, wsc, wic, multirc, copa, record, "
                                    "squad, drop (docs/tasks.md)", TASK)
    data_dir: str | None = option(None, "the folder of --task sst2 ... drop: train.jsonl, "
                                        "validation.jsonl (or save_to_disk folders) in the "
                                        "dataset's own field names", optional(EXISTING_DIR),
                                  metavar="DIR")
    split_sizes: list | None = option(None, "with --data-dir: rows drawn for train, dev and "
                                            "test (default MeZO's 1000,500,1000; cb and copa "
                                            "1000,100,1000)", optional(SPLIT_SIZES),
                                      parse=split_sizes, metavar="TRAIN,DEV,TEST")
    method: str = option("mezo", "ZO method from the registry (`zoengine methods` lists them)",
                         METHOD, metavar="METHOD")
    update: str | None = option(None, "how the estimate moves the weights: sgd (the method's "
                                      "default), momentum, sign, adam or conservative "
                                      "(docs/methods/updates.md)", choices=UPDATES)
    momentum: float | None = option(None, "--update momentum only: its mu (default 0.9)",
                                    optional(FRACTION))
    train: str = option("auto", "what to train (auto: head for classification, lora for LM; "
                                "norms: the RMSNorm/LayerNorm gains only, the fast recovery of "
                                "a pruned model)", choices=TRAIN_MODES)
    steps: int | None = option(None, "ZO steps (default per --train: "
                                     f"{_per_mode(DEFAULT_STEPS)})", optional(POSITIVE_INT))
    batch_size: int = option(16, "examples per step (classification batches are "
                                 "class-balanced)", POSITIVE_INT)
    lr: float | None = option(None, f"learning rate (default per --train: {_per_mode(_LR)})",
                              optional(NONNEGATIVE_NUMBER))
    eps: float | None = option(None, "perturbation scale ε (default per --train: "
                                     f"{_per_mode(_EPS)})", optional(POSITIVE_NUMBER))
    seed: int = option(0, "seed of the data split, batches and noise", SEED)
    output_dir: str | None = option(None, "where metrics.json, curve.png and weights go "
                                          "(default outputs/<task>-<train>-<method>-s<seed>)",
                                    optional(OUTPUT_DIR))
    train_examples: int = option(512, "head mode: balanced training prompts whose features "
                                      "are cached", POSITIVE_INT)
    eval_limit: int = option(0, "score only the first N dev and test rows (LM tasks: blocks; "
                                "0: all; for quick checks)", NONNEGATIVE_INT)
    eval_every: int = option(0, "dev evaluation every N steps for the curve (0, the default: "
                                "every 250 in head mode, else before/after only)",
                             NONNEGATIVE_INT, show_default=False)
    max_length: int = option(128, "prompt tokens kept (the end of the prompt is kept)",
                             POSITIVE_INT)
    eval_batch_size: int = option(16, "evaluation batch size", POSITIVE_INT)
    lora_r: int = option(8, "LoRA rank", POSITIVE_INT)
    lora_alpha: int = option(16, "LoRA alpha", POSITIVE_INT)
    lora_targets: list = option(["auto"], "LoRA target modules, comma-separated (auto: the "
                                          "query and value projections, or the fused q/k/v "
                                          "one, from the architecture table; docs/models.md)",
                                STRINGS, parse=csv_list, metavar="NAMES")
    template: str | None = option(None, "user classification task: prompt template with "
                                        "{text}", optional(TEMPLATE))
    options: list | None = option(None, "user classification task: comma-separated answer "
                                        "words (negative,positive becomes ' negative', "
                                        "' positive')", optional(OPTIONS), parse=options_list,
                                  metavar="WORDS")
    text_column: str = option("text", "column of the text in a task file", NAME)
    label_column: str = option("label", "column of the label in a task file", NAME)
    block_size: int = option(128, "LM tasks: tokens per block", POSITIVE_INT)
    threads: int | None = option(None, "torch threads (default: torch's count, lowered to the "
                                       "cores other processes leave free)",
                                 optional(POSITIVE_INT))
    progress: bool = option(True, "no progress bar", BOOL, flag="--no-progress",
                            action="store_false")
    prune: str | None = option(None, "prune before training: wanda | magnitude, optionally "
                                     ":2:4 / :4:8 (e.g. wanda:2:4); the training keeps the "
                                     "pruned zeros", optional(PRUNE), metavar="METHOD[:PATTERN]")
    prune_sparsity: float | None = option(None, "fraction removed per layer for unstructured "
                                                "--prune (default 0.5)", optional(FRACTION))
    keep_zeros: bool | None = option(None, "the model is already pruned: keep its exact zeros "
                                           "(masks='zeros')", optional(BOOL),
                                     action="store_true")
    max_memory: str | None = option(None, "memory budget (e.g. 2GiB, 800MiB): plan batch size, "
                                          "sequence length and dtype to fit, print the plan, "
                                          "refuse if nothing fits; the measured peak is "
                                          "reported after the run", optional(SIZE),
                                    metavar="SIZE")
    dizo_interval: int | None = option(None, "--method dizo only: steps between projections "
                                             "(default 50)", optional(POSITIVE_INT))
    dizo_projected: str | None = option(None, "--method dizo only: the tensors it projects: "
                                              "code (key and value projections, the "
                                              "authors' code), paper (query and value), "
                                              "lora, all, or a regex of parameter names "
                                              "(default per --train: full code, lora lora, "
                                              "head and norms all)", optional(DIZO_SET),
                                        metavar="SET")
    checkpoint_every: int | None = option(None, "steps between checkpoints (default per "
                                                f"--train: {_per_mode(DEFAULT_CHECKPOINT_EVERY)}"
                                                "; 0: never)", optional(NONNEGATIVE_INT))
    checkpoint_minutes: float = option(10.0, "also checkpoint after this many minutes (0: "
                                             "never)", NONNEGATIVE_NUMBER)
    journal_fsync: str = option("100", "when the journal is fsynced: step | checkpoint | every "
                                       "K steps (a kill -9 loses nothing either way, a power "
                                       "cut at most K steps)", JOURNAL_FSYNC)
    perturbation: str = option("inplace", "virtual: θ is never written during the two "
                                          "evaluations (full/LoRA training; docs/virtual.md)",
                               choices=PERTURBATIONS)
    replica_check_every: int = option(100, "under torchrun: steps between checksums of the "
                                           "ranks' weights (0: never)", NONNEGATIVE_INT)
    lora_scaling: str = option("lora", "lora: alpha/r; rslora: alpha/sqrt(r), PEFT's "
                                       "rank-stabilised scale", choices=LORA_SCALINGS)
    objective: str = option("lm", "what the closure returns: lm (the task's loss: LM loss, or "
                                  "cross-entropy over the options), accuracy or f1 (minus the "
                                  "batch's metric, MeZO's non-differentiable objectives), kd "
                                  "or kd+lm (LM tasks: distil the dense model's top-k logits)",
                            choices=OBJECTIVES)
    kd_weight: float = option(0.5, "--objective kd+lm: weight of the KD term", PROBABILITY)
    kd_top_k: int = option(64, "teacher logits kept per position", POSITIVE_INT)
    kd_blocks: int = option(256, "training blocks the teacher cache covers (KD trains on "
                                 "these)", POSITIVE_INT)
    dtype: str = option("float32", "the dtype the model loads and trains in (with "
                                   "--max-memory: the widest that fits)", choices=DTYPES)
    # run controls (docs/cli.md; defaults MeZO's: n = 1, constant lr, no weight decay)
    n_samples: int = option(1, "perturbations per step, averaged (n-SPSA; 2n forwards a step; "
                               "MeZO's n = 1)", POSITIVE_INT)
    lr_scheduler: str = option("constant", "lr schedule over --steps: constant (MeZO), linear "
                                           "or cosine decay to 0 (transformers' formulas)",
                               choices=LR_SCHEDULERS)
    warmup_steps: int = option(0, "steps of linear lr warm-up from 0 (transformers' rule)",
                               NONNEGATIVE_INT)
    weight_decay: float = option(0.0, "L2 weight decay added to the update (MeZO's default 0)",
                                 NONNEGATIVE_NUMBER)
    kernel_order: int | None = option(None, "KerZOO's kernel order: 1, 3 or 5 (default 3; "
                                            "kerzoo, kerzoo+pezo only)", optional(KERNEL_ORDER))
    r_range: float | None = option(None, "KerZOO's r ~ U(-a, a): a (default 1; kerzoo, "
                                         "kerzoo+pezo only)", optional(POSITIVE_NUMBER))
    pool_size: int | None = option(None, "PeZO's pool of random numbers (default 65536; pezo, "
                                         "kerzoo+pezo only)", optional(POSITIVE_INT))
    rank: int | None = option(None, "rank r of low-rank noise z = U·Vᵀ/√r (default 1; "
                                    "mezo-lowrank only)", optional(POSITIVE_INT))
    resample_every: int | None = option(None, "low-rank noise: steps between fresh V factors "
                                              "(default 100; mezo-lowrank only)",
                                        optional(POSITIVE_INT))
    batched_samples: bool | None = option(None, "evaluate a step's 2n perturbations as one "
                                                "forward of the batch repeated 2n times "
                                                "(step_batched; needs --perturbation virtual; "
                                                "pays with low-rank noise)", optional(BOOL),
                                          action="store_true")
    proj_eps: float | None = option(None, "--method dizo only: ε of the γ search (default 0.1)",
                                    optional(POSITIVE_NUMBER))
    proj_lr: float | None = option(None, "--method dizo only: lr of the γ search (default 2)",
                                   optional(NONNEGATIVE_NUMBER))
    tau: float | None = option(None, "--method dizo only: τ, γ kept within (1 ± τ)·‖Δ‖ "
                                     "(default 0.2)", optional(TAU))
    keep_best: bool | None = option(None, "keep the weights of the best dev evaluation (every "
                                          "--eval-every steps) as the run's weights, and say "
                                          "which step", optional(BOOL), action="store_true")
    max_forwards: int | None = option(None, "stop cleanly before a step would take the "
                                            "training forwards past N (search and n samples "
                                            "counted)", optional(POSITIVE_INT), metavar="N")
    max_minutes: float | None = option(None, "stop cleanly after the step that reaches M "
                                             "minutes of training", optional(POSITIVE_NUMBER),
                                       metavar="M")

    def __post_init__(self):
        self.validate()

    def validate(self) -> RunConfig:
        """Check every field (and the pairs that depend on each other); raise ``ConfigError``
        naming the first bad one's flag. Runs at construction; call it again after changing
        a field in place."""
        for f in fields(self):
            check = f.metadata.get("check")  # every field has one (tests/test_config.py)
            if check is not None:
                check(flag_of(f), getattr(self, f.name), field=f.name)
        self._check_data_dir()
        if self.momentum is not None and self.update != "momentum":
            raise ConfigError("--momentum", self.momentum, "applies to --update momentum only",
                              field="momentum")
        for name in ("dizo_interval", "dizo_projected"):
            if getattr(self, name) is not None and self.method != "dizo":
                raise ConfigError("--" + name.replace("_", "-"), getattr(self, name),
                                  "applies to --method dizo only", field=name)
        if self.batched_samples and self.perturbation != "virtual":
            raise ConfigError("--batched-samples", True, "rows of one forward see different "
                              "weights, so none may be written: add --perturbation virtual",
                              field="batched_samples")
        from zoengine.run.controls import check_method_flags

        check_method_flags(self)
        return self

    def _check_data_dir(self) -> None:
        """A task read from ``--data-dir`` needs it; ``--data-dir``/``--split-sizes`` apply to
        those tasks only."""
        tasks = _file_tasks()
        if self.task in tasks and self.data_dir is None:
            raise ConfigError("--data-dir", None, f"--task {self.task} reads local files: give "
                              "--data-dir DIR holding train.jsonl and validation.jsonl "
                              "(docs/tasks.md)", field="data_dir")
        for name in ("data_dir", "split_sizes"):
            if getattr(self, name) is not None and self.task not in tasks:
                raise ConfigError("--" + name.replace("_", "-"), getattr(self, name),
                                  f"applies to the tasks read from --data-dir only "
                                  f"({', '.join(tasks)}), not --task {self.task}", field=name)
        for name in ("template", "options"):
            if getattr(self, name) is not None and self.task in tasks:
                raise ConfigError("--" + name, getattr(self, name), f"--task {self.task} uses "
                                  "MeZO's template and verbalizer (docs/tasks.md); this flag "
                                  "is for a classification file", field=name)

    @classmethod
    def unvalidated(cls, **values) -> RunConfig:
        """The flags given beside ``--resume``, not validated: they are merged into the run's
        saved configuration, which is validated then (``zoengine.run.resume``)."""
        self = cls.__new__(cls)
        for f in fields(cls):
            default = f.default_factory() if f.default is MISSING else f.default
            setattr(self, f.name, values.pop(f.name, default))
        if values:
            raise TypeError(f"unknown RunConfig fields {sorted(values)}")
        return self

    def resolved(self, task) -> RunConfig:
        """A copy with every ``None``/``auto`` replaced by the default for ``task``."""
        c = type(self)(**asdict(self))
        if c.train == "auto":
            c.train = "head" if task.kind == "classification" else "lora"
        lr, eps = MODE_DEFAULTS[c.train]
        c.lr = lr if c.lr is None else c.lr
        c.eps = eps if c.eps is None else c.eps
        if c.steps is None:
            c.steps = DEFAULT_STEPS[c.train]
        if c.checkpoint_every is None:
            c.checkpoint_every = DEFAULT_CHECKPOINT_EVERY[c.train]
        if c.eval_every == 0 and c.train == "head":
            c.eval_every = 250
        if c.output_dir is None:
            c.output_dir = os.path.join("outputs", f"{os.path.basename(str(c.task))}-{c.train}"
                                                   f"-{c.method}-s{c.seed}")
        return c


def flag_of(f) -> str:
    """The ``zoengine train`` flag of a ``RunConfig`` field (``batch_size`` -> ``--batch-size``)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def parse_of(cls, f):
    """The flag's type: the field's ``parse``, else the annotation's (``int | None`` -> int)."""
    if "parse" in f.metadata:
        return f.metadata["parse"]
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


__all__ = ["DEFAULT_MODEL", "DTYPES", "MODE_DEFAULTS", "TRAIN_MODES", "ConfigError", "RunConfig",
           "flag_of", "option", "parse_of"]
