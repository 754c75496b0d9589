"""Hugging Face Trainer integration: ``ZOTrainer`` and ``ZOTrainingArguments``.

``ZOTrainer`` overrides ``training_step`` only: the Trainer's own loop (data, LR schedulers,
logging, evaluation, checkpoints, ``resume_from_checkpoint``, PEFT models) runs unchanged. Each
training step evaluates the loss at θ+εz and θ−εz through the closure contract of zoengine's
optimizers and updates in place; no gradient is ever formed.

The ZO optimizer is built from the method registry (``zoengine.optim.create``) and stored as
``trainer.optimizer``, so the Trainer saves its ``state_dict()`` (master seed, step counter:
the ZO state) in every checkpoint and restores it on resume, and LR schedulers drive its
``param_groups``. When the loop later calls ``optimizer.step()`` without a closure, that call is a
no-op: the step already happened inside ``training_step``.

Example:
    >>> args = ZOTrainingArguments("out", zo_method="mezo", learning_rate=1e-6, zo_eps=1e-3,
    ...                            max_steps=100, use_cpu=True)
    >>> trainer = ZOTrainer(model=model, args=args, train_dataset=ds)
    >>> trainer.train()
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Trainer, TrainingArguments


@dataclass
class ZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the ZO fields. ``learning_rate`` is the ZO learning rate.

    Gradient clipping is off by default (``max_grad_norm=0``): there are no gradients.
    """

    zo_method: str = field(default="mezo", metadata={"help": "method from zoengine's registry"})
    zo_eps: float = field(default=1e-3, metadata={"help": "perturbation scale ε"})
    zo_seed: int | None = field(default=None,
                                metadata={"help": "master seed of the noise (default: seed)"})
    zo_kwargs: dict | None = field(default=None,
                                   metadata={"help": "extra keyword arguments for the method"})
    zo_perturbation: str = field(default="inplace", metadata={
        "help": "'inplace' or 'virtual' (θ never written during the two evaluations; "
                "docs/virtual.md)"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "unused by ZO (no gradients)"})
    zo_journal: bool = field(default=False, metadata={
        "help": "journal every ZO step into <output_dir>/zo_journal.zoj; a resumed run then "
                "replays the steps after its checkpoint without forward passes"})

    def __post_init__(self):
        super().__post_init__()
        from zoengine.optim import available_methods

        if self.zo_method not in available_methods():
            raise ValueError(f"zo_method={self.zo_method!r}: must be one of "
                             f"{available_methods()}")
        if self.zo_perturbation not in ("inplace", "virtual"):
            raise ValueError(f"zo_perturbation={self.zo_perturbation!r}: must be 'inplace' or "
                             "'virtual'")
        if not (isinstance(self.zo_eps, (int, float)) and self.zo_eps > 0):
            raise ValueError(f"zo_eps={self.zo_eps!r}: must be a number > 0")


def _closure_only(opt):
    """Make ``opt.step()`` without a closure a no-op (the Trainer loop's call); with a closure
    it steps as usual. Patched on the instance so the class and its hooks stay untouched."""
    real_step = opt.step

    def step(closure=None):
        if closure is None:
            return None
        return real_step(closure)

    opt.step = step
    return opt


def _process_group_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ZOOptimizerFactory:
    """Builds the registered ZO optimizer over the model's trainable, named parameters.

    transformers treats a non-``Optimizer`` entry of ``optimizer_cls_and_kwargs`` as a factory:
    ``ZOOptimizerFactory()(model, **kwargs)``. Names make the noise keys independent of
    parameter order; frozen tensors (PEFT's base weights) are left out.
    """

    def __call__(self, model, *, method: str, lr: float, eps: float, seed: int,
                 weight_decay: float = 0.0, **kwargs):
        from zoengine.optim import create

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters (every tensor has requires_grad=False)")
        if weight_decay:
            kwargs["weight_decay"] = weight_decay
        if kwargs.get("perturbation") == "virtual":
            kwargs.setdefault("model", model)  # its modules substitute θ + c·z
        if "distributed" not in kwargs and _process_group_world() > 1:
            kwargs["distributed"] = True  # reduce the loss scalars across the launcher's ranks
        return _closure_only(create(method, named, lr=lr, eps=eps, seed=seed, **kwargs))


def _unwrap_optimizer(opt):
    """accelerate wraps the optimizer (an Optimizer holding ``.optimizer``); the ZO step needs
    the ZO optimizer itself (the one with the closure contract)."""
    while (not hasattr(opt, "require_closure")
           and isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer)):
        opt = opt.optimizer
    return opt


def check_distributed(opt) -> None:
    """Refuse a ZO optimizer that would let each rank of a launcher (torchrun, accelerate
    launch) apply its own loss difference: the replicas would drift apart without an error."""
    from zoengine.distributed import launcher_world_size

    world = launcher_world_size()
    if world > 1 and getattr(opt, "distributed", None) is None:
        raise RuntimeError(
            f"ZOTrainer runs on {world} processes (WORLD_SIZE={world}) but the ZO optimizer "
            f"{type(opt).__name__} has distributed=None: each rank would apply its own, "
            "unreduced loss difference and the replicas would drift apart. Build it with "
            "distributed=True (ZOTrainingArguments(zo_kwargs={'distributed': True}) does; the "
            "default optimizer gets it automatically) or run a single process")


def check_resumed_state(opt, global_step: int) -> None:
    """Refuse a resumed run whose ZO optimizer is still at step 0.

    The Trainer restores ``trainer_state.json`` (global step) but silently skips a missing
    ``optimizer.pt`` (or ``scheduler.pt``): the ZO state would restart at step 0 and reuse the
    noise of steps 0, 1, ... (DiZO's anchors and PeZO's pool pointer would be lost too)."""
    step = getattr(opt, "step_count", None)
    if global_step > 0 and step == 0:
        raise RuntimeError(
            f"resuming at global step {global_step}, but the ZO optimizer is at step 0: the "
            "checkpoint's optimizer.pt (and scheduler.pt) were not restored (missing, or saved "
            "with save_only_model=True). Its ZO state (seed, step counter, DiZO anchors, PeZO "
            "pool pointer) is lost, and continuing would reuse the noise of the first steps. "
            "Resume from a checkpoint that has optimizer.pt and scheduler.pt, or start a new "
            "run from these weights (train() without resume_from_checkpoint)")


class SearchBatches:
    """DiZO's search data for ``ZOTrainer``: each call returns a loss closure on a fresh batch
    of the training set (``train_dataset``, the Trainer's collator, its unused columns removed,
    the training batch size).

    The Trainer's own dataloader is not touched, so the training batches are the same with
    and without projections. For a dataset with a length, the rows of a search batch are a
    function of (ZO seed, ZO step, iteration), so a resumed run draws the same search batches
    as an uninterrupted one; an iterable dataset is read by a separate plain DataLoader
    (restarted when exhausted; not reproduced on resume).
    """

    def __init__(self, trainer, opt):
        ds, collate = trainer.train_dataset, trainer.data_collator
        if ds is None:
            raise ValueError("DiZO's projection search needs train_dataset (or pass "
                             "projection_closure in zo_kwargs)")
        try:
            import datasets

            is_hf = isinstance(ds, datasets.Dataset)
        except ImportError:
            is_hf = False
        if is_hf:
            ds = trainer._remove_unused_columns(ds, description="DiZO search")
        else:
            collate = trainer._get_collator_with_removed_columns(collate, "DiZO search")
        self.trainer, self.opt, self.ds, self.collate = trainer, opt, ds, collate
        self.batch_size = trainer._train_batch_size
        self.model = trainer.model
        self.sized = not isinstance(ds, torch.utils.data.IterableDataset) and hasattr(ds, "__len__")
        if self.sized and len(ds) == 0:
            raise ValueError("train_dataset is empty: DiZO's projection search has no data")
        self._at = (-1, 0)  # (ZO step, search batches drawn at that step)
        self._it = None

    def _batch(self):
        zo = self.opt.state["zo"]
        m = self._at[1] if self._at[0] == zo["step"] else 0
        self._at = (zo["step"], m + 1)
        rng = np.random.default_rng([zo["seed"], zo["step"], m, 0xD120])
        # a collator that draws random numbers (e.g. masking) gets its own seeded stream, so
        # the global torch RNG, and with it the training batches, is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(1 << 62)))
            if self.sized:
                n = len(self.ds)
                rows = rng.choice(n, size=self.batch_size, replace=n < self.batch_size)
                return self.collate([self.ds[int(i)] for i in rows])
            for _ in range(2):
                if self._it is None:
                    self._it = iter(torch.utils.data.DataLoader(
                        self.ds, batch_size=self.batch_size, collate_fn=self.collate))
                try:
                    return next(self._it)
                except StopIteration:
                    self._it = None
        raise ValueError("train_dataset yields no batch: DiZO's projection search has no data")

    def __call__(self):
        trainer, model = self.trainer, self.model
        inputs = trainer._prepare_inputs(self._batch())

        def closure():
            with trainer.compute_loss_context_manager():
                return trainer.compute_loss(model, dict(inputs))

        return closure


def accumulate(trainer, inputs) -> list | None:
    """Gradient accumulation, scalar-only: the micro-batches of one optimizer step are kept
    (their inputs, not any gradient) until the last arrives; then the step's closure evaluates
    all of them at θ+εz and at θ−εz and returns their combined loss. Returns the list at the
    last micro-batch, None before it."""
    k = int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1)
    held = getattr(trainer, "_zo_micro", [])
    held.append(inputs)
    if len(held) < k:
        trainer._zo_micro = held
        return None
    trainer._zo_micro = []
    return held


def journal_or_replay(trainer, opt) -> torch.Tensor | None:
    """With ``zo_journal``: open the journal once (a fresh run starts a new one; a resumed
    run queues the records after its checkpoint), then replay a queued record instead of
    computing this step (no forward pass: the loss values come from the journal)."""
    from zoengine.journal import apply_record, read_records

    if not hasattr(trainer, "_zo_queue"):
        path = os.path.join(trainer.args.output_dir, "zo_journal.zoj")
        trainer._zo_queue = []
        if os.path.exists(path) and opt.state["zo"]["step"] == 0:
            os.remove(path)  # a previous run's journal in this folder
        elif os.path.exists(path):
            _, records, _ = read_records(path)
            trainer._zo_queue = [r for r in records if r.step >= opt.state["zo"]["step"]]
        opt.set_journal(path)
    if not trainer._zo_queue:
        return None
    record = trainer._zo_queue.pop(0)
    apply_record(opt, record, path="zo_journal.zoj")
    return torch.tensor(record.step_loss(opt.n_samples)).to(trainer.args.device)


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a zeroth-order method (forward passes only).

    Use ``ZOTrainingArguments``; with plain ``TrainingArguments`` the defaults are MeZO,
    ε=1e-3 and the Trainer's ``seed``. Pass ``optimizers=(zo_optimizer, scheduler)`` to bring
    your own ZO optimizer (it must follow zoengine's closure contract).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            zo_seed = getattr(a, "zo_seed", None)
            self.optimizer_cls_and_kwargs = (ZOOptimizerFactory, {
                "method": getattr(a, "zo_method", "mezo"), "lr": a.learning_rate,
                "weight_decay": a.weight_decay,
                "eps": getattr(a, "zo_eps", 1e-3),
                "seed": a.seed if zo_seed is None else zo_seed,
                **({"perturbation": "virtual"}
                   if getattr(a, "zo_perturbation", "inplace") == "virtual" else {}),
                **(getattr(a, "zo_kwargs", None) or {})})
        elif self.optimizer is not None and not hasattr(self.optimizer, "require_closure"):
            raise TypeError("ZOTrainer needs a zoengine ZO optimizer (closure contract); got "
                            f"{type(self.optimizer).__name__}")
        elif self.optimizer is not None:
            _closure_only(self.optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One ZO step on this batch: loss at θ+εz and θ−εz, in-place update, no backward.

        The model runs in eval mode (dropout off) so both evaluations see the same function.
        At a resumed run's first step, an optimizer still at step 0 (no ``optimizer.pt`` was
        restored) is refused. DiZO without ``projection_closure`` gets one that draws its
        search batches from the training set (``SearchBatches``).
        """
        micro = accumulate(self, self._prepare_inputs(inputs))
        if micro is None:  # an earlier micro-batch of the step: kept, evaluated at the last
            return torch.zeros((), device=self.args.device)
        opt = _unwrap_optimizer(self.optimizer)
        check_distributed(opt)
        check_resumed_state(opt, self.state.global_step)
        if getattr(self.args, "zo_journal", False):
            replayed = journal_or_replay(self, opt)
            if replayed is not None:
                return replayed
        if getattr(opt, "projection_closure", False) is None:  # DiZO without its own data
            opt.projection_closure = SearchBatches(self, opt)
        if isinstance(getattr(opt, "projection_closure", None), SearchBatches):
            opt.projection_closure.model = model
        was_training = model.training
        model.eval()
        # normalised by the step's token count already (HF's rule): the micro losses add up
        summed = (getattr(self, "model_accepts_loss_kwargs", False)
                  and num_items_in_batch is not None) or self.compute_loss_func is not None

        def closure():
            with self.compute_loss_context_manager():
                losses = [self.compute_loss(model, m, num_items_in_batch=num_items_in_batch)
                          for m in micro]
            total = sum(losses[1:], losses[0])
            return total if summed else total / len(losses)

        try:
            loss = opt.step(closure)
        finally:
            model.train(was_training)
        return torch.as_tensor(loss).detach().to(self.args.device)
