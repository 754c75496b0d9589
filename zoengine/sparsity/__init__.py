"""Sparsity: keep-masks of pruned models, the pruners that make them, and the memory planner.

The optimizers only ever see ``masks=`` (a dict name -> bool keep-mask, or ``"zeros"``) and keep
it as bits (``zoengine.optim.masks``); this package makes and inspects those masks and plans a
run's memory. It sits above ``zoengine.optim`` and below ``zoengine.run``.
"""

from zoengine.sparsity.masks import (
    PATTERNS,
    apply_masks,
    mask_memory,
    masks_from_prune,
    masks_from_zeros,
    nm_ok,
    parse_pattern,
    prunable_layers,
    remove_prune_reparam,
    sparsity_report,
)
from zoengine.sparsity.norms import norm_parameters, train_norms_only
from zoengine.sparsity.pruners import (
    GROUPS,
    METHODS,
    input_norms,
    keep_mask,
    parse_prune_spec,
    prune,
)
from zoengine.sparsity.structured import (
    STRUCTURES,
    heads_sparsities,
    prune_structured,
)

__all__ = ["GROUPS", "METHODS", "PATTERNS", "apply_masks", "input_norms", "keep_mask",
           "mask_memory", "masks_from_prune", "masks_from_zeros", "nm_ok", "parse_pattern",
           "parse_prune_spec",
           "prunable_layers", "prune", "remove_prune_reparam", "sparsity_report"]
__all__ += ["STRUCTURES", "heads_sparsities", "prune_structured"]
__all__ += ["norm_parameters", "train_norms_only"]
