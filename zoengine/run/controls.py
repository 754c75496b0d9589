"""The run controls of ``zoengine train`` (docs/cli.md): the learning-rate schedule, the method
hyper-parameters given as flags, the forward and time budgets, and keeping the best dev step.

The loop (``zoengine.run.loop``) asks a ``Controls`` before each step (the lr, whether the
budget allows the step), counts every loss evaluation through it (the step's 2n, an update
rule's extra ones and DiZO's search: each call of a loss closure is one forward of a batch), and
tells it each dev point (``--keep-best``). The defaults are MeZO's: a constant learning rate, no
weight decay, n = 1.
"""

from __future__ import annotations

import math
import time

import torch

from zoengine.checks import ConfigError

LR_SCHEDULERS = ("constant", "linear", "cosine")
# flags that only some methods take: field -> the method's keyword argument
METHOD_FLAGS = ("kernel_order", "r_range", "pool_size", "proj_eps", "proj_lr", "tau", "rank",
                "resample_every")
BEST_PREFIX = "best::"  # the best step's tensors inside a checkpoint's weights file


def lr_factor(kind: str, step: int, total: int, warmup: int = 0) -> float:
    """The learning rate of step ``step`` (0-based: the steps done before it) over the base
    one: transformers' ``get_scheduler`` formulas (``constant_with_warmup``, ``linear``,
    ``cosine`` with half a cycle), so ``ZOTrainer`` with the mapped name gives the same lrs."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def hf_scheduler(kind: str, warmup: int = 0) -> str:
    """The transformers ``lr_scheduler_type`` that follows ``lr_factor(kind, ...)``."""
    return "constant_with_warmup" if kind == "constant" and warmup else kind


def _takes(method: str, name: str) -> bool:
    """Whether ``--method method`` uses the hyper-parameter ``name`` (a method that would
    accept it and ignore it, e.g. ``zo`` with the default estimator, does not)."""
    from zoengine.optim.dizo import DiZO
    from zoengine.optim.presets import KerZOO, PeZO
    from zoengine.optim.registry import method_spec

    spec = method_spec(method)
    cls, fixed = spec.cls, spec.fixed
    if name in ("kernel_order", "r_range"):
        return issubclass(cls, KerZOO) or fixed.get("estimator") == "kernel"
    if name in ("rank", "resample_every"):
        return fixed.get("noise") == "lowrank"
    if name == "pool_size":
        return ((issubclass(cls, PeZO) and fixed.get("reuse", "pool") == "pool")
                or fixed.get("noise") == "pool")
    return issubclass(cls, DiZO)


def check_method_flags(cfg) -> None:
    """A method hyper-parameter given for a method that does not take it is refused, naming the
    flag, the value and the methods that take it."""
    from zoengine.optim import available_methods

    if cfg.method not in available_methods():
        return  # --method itself is refused first
    if cfg.batched_samples:
        from zoengine.optim.batched import batched_refusal
        from zoengine.optim.registry import method_spec

        refused = batched_refusal(method_spec(cfg.method).cls)
        if refused:
            raise ConfigError("--batched-samples", True, f"--method {cfg.method}: {refused}",
                              field="batched_samples")
    for name in METHOD_FLAGS:
        value = getattr(cfg, name)
        if value is not None and not _takes(cfg.method, name):
            takers = [m for m in available_methods() if _takes(m, name)]
            raise ConfigError("--" + name.replace("_", "-"), value,
                              f"applies to --method {', '.join(takers)} only, not "
                              f"{cfg.method}", field=name)


def method_kwargs(cfg) -> dict:
    """The keyword arguments of ``zoengine.optim.create`` the run controls add (only those
    given, so a default run builds the optimizer exactly as before)."""
    out = {name: getattr(cfg, name) for name in METHOD_FLAGS if getattr(cfg, name) is not None}
    if cfg.n_samples != 1:
        out["n_samples"] = cfg.n_samples
    if cfg.weight_decay:
        out["weight_decay"] = cfg.weight_decay
    return out


def step_forwards(opt) -> int:
    """The most loss evaluations the optimizer's next step makes: 2n, the update rule's extra
    ones, and DiZO's 2 per search iteration when its search is due after that step."""
    extra = opt.extra_evaluations()
    interval, iters = getattr(opt, "interval", None), getattr(opt, "search_iters", None)
    if interval and iters is not None and "zo" in opt.state:  # DiZO: its search's schedule
        zo = opt.state["zo"]
        if (zo["step"] + 1) % interval != 0 and not zo.get("dizo_pending", False):
            extra -= 2 * iters
    return 2 * opt.n_samples + extra


def best_key(point: dict) -> tuple[str, int]:
    """(the dev point's key ``--keep-best`` ranks by, +1 higher is better / -1 lower)."""
    if "dev_loss" in point:
        return "dev_loss", -1
    return ("dev_accuracy" if "dev_accuracy" in point
            else next(k for k in point if k.startswith("dev_"))), 1


def better(point: dict, best: dict | None) -> bool:
    """Strictly better than the best so far (a tie keeps the earlier step)."""
    key, sign = best_key(point)
    value = point[key]
    if value != value:  # NaN never wins
        return False
    return best is None or sign * (value - best["value"]) > 0


def check_controls(cfg) -> None:
    """The checks that need the resolved configuration (``--eval-every``'s default depends on
    ``--train``): ``--keep-best`` picks among dev evaluations, so it needs some."""
    from zoengine.tasks import TaskError

    if cfg.keep_best and not cfg.eval_every:
        raise TaskError("--keep-best", f"picks among the dev evaluations, and --train "
                                       f"{cfg.train} evaluates only before and after training by "
                                       "default: add --eval-every N (N > 0)")


class Controls:
    """The loop's run controls for one run (``p``: the loop's ``Progress``)."""

    def __init__(self, cfg, opt, strategy, p, log=print):
        self.cfg, self.opt, self.strategy, self.p, self.log = cfg, opt, strategy, p, log
        self.t0 = time.monotonic()
        self.reason = "steps"
        self.scheduled = cfg.lr_scheduler != "constant" or cfg.warmup_steps > 0

    def counted(self, closure):
        """``closure``, counting each call in ``p.forwards``."""
        p = self.p

        def run():
            p.forwards += 1
            return closure()

        return run

    def counted_groups(self, closure):
        """A batched closure (``step_batched``), counting ``groups`` forwards a call: the
        repeated batch costs what that many one-group forwards cost in rows."""
        p = self.p

        def run(groups):
            p.forwards += groups
            return closure(groups)

        return run

    def counted_source(self, source):
        """A batch source (``set_batch_source``) whose closures are counted."""
        return lambda step, k: self.counted(source(step, k))

    def set_lr(self) -> None:
        """Every group's lr for the next step (``--lr-scheduler``, ``--warmup-steps``)."""
        if self.scheduled:
            lr = self.cfg.lr * lr_factor(self.cfg.lr_scheduler, self.p.step, self.cfg.steps,
                                         self.cfg.warmup_steps)
            for group in self.opt.param_groups:
                group["lr"] = lr

    def stop_before(self) -> bool:
        """True when the next step could take the forwards past ``--max-forwards``."""
        budget = self.cfg.max_forwards
        if budget is None or self.p.forwards + step_forwards(self.opt) <= budget:
            return False
        self.reason = "max_forwards"
        return True

    def stop_after(self) -> bool:
        """True once the training time of this process reached ``--max-minutes``."""
        limit = self.cfg.max_minutes
        if limit is None or time.monotonic() - self.t0 < limit * 60.0:
            return False
        self.reason = "max_minutes"
        return True

    def note_dev(self) -> None:
        """After a dev point: with ``--keep-best``, a copy of the tensors of a new best."""
        point, p = self.p.dev[-1], self.p
        if self.cfg.keep_best and better(point, p.best):
            key, _ = best_key(point)
            p.best = {"step": p.step, "metric": key, "value": point[key]}
            p.best_tensors = {n: t.detach().clone() for n, t in self.strategy.named_params()}

    def summary(self) -> dict:
        """Why and where the loop stopped (``metrics.json``'s ``stopped``)."""
        p, cfg = self.p, self.cfg
        out = {"reason": self.reason, "step": p.step, "steps": cfg.steps,
               "forwards": p.forwards,
               "minutes": round((time.monotonic() - self.t0) / 60.0, 4)}
        if self.reason != "steps":
            flag = "--" + self.reason.replace("_", "-")
            self.log(f"stopped at step {p.step} of {cfg.steps}: {flag} "
                     f"{getattr(cfg, self.reason)} reached ({p.forwards} forwards, "
                     f"{out['minutes']:.2f} min); writing the outputs")
        return out


def finish_best(cfg, strategy, report: dict, p, log=print) -> None:
    """``--keep-best``: after the final evaluation (the curve's last point), make the best dev
    step's tensors the run's weights; ``after`` is then their evaluation, ``last`` the last
    step's, ``best`` names the step. A tie keeps the earlier step."""
    if not cfg.keep_best:
        return
    final = report["curve"]["dev"][-1]
    if better(final, p.best):
        key, _ = best_key(final)
        p.best, p.best_tensors = {"step": final["step"], "metric": key,
                                  "value": final[key]}, None
    report["best"] = {**p.best, "last_step": final["step"]}
    if p.best["step"] == final["step"]:
        log(f"keep-best: the last step ({final['step']}) has the best {p.best['metric']}")
        return
    with torch.no_grad():
        for name, t in strategy.named_params():
            t.copy_(p.best_tensors[name])
    report["last"] = report["after"]
    report["after"] = strategy.evaluate()
    log(f"keep-best: the weights of step {p.best['step']} ({p.best['metric']} "
        f"{p.best['value']:.4f}; the last step's {final[p.best['metric']]:.4f})")
