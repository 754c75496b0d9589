"""The strategy of a suite task (MeZO's prompt-based tasks read from ``--data-dir``,
docs/tasks.md): full or LoRA (or norms) training with the loss MeZO trains the task with, and
the task's own metric (accuracy, or F1 for SQuAD and DROP) on the dev and test samples."""

from __future__ import annotations

from zoengine.run.objectives import NONDIFF, suite_closure
from zoengine.tasks import TaskError
from zoengine.tasks.suite import measure, predict, training_loss


class SuiteStrategy:
    """ZO on every parameter (full), LoRA adapters or the norms, on a ``SuiteTask``: batches
    of ``--batch-size`` distinct training rows; ``--eval-limit`` N scores the first N dev and
    test rows. It answers ``zoengine.run.strategies.Strategy``'s questions (it does not import
    that module, which builds it: no import cycle)."""

    ema = 0.9

    def __init__(self, cfg, task, model, tok, log=print):
        if cfg.train == "head":
            raise TaskError("--train", f"head trains the options of one template over cached "
                                       f"features; --task {task.name} trains full, lora or "
                                       "norms")
        self.name, self.model, self.tok, self.cfg = cfg.train, model, tok, cfg
        self.spec = task.spec
        self.train = task.splits["train"]
        n = cfg.eval_limit or None
        self.dev, self.test = task.splits["dev"][:n], task.splits["test"][:n]
        self.timing = {}
        log(f"{task.name}: {len(self.train)} training, {len(self.dev)} dev, {len(self.test)} "
            f"test rows (MeZO's sampling, seed {cfg.seed}); metric {self.spec.metric}")

    def named_params(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def batch_closure(self, rng):
        k = min(self.cfg.batch_size, len(self.train))
        batch = [self.train[int(i)] for i in rng.choice(len(self.train), k, replace=False)]
        if self.cfg.objective in NONDIFF:  # minus the batch's accuracy or F1 (MeZO's)
            return suite_closure(self.cfg, self.model, self.tok, self.spec, batch)
        return lambda: training_loss(self.model, self.tok, self.spec, batch,
                                     self.cfg.max_length)

    def _measure(self, samples) -> dict:
        preds = predict(self.model, self.tok, self.spec, samples,
                        max_length=self.cfg.max_length, batch_size=self.cfg.eval_batch_size)
        return measure(self.spec, samples, preds)

    def evaluate(self):
        return {"dev": self._measure(self.dev), "test": self._measure(self.test)}

    def dev_point(self):
        m = self._measure(self.dev)
        return {f"dev_{m['metric']}": m[m["metric"]]}

    def trained(self):
        return self.model
