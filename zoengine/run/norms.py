"""``--train norms``: ZO on the normalisation gains only (docs/design.md, "A trainable set
chosen for ZO"); the gains cannot refill a pruned zero, so no mask is needed."""

from __future__ import annotations

from zoengine.tasks import TaskError


def norms_for_run(model) -> None:
    """``--train norms``: freeze all but the normalisation gains (no pruned weight moves)."""
    from zoengine.sparsity.norms import train_norms_only

    try:
        train_norms_only(model)
    except ValueError as exc:
        raise TaskError("--train", str(exc)) from None
