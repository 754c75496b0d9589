"""Recovery through the normalisation layers only: the trainable set of ``--train norms``.

A pruned model's weights keep their zeros whatever happens to its normalisation gains (pruning
touches the ``nn.Linear`` weights, never a norm), so training only the gains (and biases) of
the RMSNorm/LayerNorm modules preserves every pattern, unstructured or N:M, by construction.
For zeroth-order training this set is also the cheap one: SmolLM2-135M has 35,136 norm
parameters against 134.5M in all, so a step draws ~3,800x fewer random numbers (a MeZO step
at batch 4 x 64 on one thread: 2.0 s instead of 8.3 s) and the estimator's variance, which
grows with the number of perturbed coordinates, allows a ~3x larger lr (1e-4 against full
fine-tuning's 3e-5; 1e-3 diverged). On Wanda-50 % SmolLM2 it closed 23 % of the perplexity
gap in 240 s of one core, where full MeZO closed 7 % (docs/sparsity.md).
"""

from __future__ import annotations

from torch import nn

# torch's own norm layers; model-specific ones (LlamaRMSNorm, Qwen2RMSNorm, T5LayerNorm, ...)
# are recognised by their class name
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """True for a normalisation layer: a torch norm, or a class whose name ends in ``Norm``."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm")


def norm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every normalisation layer's own gain and bias, in model order.

    Raises ``ValueError`` when ``model`` has none (nothing for ``--train norms`` to train)."""
    found = [(f"{mod_name}.{p_name}" if mod_name else p_name, p)
             for mod_name, mod in model.named_modules() if is_norm(mod)
             for p_name, p in mod.named_parameters(recurse=False)]
    if not found:
        raise ValueError(f"model {type(model).__name__} has no normalisation layer with "
                         "parameters (LayerNorm/RMSNorm): nothing for train='norms' to train")
    return found


def train_norms_only(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Freeze every parameter of ``model`` except the normalisation layers' (returned).

    What ``zoengine train --train norms`` does after loading; for the API, pass the returned
    list (or ``model`` itself, whose ``requires_grad`` now selects it) to an optimizer or
    ``ZOTrainer``. The pruned zeros stay exact because no prunable weight is trained."""
    chosen = norm_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in chosen:
        p.requires_grad_(True)
    return chosen
