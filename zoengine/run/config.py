"""``RunConfig``: everything a ``zoengine train`` run needs, and the per-mode defaults."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

DEFAULT_MODEL = "smollm2-135m"
# per trainable set: (lr, eps) defaults, from research/feasibility.md §2-4 and our runs
# norms: 1e-4 closed 23 % of Wanda-50 % SmolLM2's gap in 116 steps, 3e-5 12 %, 1e-3 diverged
MODE_DEFAULTS = {"head": (1e-4, 1e-3), "full": (1e-5, 1e-3), "lora": (1e-3, 1e-2),
                 "norms": (1e-4, 1e-3)}
DEFAULT_STEPS = {"head": 8000, "full": 60, "lora": 100, "norms": 300}
# a checkpoint costs a save of the trained tensors: ~ms for the head, ~1 s for SmolLM2 in full
# (0.5 GB hashed and written), so full checkpoints every 10 steps (~1 min of steps on a CPU)
DEFAULT_CHECKPOINT_EVERY = {"head": 1000, "full": 10, "lora": 50, "norms": 100}
TRAIN_MODES = ("auto", "head", "full", "lora", "norms")


@dataclass
class RunConfig:
    """Everything a run needs; ``zoengine train`` flags and ``--config`` keys have these names."""

    model: str = DEFAULT_MODEL
    task: str = "sentiment"
    method: str = "mezo"
    train: str = "auto"  # auto | head | full | lora | norms  (auto: head for classification,
    # lora for LM; norms: only the normalisation gains, zoengine.sparsity.norms)
    steps: int | None = None  # default per mode: DEFAULT_STEPS
    batch_size: int = 16
    lr: float | None = None  # default per mode (MODE_DEFAULTS)
    eps: float | None = None
    seed: int = 0
    output_dir: str | None = None  # default outputs/<task>-<train>-<method>-s<seed>
    train_examples: int = 512  # head mode: balanced training tweets whose features are cached
    eval_limit: int = 0  # score only the first N dev and test rows (0: all; for quick checks)
    eval_every: int = 0  # dev evaluation every N steps (0: head mode 250, others before/after only)
    max_length: int = 128
    eval_batch_size: int = 16
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    template: str | None = None
    options: list | None = None
    text_column: str = "text"
    label_column: str = "label"
    block_size: int = 128
    threads: int | None = None  # None: torch's default, fewer if other processes keep cores busy
    progress: bool = True
    prune: str | None = None  # METHOD[:PATTERN]: prune before training, keep the zeros
    prune_sparsity: float | None = None
    keep_zeros: bool | None = None  # the model is already pruned: masks="zeros"
    max_memory: str | None = None  # plan batch/sequence/dtype to fit, refuse if nothing fits
    dizo_interval: int | None = None  # DiZO: steps between projections (None: the method's 50)
    checkpoint_every: int | None = None  # steps between checkpoints (None: per mode, 0: never)
    checkpoint_minutes: float = 10.0  # also checkpoint after this many minutes (0: never)
    journal_fsync: str = "100"  # journal durability: "step", "checkpoint" or every K steps
    perturbation: str = "inplace"  # or "virtual": θ never written during the evaluations
    replica_check_every: int = 100  # torchrun: steps between replica checksums (0: never)
    lora_scaling: str = "lora"  # "rslora": alpha / sqrt(r) (PEFT's rank-stabilised scaling)
    objective: str = "lm"  # LM tasks: "lm", "kd" (distil the dense model) or "kd+lm"
    kd_weight: float = 0.5  # "kd+lm": weight of the KD term
    kd_top_k: int = 64  # teacher logits kept per position
    kd_blocks: int = 256  # training blocks the teacher cache covers (KD trains on these)
    dtype: str = "float32"  # load and train in this dtype (--max-memory may narrow it)

    def resolved(self, task) -> RunConfig:
        """A copy with every ``None``/``auto`` replaced by the default for ``task``."""
        c = RunConfig(**asdict(self))
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
