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

from dataclasses import dataclass, field

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
    max_grad_norm: float = field(default=0.0, metadata={"help": "unused by ZO (no gradients)"})

    def __post_init__(self):
        super().__post_init__()
        from zoengine.optim import available_methods

        if self.zo_method not in available_methods():
            raise ValueError(f"zo_method={self.zo_method!r}: must be one of "
                             f"{available_methods()}")
        if not (isinstance(self.zo_eps, (int, float)) and self.zo_eps > 0):
            raise ValueError(f"zo_eps={self.zo_eps!r}: must be a number > 0")
        if self.gradient_accumulation_steps != 1:
            raise ValueError(f"gradient_accumulation_steps={self.gradient_accumulation_steps}: "
                             "must be 1 for ZO training (raise per_device_train_batch_size "
                             "instead; each ZO step already averages over its batch)")


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
        return _closure_only(create(method, named, lr=lr, eps=eps, seed=seed, **kwargs))


def _unwrap_optimizer(opt):
    """accelerate wraps the optimizer; the ZO step needs the optimizer itself."""
    while type(opt).__name__ == "AcceleratedOptimizer":
        opt = opt.optimizer
    return opt


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
                **(getattr(a, "zo_kwargs", None) or {})})
        elif self.optimizer is not None and not hasattr(self.optimizer, "require_closure"):
            raise TypeError("ZOTrainer needs a zoengine ZO optimizer (closure contract); got "
                            f"{type(self.optimizer).__name__}")
        elif self.optimizer is not None:
            _closure_only(self.optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One ZO step on this batch: loss at θ+εz and θ−εz, in-place update, no backward.

        The model runs in eval mode (dropout off) so both evaluations see the same function.
        """
        opt = _unwrap_optimizer(self.optimizer)
        inputs = self._prepare_inputs(inputs)
        was_training = model.training
        model.eval()

        def closure():
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

        try:
            loss = opt.step(closure)
        finally:
            model.train(was_training)
        return torch.as_tensor(loss).detach().to(self.args.device)
