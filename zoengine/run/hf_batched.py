"""``zo_batched_samples=True`` in ``ZOTrainer``: the step's 2n evaluations as one forward of the
micro-batches repeated 2n times (``opt.step_batched``, docs/lowrank.md "Batched samples"), each
group's loss the causal-LM loss transformers computes for that group's rows alone."""

from __future__ import annotations

from zoengine.optim import group_losses, tile_batch
from zoengine.run.hf_budget import ZOBudget, add_forwards


def batched_closure(trainer, opt, model, micro: list, num_items_in_batch, summed: bool):
    """closure(groups) over the Trainer's micro-batches: per group, the mean of the micro
    losses, or (``summed``: transformers' rule under accumulation) their token sums over
    ``num_items_in_batch``. Refuses what it cannot split by group, naming the field."""
    if trainer.compute_loss_func is not None:
        raise ValueError("zo_batched_samples=True with a compute_loss_func: a custom loss is "
                         "one number for the whole batch, not one per perturbation group; "
                         "leave zo_batched_samples off")
    if any("labels" not in m for m in micro):
        raise ValueError("zo_batched_samples=True needs batches with 'labels' (a causal LM's "
                         "loss is computed per group from the logits)")
    budget = ZOBudget.of(trainer) is not None

    def closure(groups: int):
        if budget:
            add_forwards(trainer, opt, groups)
        total = None
        for m in micro:
            tiled = tile_batch(m, groups)
            labels = tiled.pop("labels")
            with trainer.compute_loss_context_manager():
                logits = model(**tiled).logits
            if logits.dim() != 3:
                raise ValueError(f"zo_batched_samples=True: the model's logits have shape "
                                 f"{tuple(logits.shape)}; batched samples compute a causal "
                                 "LM's loss per group (logits (N, T, vocab)); leave it off "
                                 "for this model")
            part = (group_losses(logits, labels, groups, reduction="sum") / num_items_in_batch
                    if summed else group_losses(logits, labels, groups))
            total = part if total is None else total + part
        return total if summed else total / len(micro)

    return closure
