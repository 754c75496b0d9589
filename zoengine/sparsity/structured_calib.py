"""Calibration for structured pruning: one stopped pass captures every decoder block's inputs,
then each block runs on its own (zoengine.sparsity.structured, ``sequential=True``)."""

from __future__ import annotations

import torch


class _StopForward(Exception):
    pass


def _call_model(model, item) -> None:
    """One calibration item through ``model`` without a KV cache (see ``input_norms``)."""
    if isinstance(item, torch.Tensor):
        model(input_ids=item, use_cache=False)
    elif isinstance(item, dict):
        model(**{**item, "use_cache": False})
    elif callable(item):
        item(model)
    else:
        raise ValueError(f"calib item of type {type(item).__name__}: give token-id tensors, "
                         "dicts of model inputs, callables model -> None, or a list of those")


def block_inputs(model, layers, calib) -> tuple[list, list]:
    """One pass over the model, stopped after the last block: block 0's input hidden states and
    every block's other arguments (masks, position embeddings: they may differ per block, e.g.
    sliding-window layers), one entry per calibration item. No KV cache is kept."""
    hidden, extra = [], [[] for _ in layers]

    def make(i):
        def hook(_mod, args, kwargs):
            kwargs = dict(kwargs)
            h = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(h.detach())
            for key, off in (("past_key_values", None), ("past_key_value", None),
                             ("use_cache", False)):
                if key in kwargs:
                    kwargs[key] = off
            extra[i].append((tuple(args[1:]), kwargs))
        return hook

    def stop(*_a):
        raise _StopForward

    hooks = [layer.register_forward_pre_hook(make(i), with_kwargs=True)
             for i, layer in enumerate(layers)]
    hooks.append(layers[-1].register_forward_hook(stop))
    try:
        for item in (calib if isinstance(calib, (list, tuple)) else [calib]):
            try:
                _call_model(model, item)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return hidden, extra


def _run_block(layer, hidden: list, extra: list) -> list:
    outs = []
    for h, (args, kwargs) in zip(hidden, extra):
        out = layer(h, *args, **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs
