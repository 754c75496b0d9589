"""Hugging Face Trainer integration: ``ZOTrainer`` and ``ZOTrainingArguments``.

``ZOTrainer`` overrides ``training_step`` (and ``log``, for what is logged): the Trainer's own
loop (data, LR schedulers, logging, evaluation, checkpoints, ``resume_from_checkpoint``, PEFT
models) runs unchanged. Each training step evaluates the loss at θ+εz and θ−εz through the
closure contract of zoengine's optimizers and updates in place; no gradient is ever formed, so
the training logs carry the projected gradient (``projected_grad``, ``projected_grad_rms``)
instead of the Trainer's ``grad_norm`` (``ProjectedGradLog``).

The ZO optimizer is built from the method registry (``zoengine.optim.create``) and stored as
``trainer.optimizer``: the Trainer saves its ``state_dict()`` (the ZO state) in checkpoints and
restores it on resume, LR schedulers drive its ``param_groups``, and the loop's own
``optimizer.step()`` without a closure is a no-op (the step happened in ``training_step``).

Example:
    >>> args = ZOTrainingArguments("out", zo_method="mezo", learning_rate=1e-6, zo_eps=1e-3,
    ...                            max_steps=100, use_cpu=True)
    >>> trainer = ZOTrainer(model=model, args=args, train_dataset=ds)
    >>> trainer.train()
"""

from __future__ import annotations

import functools
import math
import os
import sys

import numpy as np
import torch

from zoengine.optim.batches import search_rng

try:
    from transformers import Trainer, TrainingArguments
except ImportError:  # transformers' Trainer needs accelerate: zoengine's `hf` extra
    from zoengine.extras import require

    require("accelerate", "hf", "zoengine.hf (ZOTrainer, built on transformers' Trainer)")
    raise

from zoengine.run.hf_args import ZOTrainingArguments, zo_factory_kwargs  # noqa: E402,F401
from zoengine.run.hf_batched import batched_closure  # noqa: E402
from zoengine.run.hf_budget import add_forwards, attach, blocks_step, counted  # noqa: E402


def _closure_only(opt):
    """Make ``opt.step()`` without a closure a no-op (the Trainer loop's call); with a closure
    it steps as usual. Patched on the instance so the class and its hooks stay untouched."""
    real_step = opt.step

    def step(closure=None):
        return None if closure is None else real_step(closure)

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
                 weight_decay: float = 0.0, perturbation: str = "inplace", **kwargs):
        from zoengine.optim import create
        from zoengine.optim.virtual import check_perturbation

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters (every tensor has requires_grad=False)")
        if weight_decay:
            kwargs["weight_decay"] = weight_decay
        check_perturbation(perturbation, model if perturbation == "virtual" else None)
        distributed = kwargs.pop("distributed", _process_group_world() > 1 or None)  # reduce
        opt = create(method, named, lr=lr, eps=eps, seed=seed, **kwargs)
        if distributed is not None:  # engine features, in the constructor's old order
            opt.set_distributed(distributed)
        if perturbation == "virtual":
            opt.attach_virtual(model)  # its modules substitute θ + c·z
        return _closure_only(opt)


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
            "unreduced loss difference and the replicas would drift apart. Call "
            "opt.set_distributed(True) on it (ZOTrainingArguments(zo_kwargs={'distributed': "
            "True}) does; the default optimizer gets it automatically) or run a single process")


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
    """``ZOTrainer``'s batch source (``set_batch_source``; DiZO's search): ``source(step, k)``
    is a loss closure on ``train_dataset`` rows from ``search_rng(seed, step, k)`` (the CLI's
    seeding: resume-exact; an iterable dataset: a plain DataLoader, not reproduced on resume),
    with the Trainer's collator and batch size; the training batches are untouched."""

    def __init__(self, trainer, opt):
        self.trainer, self.opt, self.model, self._it = trainer, opt, trainer.model, None

    @functools.cached_property
    def data(self) -> tuple:
        """(dataset, collator, sized), prepared at the first search."""
        trainer, ds, collate = self.trainer, self.trainer.train_dataset, self.trainer.data_collator
        if ds is None:
            raise ValueError("DiZO's projection search needs train_dataset (or pass "
                             "projection_closure in zo_kwargs)")
        datasets = sys.modules.get("datasets")  # a datasets.Dataset was built by it, imported
        if datasets is not None and isinstance(ds, datasets.Dataset):  # as the Trainer does
            ds = trainer._remove_unused_columns(ds, description="DiZO search")
        else:
            collate = trainer._get_collator_with_removed_columns(collate, "DiZO search")
        sized = not isinstance(ds, torch.utils.data.IterableDataset) and hasattr(ds, "__len__")
        if sized and len(ds) == 0:
            raise ValueError("train_dataset is empty: DiZO's projection search has no data")
        return ds, collate, sized

    def batch(self, seed: int, step: int, k: int):
        (ds, collate, sized), rng = self.data, search_rng(seed, step, k)
        size = self.trainer._train_batch_size
        # a collator that draws random numbers (e.g. masking) gets its own seeded stream, so
        # the global torch RNG, and with it the training batches, is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.randint(0, 1 << 62, dtype=np.int64)))
            if sized:
                rows = rng.choice(len(ds), size=size, replace=len(ds) < size)
                return collate([ds[int(i)] for i in rows])
            for _ in range(2):
                self._it = self._it or iter(torch.utils.data.DataLoader(
                    ds, batch_size=size, collate_fn=collate))
                try:
                    return next(self._it)
                except StopIteration:
                    self._it = None
        raise ValueError("train_dataset yields no batch: DiZO's projection search has no data")

    def __call__(self, step: int, k: int):
        trainer, model = self.trainer, self.model
        inputs = trainer._prepare_inputs(self.batch(self.opt.state["zo"]["seed"], step, k))

        def closure():
            with trainer.compute_loss_context_manager():
                return trainer.compute_loss(model, dict(inputs))
        return counted(trainer, self.opt, closure)  # a budget counts the search's forwards


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
    add_forwards(trainer, opt, len(record.values))  # as the run counted them (a budget)
    return torch.tensor(record.step_loss(opt.n_samples)).to(trainer.args.device)


class ProjectedGradLog:
    """What ZO measures in place of a gradient norm, kept between two training logs.

    Each step's projected gradients g_k = (ℓ(θ+εz_k) − ℓ(θ−εz_k))/(2ε) (the optimizer's
    ``state["zo"]["projected_grads"]``; a skipped step adds nothing). A training log gets
    ``projected_grad``: the last step's g (mean over its n samples; signed, like the step it
    drove) and ``projected_grad_rms``: the root mean square of every g_k since the previous
    log. For MeZO's unit-variance noise E[g²] ≈ ‖∇ℓ‖² (g ≈ zᵀ∇ℓ), so the RMS estimates the norm
    of the batch gradient of the trained tensors, the quantity the Trainer's ``grad_norm``
    would be. Running sums only: nothing grows with the step count.
    """

    def __init__(self):
        self.count, self.sumsq, self.last = 0, 0.0, None

    @staticmethod
    def of(trainer) -> ProjectedGradLog:
        if not isinstance(getattr(trainer, "_zo_grad_log", None), ProjectedGradLog):
            trainer._zo_grad_log = ProjectedGradLog()
        return trainer._zo_grad_log

    @staticmethod
    def _zo(opt) -> dict | None:
        state = getattr(opt, "state", None)
        zo = state.get("zo") if isinstance(state, dict) else None
        return zo if isinstance(zo, dict) else None

    @classmethod
    def mark(cls, opt) -> tuple | None:
        """The optimizer's (step, skipped steps) before a step, for ``note``."""
        zo = cls._zo(opt)
        return None if zo is None else (zo.get("step"), zo.get("skipped_steps"))

    def note(self, opt, mark: tuple | None) -> None:
        """Keep the g_k of the step taken since ``mark`` (none if no step or a skipped one)."""
        zo = self._zo(opt)
        if zo is None or mark is None or zo.get("step") == mark[0] \
                or zo.get("skipped_steps") != mark[1]:
            return
        g = [float(v) for v in zo.get("projected_grads") or []]
        if g:
            self.count += len(g)
            self.sumsq += sum(v * v for v in g)
            self.last = sum(g) / len(g)

    def pop(self) -> dict:
        """The log entries of the steps since the previous call ({} if none), and reset."""
        if not self.count:
            return {}
        out = {"projected_grad": self.last,
               "projected_grad_rms": math.sqrt(self.sumsq / self.count)}
        self.__init__()
        return out


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
                **({"update": a.zo_update} if getattr(a, "zo_update", None) else {}),
                **zo_factory_kwargs(a), **(getattr(a, "zo_kwargs", None) or {})})
        elif self.optimizer is not None and not hasattr(self.optimizer, "require_closure"):
            raise TypeError("ZOTrainer needs a zoengine ZO optimizer (closure contract); got "
                            f"{type(self.optimizer).__name__}")
        elif self.optimizer is not None:
            _closure_only(self.optimizer)
        attach(self)  # zo_max_forwards / zo_max_minutes: a callback (zoengine.run.hf_budget)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One ZO step on this batch: loss at θ+εz and θ−εz, in-place update, no backward.

        The model runs in eval mode (dropout off) so both evaluations see the same function.
        At a resumed run's first step, an optimizer still at step 0 (no ``optimizer.pt`` was
        restored) is refused. The optimizer's batch source (``set_batch_source``; DiZO's
        search) draws from the training set (``SearchBatches``) unless it has its own.
        """
        micro = accumulate(self, self._prepare_inputs(inputs))
        if micro is None:  # an earlier micro-batch of the step: kept, evaluated at the last
            return torch.zeros((), device=self.args.device)
        opt = _unwrap_optimizer(self.optimizer)
        check_distributed(opt)
        check_resumed_state(opt, self.state.global_step)
        if blocks_step(self, opt):  # a spent zo_max_forwards: no forward pass
            return torch.zeros((), device=self.args.device)
        grad_log, mark = ProjectedGradLog.of(self), ProjectedGradLog.mark(opt)
        if getattr(self.args, "zo_journal", False):
            replayed = journal_or_replay(self, opt)
            if replayed is not None:
                grad_log.note(opt, mark)
                return replayed
        # the declared hook (a no-op for methods without batches of their own): DiZO's search
        # draws from the training set, unless the optimizer has its own source
        search = self.__dict__.setdefault("_zo_search", SearchBatches(self, opt))
        search.model = model
        opt.set_batch_source(search, replace=False)
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
            loss = (opt.step_batched(batched_closure(self, opt, model, micro,
                                                     num_items_in_batch, summed))
                    if getattr(self.args, "zo_batched_samples", False)
                    else opt.step(counted(self, opt, closure)))
        finally:
            model.train(was_training)
        grad_log.note(opt, mark)
        return torch.as_tensor(loss).detach().to(self.args.device)

    def log(self, logs, *args, **kwargs):
        """The Trainer's ``log``, with what ZO measures: a training log (the one with ``loss``)
        loses ``grad_norm`` (the norm of gradients ZO never forms: always 0) and gets
        ``projected_grad`` and ``projected_grad_rms`` after ``loss`` (``ProjectedGradLog``)."""
        if "loss" in logs:
            zo, out = ProjectedGradLog.of(self).pop(), {}
            for k, v in logs.items():
                if k != "grad_norm":
                    out[k] = v
                if k == "loss":
                    out.update(zo)
            logs = out
        return super().log(logs, *args, **kwargs)
