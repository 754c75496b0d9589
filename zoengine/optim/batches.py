"""The one batch-seeding scheme every front end uses (docs/design.md items 16 and 22).

A batch is drawn by a ``numpy.random.RandomState`` seeded from the noise contract's stream key,
a pure function of (seed, step, stream), so a resumed run draws the batches of an uninterrupted
one without replaying the data order, and the CLI loop and ``ZOTrainer`` draw the same rows
from the same seed:

- stream 0: the training batch of step t (``batch_rng(seed, t)``); a data-parallel rank r > 0
  reads stream 2^20 + r (``zoengine.run.ranks``);
- stream 1 + k: search batch k of a method that draws batches of its own (DiZO's γ search)
  after ``step`` optimizer steps (``search_rng(seed, step, k)``), handed to the optimizer through
  ``ZOOptimizer.set_batch_source`` as ``source(step, k)``.

So the training batches are the same with and without DiZO's projections.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from zoengine.kernels.keys import stream_key
from zoengine.optim.deprecations import warn_outside
from zoengine.optim.functional import loss_value

BatchSource = Callable[[int, int], Callable]  # source(step, k) -> a loss closure

TRAIN_STREAM = 0
SEARCH_STREAM = 1  # search batch k reads stream SEARCH_STREAM + k


def batch_rng(seed: int, step: int, stream: int = TRAIN_STREAM) -> np.random.RandomState:
    """The random state that draws the batch of (``seed``, ``step``, ``stream``)."""
    return np.random.RandomState(stream_key(seed, step, stream) & 0xFFFFFFFF)


def search_rng(seed: int, step: int, k: int) -> np.random.RandomState:
    """The random state of search batch ``k`` after ``step`` optimizer steps: what a batch
    source ``source(step, k)`` draws its rows from (the CLI loop and ``ZOTrainer`` alike)."""
    if k < 0:
        raise ValueError(f"k={k!r}: search batches are numbered from 0")
    return batch_rng(seed, step, SEARCH_STREAM + k)


def check_batch_source(source) -> None:
    """``set_batch_source``'s argument: None or a callable ``source(step, k)``."""
    if source is not None and not callable(source):
        raise TypeError(f"set_batch_source({type(source).__name__}): must be None or a callable "
                        "source(step, k) returning a loss closure on a fresh batch")


class ProjectionClosure:
    """``projection_closure=`` as a batch source: a zero-argument factory of loss closures, or
    an iterable of loss closures (one per search iteration); ``(step, k)`` are not used."""

    def __init__(self, given):
        self.given, self._plain = given, False
        self._it = None
        if not callable(given):
            try:
                self._it = iter(given)
            except TypeError:
                raise TypeError(f"projection_closure={type(given).__name__}: must be a factory "
                                "(fresh() -> a loss closure on a fresh batch) or an iterable "
                                "of loss closures") from None

    def __call__(self, step: int, k: int) -> Callable:
        if self._it is not None:
            try:
                out = next(self._it)
            except StopIteration:
                raise RuntimeError("DiZO's projection_closure iterator is exhausted: the search "
                                   "needs one closure per iteration") from None
            if not callable(out):
                raise TypeError(f"projection_closure yielded a {type(out).__name__}; an "
                                "iterable must yield loss closures (e.g. lambda: "
                                "model(**b).loss)")
            return out
        if self._plain:
            return self.given
        out = self.given()
        if callable(out):
            return out
        # a plain loss closure (deprecated): its first loss, at the unprojected weights, is
        # discarded, and it is evaluated as is from now on
        loss_value(out, "DiZO projection_closure()")  # neither a closure nor a loss: say so
        warn_outside("DiZO(projection_closure=<a loss closure>) is deprecated and will be "
                     "removed in the next release: projection_closure is a factory; pass "
                     "projection_closure=lambda: closure, or opt.set_batch_source(lambda step, "
                     "k: closure)")
        self._plain = True
        return self.given
