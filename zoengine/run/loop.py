"""The one training loop: any strategy (head, full, LoRA, LM), any ZO optimizer.

Resume, checkpoints and distributed modes attach here, once, instead of to one loop per kind.
The loop prints ``LOOP_STARTED`` (a fixed line) just before the first step, so wrappers and
tests can wait for an explicit event rather than sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from zoengine.faults import crashpoint
from zoengine.optim.batches import batch_rng, search_rng
from zoengine.optim.functional import NonFiniteUpdateError
from zoengine.run.controls import Controls
from zoengine.run.strategies import Strategy
from zoengine.tasks import TaskError

LOOP_STARTED = "zoengine: step loop started"


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar (no output when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.RandomState:
    """The random state that draws step ``step``'s batch: a pure function of (seed, step,
    stream), like the noise contract, so a resumed run draws the same batches without
    replaying the data order (``zoengine.optim.batches.batch_rng``: stream 0 for training
    batches, 1 + k for search batch k)."""
    return batch_rng(seed, step, stream)


def search_batches(strategy: Strategy, seed: int):
    """The loop's batch source (``ZOOptimizer.set_batch_source``): ``source(step, k)`` is a
    loss closure on search batch k after ``step`` optimizer steps, drawn from
    ``search_rng(seed, step, k)``, so the training batches are the same with and without
    DiZO's projections and a resumed run's searches see the batches the uninterrupted run
    saw."""
    return lambda step, k: strategy.batch_closure(search_rng(seed, step, k))


@dataclass
class Progress:
    """Where a loop stands: steps done, the loss per step, the dev points so far, the loss
    evaluations made (``forwards``) and, with ``--keep-best``, the best dev step (``best``:
    step, metric, value) and a copy of its tensors."""

    step: int = 0
    loss: list = field(default_factory=list)
    dev: list = field(default_factory=list)
    forwards: int = 0
    best: dict | None = None
    best_tensors: dict | None = field(default=None, repr=False)


def run_loop(cfg, strategy: Strategy, opt: torch.optim.Optimizer, report: dict, *,
             log=print, progress: Progress | None = None,
             on_step: Callable[[Progress], None] | None = None,
             data_stream: int = 0) -> Progress:
    """Take optimizer steps until ``cfg.steps`` on fresh training batches; record the loss
    curve and a dev point every ``cfg.eval_every`` steps into ``report["curve"]``.

    ``progress``: continue a run (its steps done, loss curve and dev points); ``on_step``:
    called after every step (checkpoints attach here); ``data_stream``: which ``step_rng``
    stream draws the batches (a data-parallel rank's shard; 0 for one process)."""
    # the declared hook: DiZO's search draws from it; a no-op for methods without batches
    # of their own; a source the optimizer already has (its user's) is kept
    p = progress or Progress(dev=[{"step": 0, **dev_point_of(report["before"])}])
    ctl = Controls(cfg, opt, strategy, p, log)  # lr schedule, budgets, forwards, best step
    opt.set_batch_source(ctl.counted_source(search_batches(strategy, cfg.seed)), replace=False)
    t0 = time.perf_counter()
    log(LOOP_STARTED)
    with progress_bar(cfg.steps, cfg.progress, f"zo {strategy.name}") as bar:
        bar.update(p.step)
        avg = None
        while p.step < cfg.steps and not ctl.stop_before():
            crashpoint("loop-step")
            ctl.set_lr()
            rng = step_rng(cfg.seed, p.step, data_stream)
            try:
                loss = float(opt.step_batched(ctl.counted_groups(strategy.batched_closure(rng)))
                             if cfg.batched_samples else
                             opt.step(ctl.counted(strategy.batch_closure(rng))))
            except NonFiniteUpdateError as exc:  # never applied: the weights stay finite
                raise TaskError("--lr", f"{cfg.lr!r} at step {p.step + 1}: {exc}") from None
            p.step += 1
            p.loss.append(round(loss, 6))
            if loss == loss:  # a skipped step (nonfinite="skip") returns NaN
                avg = loss if avg is None else strategy.ema * avg + (1 - strategy.ema) * loss
            if cfg.eval_every and p.step % cfg.eval_every == 0 and p.step != cfg.steps:
                p.dev.append({"step": p.step, **strategy.dev_point()})
                ctl.note_dev()
            if on_step is not None:
                on_step(p)
            bar.update(1)
            if avg is not None and (p.step % 10 == 0 or p.step == cfg.steps):
                bar.set_postfix(loss=f"{avg:.4f}", refresh=False)  # the bar redraws itself
            if ctl.stop_after():
                break
    report["timing"]["train_s"] = time.perf_counter() - t0
    report["curve"] = {"loss": p.loss, "dev": p.dev}
    report["stopped"] = ctl.summary()
    summary = opt.projection_summary()  # DiZO: searches done, skipped, still due
    if summary is not None:
        report["dizo"] = summary
    return p


def dev_point_of(metrics: dict) -> dict:
    """The dev point of a full ``evaluate()`` result (classification or LM)."""
    dev = metrics["dev"]
    if "metric" in dev:  # a suite task: its own metric (accuracy or f1)
        return {f"dev_{dev['metric']}": dev[dev["metric"]]}
    if "auc" in dev:
        return {"dev_accuracy": dev["accuracy"], "dev_auc": dev["auc"]}
    return {"dev_loss": dev["loss"]}


def finish_curve(report: dict, steps: int) -> None:
    """Append the final dev point (from ``report["after"]``) to the curve (in place of a dev
    point of the same step: a budget that stopped the loop right after one)."""
    dev = report["curve"]["dev"]
    if dev and dev[-1]["step"] == steps:
        dev.pop()
    dev.append({"step": steps, **dev_point_of(report["after"])})
