"""Step journals: read them, replay them onto weights, check the base they start from.

Every zoengine optimizer journals with ``opt.set_journal(PATH)`` (or ``zoengine.journal.attach(
opt, PATH)``) and appends one fixed-size, checksummed record per step
(``zoengine.optim.journal_file`` has the format). This module turns a journal back into weights::

    opt = zoengine.journal.replay(model, "run/journal.zoj")   # no forward pass

Replay rebuilds the optimizer from the journal's header (the method's registry name and its
hyper-parameters: ``zoengine.optim.create(name, params, **hyperparameters)``) and re-runs each
step with closures that return the recorded losses, handing a method's own batch requests
(DiZO's search) the recorded values through ``set_batch_source``, so the weights repeat the
run's bit for bit on the reference and native backends (docs/reliability.md). Journals written
before the method record (header format 1: a class path and the constructor's arguments)
still replay: the class is looked up in the method registry by name, never imported.
"""

from __future__ import annotations

import torch

from zoengine.optim.dizo import DiZO
from zoengine.optim.journal_file import (
    FLAG_RAISED,
    FLAG_SKIPPED,
    JournalError,
    JournalWriter,
    Record,
    read_header,
    read_records,
    tensors_sha256,
)
from zoengine.optim.registry import available_methods, create, method_spec
from zoengine.optim.virtual import VIRTUAL_REPLAY

tensors_hash = tensors_sha256  # the identity of a set of weights (SHA-256)

__all__ = ["JournalError", "JournalWriter", "Record", "apply_record", "attach",
           "build_optimizer", "read_header", "read_records", "replay", "tensors_hash"]


def attach(opt, path, *, fsync: str | int = "step", meta: dict | None = None):
    """Journal every following step of ``opt`` into ``path``: ``opt.set_journal(path,
    fsync=fsync, meta=meta)`` (see there). Returns ``opt``."""
    opt.set_journal(path, fsync=fsync, meta=meta)
    return opt


class _Exhausted(JournalError):
    """A replayed step asked for more loss values than its record holds."""


def _named(model_or_named_params) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_named_params, torch.nn.Module):
        return [(n, p) for n, p in model_or_named_params.named_parameters() if p.requires_grad]
    return list(model_or_named_params)


def build_optimizer(header: dict, named_params, *, masks=None, path: str = "journal"):
    """The optimizer the journal was written by, on ``named_params`` (names and shapes must be
    the journal's). ``masks``: needed when the run used a dict of masks."""
    named = _named(named_params)
    names = [n for n, _ in named]
    if names != header["param_names"]:
        missing = sorted(set(header["param_names"]) - set(names))[:3]
        extra = sorted(set(names) - set(header["param_names"]))[:3]
        raise JournalError(f"{path}: the journal trains {len(header['param_names'])} tensors "
                           f"that these parameters do not match (missing {missing}, "
                           f"unexpected {extra})")
    for (n, p), shape in zip(named, header["shapes"]):
        if list(p.shape) != shape:
            raise JournalError(f"{path}: {n} has shape {list(p.shape)}; the journal's has {shape}")
    name, hyper, masks_spec = _method_of(header, path)
    if masks_spec == "dict" and masks is None:
        raise JournalError(f"{path}: the run used a dict of sparsity masks: pass masks=")
    kwargs = dict(hyper)
    if masks_spec is not None:
        kwargs["masks"] = masks if masks is not None else masks_spec
    opt = create(name, named, **kwargs)
    if header.get("config", {}).get("perturbation") == "virtual":
        opt.attach_virtual(VIRTUAL_REPLAY)  # no forward runs: each step is its update alone
    return opt


def _method_of(header: dict, path) -> tuple[str, dict, str | None]:
    """(registry name, hyper-parameters, masks spec) of the optimizer that wrote ``header``."""
    method = header.get("method")
    if isinstance(method, dict):
        return method["name"], dict(method["hyperparameters"]), method.get("masks")
    call = header.get("call")
    if not isinstance(call, dict):
        raise JournalError(f"{path}: the header names no optimizer (neither 'method' nor the "
                           "older 'call'): not a journal this zoengine can replay")
    return _legacy_method(call, path)


_LEGACY_POSITIONAL = ("lr", "eps", "weight_decay")  # every class took these after params
_NOT_HYPER = ("journal", "journal_fsync", "distributed", "perturbation", "model",
              "projection_closure", "masks")


def _legacy_method(call: dict, path) -> tuple[str, dict, str | None]:
    """A format-1 header (``{"class": "zoengine.optim.mezo.MeZO", "args": [...], "kwargs":
    {...}, "masks": ...}``) as (registry name, hyper-parameters, masks spec). The class is
    found among the registered classes by its name (never imported from the path); DiZO's
    ``clip`` was τ and becomes ``tau``."""
    cls_name = str(call.get("class", "")).rpartition(".")[2]
    names = [n for n in available_methods() if method_spec(n).cls.__name__ == cls_name
             and not method_spec(n).fixed and method_spec(n).factory is None]
    if not names:
        raise JournalError(
            f"{path}: written by an older zoengine for class {call.get('class')!r}, which is "
            "not in zoengine's method registry: register it (zoengine.optim.register_method("
            f"name, {cls_name})) and replay again, or train the run again")
    hyper = dict(zip(_LEGACY_POSITIONAL, call.get("args", [])))
    hyper.update({k: v for k, v in call.get("kwargs", {}).items() if k not in _NOT_HYPER})
    if issubclass(method_spec(names[0]).cls, DiZO) and "clip" in hyper:
        hyper["tau"] = hyper.pop("clip")  # DiZO's τ was called clip
    return names[0], hyper, call.get("masks")


def apply_record(opt, record: Record, *, path: str = "journal") -> None:
    """Re-run one recorded step on ``opt`` (whose step counter must be the record's)."""
    zo = opt.state["zo"]
    if record.step != zo["step"]:
        raise JournalError(f"{path}: record for step {record.step}, but the optimizer is at "
                           f"step {zo['step']}: the journal has a gap or belongs elsewhere")
    for g, (lr, eps, wd) in zip(opt.param_groups, record.hyper):
        g["lr"], g["eps"], g["weight_decay"] = lr, eps, wd
    values = iter(record.values)

    def closure():
        try:
            return next(values)
        except StopIteration:
            raise _Exhausted(f"{path}: step {record.step} needs more loss values than were "
                             "recorded: the replay diverged from the run") from None

    # a method's own batches (DiZO's search) are the recorded values too; the optimizer's
    # source (the run's own data) is put back afterwards
    previous = opt.set_batch_source(lambda step, k: closure)
    skipped = zo["skipped_steps"]
    try:
        with opt.journal_paused():  # a replayed step is already in the journal
            opt.step(closure)
    except Exception as exc:  # noqa: BLE001 - re-raised unless the run raised here too
        if not (record.flags & FLAG_RAISED) or isinstance(exc, _Exhausted):
            raise
    finally:
        opt.set_batch_source(previous)
    left = sum(1 for _ in values)
    if left or bool(zo["skipped_steps"] > skipped) != bool(record.flags & FLAG_SKIPPED):
        raise JournalError(f"{path}: step {record.step} replayed differently from the run "
                           f"({left} recorded values unused)")


def replay(model_or_named_params, path, *, masks=None, optimizer=None, until_step=None):
    """Apply the journal at ``path`` to the weights; returns the optimizer, at the journal's
    last step (or ``until_step``). ``optimizer``: an optimizer built by the caller (with
    several param groups, say) whose step counter says where to start; records before it are
    skipped. Without it the weights must be the run's starting weights: their hash is checked
    against the journal's ``base_sha256`` when the journal starts at step 0."""
    header, records, _ = read_records(path)
    if optimizer is None:
        named = _named(model_or_named_params)
        optimizer = build_optimizer(header, named, masks=masks, path=str(path))
        base = header.get("base_sha256")
        if base and header.get("start_step", 0) == 0 and tensors_hash(named) != base:
            raise JournalError(f"{path}: these weights are not the run's starting weights "
                               "(SHA-256 differs from the journal's base_sha256)")
    with torch.no_grad():
        for r in records:
            if until_step is not None and r.step >= until_step:
                break
            if r.step >= optimizer.state["zo"]["step"]:
                apply_record(optimizer, r, path=str(path))
    return optimizer
