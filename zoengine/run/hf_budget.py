"""The forward and time budgets of ``ZOTrainer`` (``ZOTrainingArguments(zo_max_forwards=N,
zo_max_minutes=M)``): the CLI's ``--max-forwards`` / ``--max-minutes`` (docs/cli.md) with the
Trainer's own mechanism, a ``TrainerCallback`` that sets ``control.should_training_stop``.

Every call of a loss closure the ZO optimizer makes is one forward and is counted: the step's
2n, an update rule's extra evaluations (conservative: 3) and DiZO's search batches (``counted``
wraps the step's closure and the search source's closures; a step replayed from the journal
counts its recorded values, as ``zoengine train --resume`` does). The count lives in the ZO
optimizer's state (``state["zo"]["forwards"]``), so each checkpoint's ``optimizer.pt`` holds it
and ``resume_from_checkpoint`` keeps counting from there. After each step the callback asks
``step_forwards`` (the CLI's prediction) whether the next step could pass the budget; if so,
training stops there, with the evaluation and save the Trainer makes at ``max_steps``.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.utils import logging

from zoengine.run.controls import step_forwards

logger = logging.get_logger(__name__)


def zo_optimizer(opt):
    """The ZO optimizer itself (accelerate wraps it: an object holding ``.optimizer``)."""
    while opt is not None and not hasattr(opt, "require_closure") and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def forwards(opt) -> int:
    """The loss evaluations counted so far (0 before the first)."""
    return int(opt.state["zo"].get("forwards", 0))


def add_forwards(trainer, opt, n: int) -> None:
    """Count ``n`` loss evaluations (only when the trainer has a budget)."""
    if ZOBudget.of(trainer) is not None:
        opt.state["zo"]["forwards"] = forwards(opt) + int(n)


def counted(trainer, opt, closure):
    """``closure``, each call counted in the optimizer's state (unchanged without a budget)."""
    if ZOBudget.of(trainer) is None:
        return closure

    def run():
        add_forwards(trainer, opt, 1)
        return closure()

    return run


def blocks_step(trainer, opt) -> bool:
    """True when the next step could pass ``zo_max_forwards`` (``training_step`` then makes no
    forward pass: the Trainer's loop cannot stop before its first step)."""
    budget = ZOBudget.of(trainer)
    return budget is not None and not budget.fits(opt)


def attach(trainer) -> None:
    """Add the budget callback to a trainer whose arguments set a budget."""
    a = trainer.args
    if getattr(a, "zo_max_forwards", None) is not None \
            or getattr(a, "zo_max_minutes", None) is not None:
        trainer.add_callback(ZOBudget(trainer))


class ZOBudget(TrainerCallback):
    """Stops training at ``zo_max_forwards`` / ``zo_max_minutes`` and records why:
    ``trainer.zo_stopped`` (``reason``: ``steps``, ``max_forwards``, ``max_minutes`` or
    ``callback`` (another callback stopped it); ``step``, ``steps``, ``forwards``, ``minutes``)
    and the same dict, its keys prefixed ``zo_stopped_``, in ``trainer.state.log_history``."""

    def __init__(self, trainer):
        self.trainer, self.t0, self.stopped = trainer, time.monotonic(), None

    @staticmethod
    def of(trainer) -> ZOBudget | None:
        handler = getattr(trainer, "callback_handler", None)
        for cb in getattr(handler, "callbacks", ()):
            if isinstance(cb, ZOBudget):
                return cb
        return None

    def fits(self, opt) -> bool:
        """Whether the next step keeps the forwards within ``zo_max_forwards``."""
        budget = self.trainer.args.zo_max_forwards
        return budget is None or forwards(opt) + step_forwards(opt) <= budget

    def minutes(self) -> float:
        return round((time.monotonic() - self.t0) / 60.0, 4)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.t0, self.stopped = time.monotonic(), None  # a resumed run's clock starts again
        opt = zo_optimizer(optimizer)
        opt.state["zo"].setdefault("forwards", 0)  # restored from optimizer.pt on resume
        if not self.fits(opt):  # not even the next step fits (a resumed, spent budget)
            self._stop("max_forwards", args, state, control, opt)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if control.should_training_stop or self.stopped is not None:
            return  # max_steps reached (DefaultFlowCallback), or another callback stopped it
        opt = zo_optimizer(optimizer)
        limit = args.zo_max_minutes
        if limit is not None and time.monotonic() - self.t0 >= limit * 60.0:
            self._stop("max_minutes", args, state, control, opt)
        elif not self.fits(opt):
            self._stop("max_forwards", args, state, control, opt)

    def _stop(self, reason, args, state, control, opt) -> None:
        """Stop as the Trainer does at ``max_steps``: evaluate (step-based strategy) and save
        (``save_strategy="steps"``) at this step, and record why."""
        control.should_training_stop = True
        step = state.global_step
        if (step > 0 and args.eval_strategy == IntervalStrategy.STEPS
                and step % state.eval_steps != 0 and args.eval_delay <= step):
            control.should_evaluate = True
        if step > 0 and args.save_strategy == SaveStrategy.STEPS:
            control.should_save = True
        self._record(reason, state, opt)

    def _record(self, reason, state, opt) -> None:
        self.stopped = {"reason": reason, "step": state.global_step, "steps": state.max_steps,
                        "forwards": forwards(opt), "minutes": self.minutes()}
        self.trainer.zo_stopped = dict(self.stopped)
        if reason != "steps":
            value = getattr(self.trainer.args, "zo_" + reason)
            logger.warning(f"ZOTrainer stopped at step {state.global_step} of {state.max_steps}: "
                  f"zo_{reason}={value} reached ({self.stopped['forwards']} forwards, "
                  f"{self.stopped['minutes']:.2f} min)")
        self.trainer.log({f"zo_stopped_{k}": v for k, v in self.stopped.items()})

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.stopped is None:  # ended at max_steps, or another callback stopped it
            reason = "steps" if state.global_step >= state.max_steps else "callback"
            self._record(reason, state, zo_optimizer(optimizer))
