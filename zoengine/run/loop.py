"""The one training loop: any strategy (head, full, LoRA, LM), any ZO optimizer.

Resume, checkpoints and distributed modes attach here, once, instead of to one loop per kind.
The loop prints ``LOOP_STARTED`` (a fixed line) just before the first step, so wrappers and
tests can wait for an explicit event rather than sleep.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from zoengine.run.strategies import Strategy

LOOP_STARTED = "zoengine: step loop started"


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar (no output when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)


def projection_batches(strategy: Strategy, seed: int):
    """Fresh-batch closures for DiZO's γ search, from their own random stream (seed-derived),
    so the training batches are the same with and without projections."""
    rng = np.random.RandomState((seed + 0x5EED) % 2**32)
    return lambda: strategy.batch_closure(rng)


def run_loop(cfg, strategy: Strategy, opt: torch.optim.Optimizer, report: dict, *,
             log=print) -> None:
    """Take ``cfg.steps`` optimizer steps on fresh training batches; record the loss curve and
    a dev point every ``cfg.eval_every`` steps into ``report["curve"]``."""
    if getattr(opt, "projection_closure", False) is None:  # DiZO without its own data
        opt.projection_closure = projection_batches(strategy, cfg.seed)
    rng = np.random.RandomState(cfg.seed)
    curve, evals = [], [{"step": 0, **_dev_point_of(report["before"])}]
    t0 = time.perf_counter()
    log(LOOP_STARTED)
    with progress_bar(cfg.steps, cfg.progress, f"zo {strategy.name}") as bar:
        avg = None
        for step in range(1, cfg.steps + 1):
            loss = float(opt.step(strategy.batch_closure(rng)))
            curve.append(round(loss, 6))
            if loss == loss:  # a skipped step (nonfinite="skip") returns NaN
                avg = loss if avg is None else strategy.ema * avg + (1 - strategy.ema) * loss
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                evals.append({"step": step, **strategy.dev_point()})
            bar.update(1)
            if avg is not None and (step % 10 == 0 or step == cfg.steps):
                bar.set_postfix(loss=f"{avg:.4f}")
    report["timing"]["train_s"] = time.perf_counter() - t0
    report["curve"] = {"loss": curve, "dev": evals}


def _dev_point_of(metrics: dict) -> dict:
    """The dev point of a full ``evaluate()`` result (classification or LM)."""
    dev = metrics["dev"]
    if "auc" in dev:
        return {"dev_accuracy": dev["accuracy"], "dev_auc": dev["auc"]}
    return {"dev_loss": dev["loss"]}


def finish_curve(report: dict, steps: int) -> None:
    """Append the final dev point (from ``report["after"]``) to the curve."""
    report["curve"]["dev"].append({"step": steps, **_dev_point_of(report["after"])})
