"""``ZOTrainingArguments``: transformers' ``TrainingArguments`` plus the ZO fields, checked with
``zoengine train``'s words (``zoengine.checks``, ``zoengine.run.config``). The run controls
that the Trainer already has are its own fields (``lr_scheduler_type``, ``warmup_steps``,
``weight_decay``, ``eval_steps``, ``load_best_model_at_end``); the others are ``zo_*`` fields
here and reach the method through ``zo_factory_kwargs`` (docs/cli.md, "The Trainer")."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

# zo_* field -> RunConfig field (the same check, the same methods taking it)
CONTROLS = {"zo_n_samples": "n_samples", "zo_kernel_order": "kernel_order",
            "zo_r_range": "r_range", "zo_pool_size": "pool_size",
            "zo_dizo_interval": "dizo_interval", "zo_proj_eps": "proj_eps",
            "zo_proj_lr": "proj_lr", "zo_tau": "tau", "zo_rank": "rank",
            "zo_resample_every": "resample_every"}
_KWARG = {"zo_dizo_interval": "interval"}  # the method's keyword, where it differs
# zo_* budget -> RunConfig field (the same check; ZOTrainer's callback, zoengine.run.hf_budget)
BUDGETS = {"zo_max_forwards": "max_forwards", "zo_max_minutes": "max_minutes"}


def check_zo_controls(args) -> None:
    """Each ``zo_*`` control with ``RunConfig``'s check and method rule, named by its field:
    ``zo_kernel_order=3`` with ``zo_method="mezo"`` is refused as ``--kernel-order`` is; the
    budgets ``zo_max_forwards`` / ``zo_max_minutes`` with ``--max-forwards``'s / ``--max-minutes``'s."""
    from dataclasses import fields as dc_fields

    from zoengine.checks import ConfigError
    from zoengine.run.config import RunConfig
    from zoengine.run.controls import METHOD_FLAGS, _takes

    by_name = {f.name: f for f in dc_fields(RunConfig)}
    for name, run_name in CONTROLS.items():
        value = getattr(args, name)
        by_name[run_name].metadata["check"](name, value, field=name)
        if value is None or run_name not in METHOD_FLAGS + ("dizo_interval",):
            continue
        takes = (args.zo_method == "dizo" if run_name == "dizo_interval"
                 else _takes(args.zo_method, run_name))
        if not takes:
            raise ConfigError(name, value, f"does not apply to zo_method={args.zo_method!r}",
                              field=name)
    for name, run_name in BUDGETS.items():
        by_name[run_name].metadata["check"](name, getattr(args, name), field=name)


def check_batched_args(args) -> None:
    """``zo_batched_samples=True`` needs virtual perturbation and a method on the two-point
    loop, as ``--batched-samples`` does."""
    from zoengine.checks import ConfigError
    from zoengine.optim.batched import batched_refusal
    from zoengine.optim.registry import method_spec

    if not args.zo_batched_samples:
        return
    if args.zo_perturbation != "virtual":
        raise ConfigError("zo_batched_samples", True, "rows of one forward see different "
                          "weights, so none may be written: set zo_perturbation='virtual'",
                          field="zo_batched_samples")
    refused = batched_refusal(method_spec(args.zo_method).cls)
    if refused:
        raise ConfigError("zo_batched_samples", True, f"zo_method={args.zo_method!r}: "
                          f"{refused}", field="zo_batched_samples")


def zo_factory_kwargs(args) -> dict:
    """The ``zoengine.optim.create`` keyword arguments of the ``zo_*`` controls given."""
    out = {}
    for name in CONTROLS:
        value = getattr(args, name, None)
        if value is not None and not (name == "zo_n_samples" and value == 1):
            out[_KWARG.get(name, name.removeprefix("zo_"))] = value
    return out


@dataclass
class ZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the ZO fields. ``learning_rate`` is the ZO learning rate.

    Gradient clipping is off by default (``max_grad_norm=0``): there are no gradients.
    """

    zo_method: str = field(default="mezo", metadata={"help": "method from zoengine's registry"})
    zo_eps: float = field(default=1e-3, metadata={"help": "perturbation scale ε"})
    zo_update: str | None = field(default=None, metadata={"help": "update rule: sgd, momentum, "
                                  "sign, adam or conservative (None: the method's)"})
    zo_seed: int | None = field(default=None,
                                metadata={"help": "master seed of the noise (default: seed)"})
    zo_kwargs: dict | None = field(default=None,
                                   metadata={"help": "extra keyword arguments for the method"})
    zo_perturbation: str = field(default="inplace", metadata={
        "help": "'inplace' or 'virtual' (θ never written during the two evaluations; "
                "docs/virtual.md)"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "unused by ZO (no gradients)"})
    zo_journal: bool = field(default=False, metadata={
        "help": "journal every ZO step into <output_dir>/zo_journal.zoj; a resumed run then "
                "replays the steps after its checkpoint without forward passes"})

    # the run controls of `zoengine train` (docs/cli.md); the lr schedule, warm-up, weight
    # decay, dev evaluations and keep-best are the Trainer's own fields (lr_scheduler_type,
    # warmup_steps, weight_decay, eval_steps, load_best_model_at_end): docs/cli.md maps them
    zo_n_samples: int = field(default=1, metadata={
        "help": "perturbations per step, averaged (n-SPSA; MeZO's n = 1)"})
    zo_kernel_order: int | None = field(default=None, metadata={
        "help": "KerZOO's kernel order 1, 3 or 5 (kerzoo, kerzoo+pezo only)"})
    zo_r_range: float | None = field(default=None, metadata={
        "help": "KerZOO's a of r ~ U(-a, a) (kerzoo, kerzoo+pezo only)"})
    zo_pool_size: int | None = field(default=None, metadata={
        "help": "PeZO's pool of random numbers (pezo, kerzoo+pezo only)"})
    zo_dizo_interval: int | None = field(default=None, metadata={
        "help": "DiZO: steps between projections (dizo only)"})
    zo_proj_eps: float | None = field(default=None, metadata={
        "help": "DiZO: ε of the γ search (dizo only)"})
    zo_proj_lr: float | None = field(default=None, metadata={
        "help": "DiZO: lr of the γ search (dizo only)"})
    zo_tau: float | None = field(default=None, metadata={
        "help": "DiZO: τ, γ within (1 ± τ)·‖Δ‖ (dizo only)"})
    zo_rank: int | None = field(default=None, metadata={
        "help": "rank r of low-rank noise (mezo-lowrank only; docs/lowrank.md)"})
    zo_resample_every: int | None = field(default=None, metadata={
        "help": "low-rank noise: steps between fresh V factors (mezo-lowrank only)"})
    zo_batched_samples: bool = field(default=False, metadata={
        "help": "evaluate a step's 2n perturbations as one forward of the batch repeated 2n "
                "times (step_batched; needs zo_perturbation='virtual' and a causal LM)"})
    zo_max_forwards: int | None = field(default=None, metadata={
        "help": "stop cleanly before a step would take the training forwards past N (every "
                "loss-closure call counted: n samples, update rule, DiZO's search)"})
    zo_max_minutes: float | None = field(default=None, metadata={
        "help": "stop cleanly after the step that reaches M minutes of training"})

    def __post_init__(self):
        super().__post_init__()
        # RunConfig's checks (zoengine.checks): the same words here as on the command line
        from zoengine.checks import BOOL, NONNEGATIVE_INT, POSITIVE_NUMBER, one_of, optional
        from zoengine.optim import available_methods
        from zoengine.run.config import PERTURBATIONS, UPDATES

        one_of(available_methods)("zo_method", self.zo_method)
        optional(one_of(UPDATES))("zo_update", self.zo_update)
        one_of(PERTURBATIONS)("zo_perturbation", self.zo_perturbation)
        POSITIVE_NUMBER("zo_eps", self.zo_eps)
        optional(NONNEGATIVE_INT)("zo_seed", self.zo_seed)
        BOOL("zo_journal", self.zo_journal)
        BOOL("zo_batched_samples", self.zo_batched_samples)
        check_zo_controls(self)
        check_batched_args(self)
