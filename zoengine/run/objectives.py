"""``--objective accuracy | f1``: MeZO's non-differentiable objectives (docs/tasks.md).

The loss closure returns minus the metric of the step's batch: minus the share of its rows the
model answers correctly (``accuracy``: the argmax option or candidate, scored as in evaluation),
or minus the mean F1 of its greedy answers against the references (``f1``), as MeZO's
``zo_forward_nondiff`` (SQuAD, F1) and its medium models' ``--optimize_acc`` do. No target is
teacher-forced; the two perturbed evaluations differ only when ε moves some prediction.
"""

from __future__ import annotations

import torch

from zoengine.tasks import TaskError

NONDIFF = ("accuracy", "f1")


def allowed_objectives(task) -> tuple[str, ...]:
    """The ``--objective`` values ``task`` can train with."""
    if task.kind == "lm":
        return ("lm", "kd", "kd+lm")
    if task.kind == "suite":
        spec = task.spec
        out = ("lm", "accuracy") if spec.kind != "generation" else ("lm",)
        if spec.metric == "f1" or "f1" in spec.extra_metrics:
            out += ("f1",)
        return out
    return ("lm", "accuracy")  # a classification task


def check_nondiff(cfg, task) -> None:
    """Refuse ``--objective accuracy``/``f1`` where the task has no such metric per batch,
    naming the flag, the value and what this task allows (``kd`` is checked by run/kd.py)."""
    if cfg.objective not in NONDIFF:
        return
    allowed = allowed_objectives(task)
    if cfg.objective not in allowed:
        name = getattr(task, "name", cfg.task)
        raise TaskError("--objective", f"{cfg.objective!r}: --task {name} has no "
                                       f"{cfg.objective} per batch; allowed for it: "
                                       f"{', '.join(allowed)}")


def minus(value: float) -> torch.Tensor:
    """The closure's value: minus the batch's metric, as float32 (MeZO's)."""
    return torch.tensor(-float(value), dtype=torch.float32)


def minus_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the share of rows whose highest-scoring option is the label (the first on a
    tie, as evaluation's argmax)."""
    return minus((scores.argmax(dim=-1) == labels).float().mean())


def suite_closure(cfg, model, tok, spec, batch):
    """The closure of a suite task's batch under ``--objective accuracy | f1``: the batch is
    scored as evaluation scores it (``predict``: candidates' log-likelihoods, or greedy
    answers), then measured (``measure``)."""
    from zoengine.tasks.suite import measure, predict

    def closure():
        preds = predict(model, tok, spec, batch, max_length=cfg.max_length,
                        batch_size=len(batch))
        return minus(measure(spec, batch, preds)[cfg.objective])

    return closure
