"""How an optimizer writes its step journal (``opt.set_journal(PATH)``): the header that lets
``zoengine.journal.replay`` rebuild it (the method's registry name and hyper-parameters), and the
tap that records every loss the closures return.

The journal holds, per step, the closure outputs in call order (the two-point evaluations and,
for DiZO, the γ search's), the group hyper-parameters in force (a scheduler may change them) and
a few values for reading (g, PeZO's pointer, DiZO's γ). Replaying re-runs ``step`` with closures
that return the recorded values, so the in-place operations, and hence the weights, repeat bit
for bit; nothing else (no z, no gradient, no weights) is stored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import contextmanager

import torch

from zoengine.optim.journal_file import (
    FLAG_PROJECTED,
    FLAG_RAISED,
    FLAG_SKIPPED,
    JournalWriter,
    Record,
    tensors_sha256,
)
from zoengine.optim.registry import method_name

HEADER_FORMAT = 2  # 2: "method" (registry name + hyper-parameters); 1: "call" (class path)


def method_record(opt) -> dict:
    """How to rebuild ``opt``: its registry name, its hyper-parameters (JSON-checked) and which
    masks it used (None, "zeros", or "dict": a replay must be given them)."""
    try:
        name = method_name(type(opt))
    except ValueError as exc:
        raise ValueError(f"set_journal: {exc}") from None
    hyper = opt.hyperparameters()
    try:
        json.dumps(hyper)
    except TypeError as exc:
        raise ValueError(f"set_journal: {type(opt).__name__}'s hyper-parameters must be plain "
                         f"values to be journaled ({exc}); {hyper}") from None
    return {"name": name, "hyperparameters": hyper, "masks": opt._masks_spec}


def header_for(opt) -> dict:
    """The journal header of ``opt``: how to rebuild it, the tensors it trains, record sizes."""
    names, shapes, dtypes = [], [], []
    for i, g in enumerate(opt.param_groups):
        for j, p in enumerate(g["params"]):
            names.append(g["param_names"][j] if "param_names" in g else f"#{i}.{j}")
            shapes.append(list(p.shape))
            dtypes.append(str(p.dtype).replace("torch.", ""))
    n = opt.n_samples
    search = opt.extra_evaluations()  # DiZO: its search's evaluations
    trained = [(nm, p) for nm, p in zip(names, (p for g in opt.param_groups
                                                 for p in g["params"]))]
    return {"format": HEADER_FORMAT, "method": method_record(opt), "config": opt._run_config(),
            "start_step": opt.state["zo"]["step"], "base_sha256": tensors_sha256(trained),
            **getattr(opt, "_journal_meta", {}),
            "seed": opt.state["zo"]["seed"], "param_names": names, "shapes": shapes,
            "dtypes": dtypes, "groups": len(opt.param_groups), "n_samples": n,
            "capacity": 2 * n + search, "projected": opt.projected_count()}


class StepTap:
    """Collects the loss values of one step as the optimizer's closures return them."""

    def __init__(self):
        self.values: list[float] = []

    def wrap(self, closure: Callable) -> Callable:
        def tapped():
            out = closure()
            try:
                self.values.append(float(out.detach().reshape(()).item())
                                   if isinstance(out, torch.Tensor) else float(out))
            except (TypeError, ValueError, RuntimeError):
                pass  # not a scalar: the step raises on it with its own message
            return out
        return tapped


class Journaling:
    """Mixin for ``ZOOptimizer``: ``set_journal(PATH)`` records every step (module docstring)."""

    _journal: JournalWriter | None = None
    _tap: StepTap | None = None

    def set_journal(self, path, *, fsync: str | int = "step", meta: dict | None = None) -> None:
        """Record every following step into ``path`` (created, or appended to when it holds
        this run's journal). ``fsync``: ``"step"``, every k steps (int) or ``"checkpoint"``
        (only at :meth:`sync_journal`). ``meta``: JSON-able fields added to the header (the
        CLI stores its run configuration there)."""
        self.close_journal()
        self._journal_spec = (path, fsync)
        self._journal_meta = dict(meta or {})

    @property
    def journaling(self) -> bool:
        """Whether a journal is set: open, or opened at the next step (``set_journal``)."""
        return self._journal is not None or getattr(self, "_journal_spec", None) is not None

    def sync_journal(self) -> None:
        """Make the records written so far durable (fsync)."""
        if self._journal is not None:
            self._journal.sync()

    def close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
        self._journal = None

    @contextmanager
    def journal_paused(self):
        """Steps taken inside are not journaled (replaying a journal must not append to it)."""
        spec = getattr(self, "_journal_spec", None)
        self._journal_spec = None
        try:
            yield
        finally:
            self._journal_spec = spec

    def tap(self, closure: Callable) -> Callable:
        """``closure``, recorded into this step's journal record when a journal is open."""
        return closure if self._tap is None else self._tap.wrap(closure)

    @contextmanager
    def journal_step(self):
        """Around one ``step``: collect the closure values, append one record on success."""
        spec = getattr(self, "_journal_spec", None)
        if spec is None or self._tap is not None:  # no journal, or a nested call
            yield
            return
        if self._journal is None:
            self._journal = JournalWriter(spec[0], header_for(self), fsync=spec[1])
        zo = self.state["zo"]
        step, skipped, searches = zo["step"], zo["skipped_steps"], zo.get("dizo_searches", 0)
        self._tap = StepTap()
        hyper = [(float(g["lr"]), float(g["eps"]), float(g.get("weight_decay", 0.0)))
                 for g in self.param_groups]
        try:
            yield
        except BaseException:
            if zo["step"] > step:  # the weights moved before the error: record it all
                self._append(step, hyper, FLAG_RAISED, skipped, searches)
            raise
        else:
            self._append(step, hyper, 0, skipped, searches)
        finally:
            self._tap = None

    def _append(self, step, hyper, flags, skipped, searches) -> None:
        zo = self.state["zo"]
        flags |= ((FLAG_SKIPPED if zo["skipped_steps"] > skipped else 0)
                  | (FLAG_PROJECTED if zo.get("dizo_searches", 0) > searches else 0))
        gamma = list(zo.get("dizo_gamma", [])) if flags & FLAG_PROJECTED else []
        grads = [] if flags & FLAG_SKIPPED else list(zo.get("projected_grads", []))
        self._journal.append(Record(
            step=step, values=self._tap.values, hyper=hyper, flags=flags,
            grads=[g for g in grads if math.isfinite(g)],
            pool_pointer=int(zo.get("pool_pointer", 0)), gamma=gamma))
