"""The job behind ``zoengine train``: set up (task, model, pruning, memory plan, LoRA), build the
strategy and the optimizer, run the one loop, evaluate, write the output folder.

The optimizer always comes from ``zoengine.optim.create(method, ...)``; what is trained comes
from ``zoengine.run.strategies``; the steps from ``zoengine.run.loop``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import torch

from zoengine.faults import crashpoint
from zoengine.journal import tensors_hash
from zoengine.run.admission import check_fresh_or_resumable, check_output_dir
from zoengine.run.config import DEFAULT_MODEL, RunConfig
from zoengine.run.controls import check_controls, finish_best, method_kwargs
from zoengine.run.kd import check_objective, teacher_for_run
from zoengine.run.loop import dev_point_of, finish_curve, run_loop
from zoengine.run.lora import lora_for_run
from zoengine.run.mask_files import MASKS_FILE, masks_writer
from zoengine.run.norms import norms_for_run
from zoengine.run.objectives import check_nondiff
from zoengine.run.ranks import Ranks
from zoengine.run.report import curve_files, run_summary_json, summary_lines, weights_writer
from zoengine.run.resources import auto_threads, load_model
from zoengine.run.resources import log as _log
from zoengine.run.resume import Checkpointer, ResumeError, check_base, restore
from zoengine.run.stops import hold_sigterm, mute_sigterm, sigterm_interrupts
from zoengine.run.strategies import make_strategy
from zoengine.storage.folder import RunFolder
from zoengine.tasks import TaskError, load_task


def plan_dtypes(cfg: RunConfig) -> tuple[str, ...]:
    """The dtypes a run may use: ``--dtype``, and with ``--max-memory`` and the default float32
    also bfloat16 (the planner takes the first that fits)."""
    return ("float32", "bfloat16") if cfg.max_memory and cfg.dtype == "float32" else (cfg.dtype,)


def load_dtype(cfg: RunConfig, task) -> str:
    """The dtype to load in. With ``--max-memory``, a first plan from the model folder's config
    alone (before any weight is read), so a model too large in float32 loads straight into
    bfloat16 instead of loading, then converting; the plan after loading decides the rest."""
    dtypes = plan_dtypes(cfg)
    if len(dtypes) == 1 or cfg.model == DEFAULT_MODEL:
        return dtypes[0]
    from transformers import AutoConfig

    from zoengine.sparsity import memory

    lm = task.kind == "lm"
    try:
        p = memory.plan(AutoConfig.from_pretrained(cfg.model), cfg.max_memory, cfg.method,
                        batch_size=cfg.batch_size, dtypes=dtypes,
                        seq_len=cfg.block_size if lm else cfg.max_length)
    except memory.MemoryBudgetError:
        return dtypes[-1]  # the plan after loading refuses, with the measured runtime
    return p.dtype


def make_optimizer(cfg: RunConfig, named_params, masks=None, distributed: str | None = None,
                   model=None, group=None):
    """``zoengine.optim.create(cfg.method, ...)`` with the run's lr, eps, seed and masks (DiZO:
    ``--dizo-interval`` and the projected set of ``--train``; its search data comes from the
    loop, through ``set_batch_source``), then the engine features: a data-parallel exchange
    (``set_distributed``, on process group ``group``: None for the default one) and
    ``--perturbation virtual`` (``attach_virtual(model)``). A DiZO
    set that matches nothing is refused here, before any step."""
    from zoengine.optim import create

    extra = {} if masks is None else {"masks": masks}
    if cfg.perturbation == "virtual" and cfg.train == "head":
        raise TaskError("--perturbation", "virtual applies to --train full or lora (the "
                                          "head trains option rows over cached features, "
                                          "read by no module)")
    exchange = None
    if distributed is not None:
        from zoengine.optim.exchange import ScalarExchange

        exchange = ScalarExchange(distributed, group, check_every=cfg.replica_check_every)
    if cfg.method == "dizo":
        # the projected set per --train: head -> the one tensor trained (the option rows),
        # lora -> every adapter A and B, full -> the attention's key/value weights (the
        # authors' code; a fused q/k/v weight whole), norms -> every gain trained
        extra["projected"] = cfg.dizo_projected or {"head": "all", "lora": "lora",
                                                    "full": "code", "norms": "all"}[cfg.train]
        if cfg.dizo_interval is not None:
            extra["interval"] = cfg.dizo_interval
    if cfg.update is not None:
        extra["update"] = cfg.update
    if cfg.momentum is not None:
        extra["momentum"] = cfg.momentum
    extra.update(method_kwargs(cfg))  # --n-samples, --weight-decay, the method's own flags
    try:
        opt = create(cfg.method, named_params, lr=cfg.lr, eps=cfg.eps, seed=cfg.seed, **extra)
    except (ValueError, TypeError) as exc:
        for name in method_kwargs(cfg):  # a value the method refuses, named by its flag
            if f"{name}=" in str(exc) or f"'{name}'" in str(exc):
                raise TaskError("--" + name.replace("_", "-"), f"{getattr(cfg, name)!r}: "
                                f"--method {cfg.method} refuses it: {exc}") from None
        if isinstance(exc, TypeError):
            raise
        if cfg.method == "dizo" and "matches no trainable" in str(exc):
            raise TaskError("--dizo-projected", f"{exc}; name the tensors to project with "
                                                "--dizo-projected (a regex of parameter "
                                                "names, or all)") from None
        if cfg.method == "dizo" and "not a valid regex" in str(exc):
            raise TaskError("--dizo-projected", str(exc)) from None
        if cfg.update is not None and "update=" in str(exc):  # a preset fixes or refuses it
            raise TaskError("--update", f"{exc}; leave --update out, or choose --method zo "
                                        "(or mezo) with --update") from None
        raise
    if exchange is not None:
        opt.set_distributed(exchange)
    if cfg.perturbation == "virtual":
        opt.attach_virtual(model)
    return opt


def prune_and_plan(cfg: RunConfig, task, model, tok):
    """``--prune``/``--keep-zeros`` (masks for full fine-tuning) and ``--max-memory`` (a plan
    applied to the batch size, sequence length and dtype). Returns (masks, plan or None)."""
    masks = None
    if cfg.prune or cfg.keep_zeros:
        if cfg.train == "head":
            raise TaskError("--prune" if cfg.prune else "--keep-zeros",
                            "sparsity is kept by full fine-tuning, masked LoRA and norms "
                            "training: add --train full, --train norms or --lora (the head "
                            "never touches the weights)")
        from zoengine.run.pruning import masks_for_run

        masks = masks_for_run(
            model, tok, prune_spec=cfg.prune, sparsity=cfg.prune_sparsity,
            keep_zeros=bool(cfg.keep_zeros),
            calib_task=cfg.task if task.kind == "lm" else "shakespeare", seed=cfg.seed, log=_log)
    if not cfg.max_memory:
        return masks, None
    from zoengine.sparsity import memory

    lm = task.kind == "lm"
    loaded = str(next(model.parameters()).dtype).removeprefix("torch.")
    dtypes = plan_dtypes(cfg)
    plan = memory.plan_for_run(model, cfg.max_memory, method=cfg.method,
                               batch_size=cfg.batch_size, dtypes=dtypes[dtypes.index(loaded):]
                               if loaded in dtypes else dtypes,
                               seq_len=cfg.block_size if lm else cfg.max_length,
                               masks=masks if cfg.train == "full" else None, log=_log)
    cfg.batch_size = plan.batch_size
    cfg.eval_batch_size = min(cfg.eval_batch_size, plan.batch_size)  # the budget covers eval too
    if lm:
        cfg.block_size = plan.seq_len
    else:
        cfg.max_length = plan.seq_len
    if plan.dtype != loaded:
        model.to(getattr(torch, plan.dtype))
    memory.reset_peak()
    return masks, plan


def _gain(report: dict) -> dict:
    b, a = report["before"]["test"], report["after"]["test"]
    return {"auc": a["auc"] - b["auc"], "accuracy": a["accuracy"] - b["accuracy"],
            "accuracy_vs_calibrated_baseline": a["accuracy"] - b["calibrated_accuracy"],
            "beats_calibrated_baseline": bool(a["accuracy"] > b["calibrated_accuracy"]
                                              and a["auc"] > b["auc"])}


def journal_fsync(value: str) -> str | int:
    """``--journal-fsync`` (checked by ``RunConfig``): ``"step"``, ``"checkpoint"`` or a
    number of steps."""
    v = str(value)
    return v if v in ("step", "checkpoint") else int(v)


def run_task(cfg: RunConfig):
    """The task ``cfg`` names, with its template, options, columns and block size."""
    if cfg.data_dir is not None:  # a task read from a folder (docs/tasks.md)
        return load_task(cfg.task, seed=cfg.seed, data_dir=cfg.data_dir,
                         split_sizes=cfg.split_sizes)
    return load_task(cfg.task, seed=cfg.seed, template=cfg.template, options=cfg.options,
                     text_column=cfg.text_column, label_column=cfg.label_column,
                     block_size=cfg.block_size)


def setup(cfg: RunConfig, task, report: dict, distributed: str | None = None,
          ranks: Ranks | None = None):
    """Model, pruning/plan, LoRA, strategy and optimizer of a run on ``task`` (no training).
    ``ranks``: a launch's ranks (their mode and step group replace ``distributed``); they
    meet at a barrier before the optimizer's first collective."""
    _log(f"loading model {cfg.model} ...")
    crashpoint("model-load")
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, load_dtype(cfg, task))
    report["timing"]["load_s"] = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    check_objective(cfg, task)
    teacher = teacher_for_run(cfg, task, model, tok, log=_log)  # dense: before any pruning
    masks, plan = prune_and_plan(cfg, task, model, tok)
    if cfg.train == "lora":
        if isinstance(masks, str):  # --keep-zeros: the zeros the given model holds, by name
            from zoengine.sparsity import masks_from_zeros

            masks = masks_from_zeros(model)
        model = lora_for_run(cfg, model, masks)  # a pruned base: the deltas are masked
    elif cfg.train == "norms":
        norms_for_run(model)
    strategy = make_strategy(cfg, task, model, tok, log=_log, teacher=teacher)
    report["timing"].update(strategy.timing)
    if teacher is not None:
        report["teacher_cache"] = {"disk_bytes": teacher.disk_bytes, "blocks": len(teacher),
                                   "top_k": teacher.k}
    params = strategy.named_params()
    report["trainable_params"] = int(sum(p.numel() for _, p in params))
    group = None
    if ranks is not None:
        ranks.barrier()  # every rank loaded: a rank that died or hangs is named here
        distributed, group = ranks.distributed, ranks.steps_group
    opt = make_optimizer(cfg, params, masks=masks if cfg.train == "full" else None,
                         distributed=distributed, model=model, group=group)
    if cfg.train == "full" and isinstance(masks, dict):
        # the optimizer keeps them as bits; the report needs only the names (the bool tensors
        # are 101 MiB for SmolLM2, ~8 % of its pruned inference peak)
        masks = dict.fromkeys(masks)
    return model, tok, masks, plan, strategy, opt


def resolve(cfg: RunConfig):
    """(``cfg`` with every default filled in for its task, the task); an LM task with a head
    is refused."""
    task = run_task(cfg)
    cfg = cfg.resolved(task)
    check_nondiff(cfg, task)  # --objective accuracy / f1 fits the task (before any model loads)
    check_controls(cfg)
    if task.kind == "lm" and cfg.train == "head":
        raise TaskError("--train", "head trains classification options; an LM task needs "
                                   "--train full or --lora")
    return cfg, task


def run_train(cfg: RunConfig, *, resume: bool = False) -> dict:
    """Load, evaluate, train, evaluate, write outputs. Returns the report (metrics.json).

    Every step is journaled (``<output_dir>/journal.zoj``) and the trained tensors are
    checkpointed every ``checkpoint_every`` steps / ``checkpoint_minutes`` minutes; with
    ``resume=True`` the run in ``output_dir`` continues from its last checkpoint and journal
    (``zoengine.run.resume``). Under torchrun the ranks train data-parallel and rank 0 writes
    (``zoengine.run.ranks``). SIGTERM interrupts the run as Ctrl-C does (``Interrupted``); a
    rank that dies or hangs stops the others with ``RankStopped``; both say the phase and what
    the output folder holds (``zoengine.run.stops``)."""
    t_start = time.perf_counter()
    ranks = Ranks()
    with sigterm_interrupts():
        try:
            out = _train(cfg, resume, ranks.join(), t_start)
            mute_sigterm()  # finished: a SIGTERM from now on changes nothing
            return out
        except BaseException as exc:
            if not ranks.stops(exc):
                raise
            raise ranks.stopped(exc) from exc
        finally:
            ranks.close()


def _train(cfg: RunConfig, resume: bool, ranks: Ranks, t_start: float) -> dict:
    # the thread count changes a forward's summation order, hence the losses: it is recorded
    # in run.json and a resume uses the recorded one (zoengine.run.resume)
    threads = cfg.threads or auto_threads()
    torch.set_num_threads(threads)
    cfg, task = resolve(cfg)
    cfg.threads = threads
    ranks.output_dir = cfg.output_dir
    fsync = journal_fsync(cfg.journal_fsync)
    folder = RunFolder(cfg.output_dir, log=_log)
    try:
        ranks.phase = ("taking the output folder" if ranks.main else
                       "waiting for rank 0 to take the output folder")
        if ranks.main:
            check_output_dir(cfg.output_dir)  # before anything is created or written
            folder.acquire()  # lock, writable, crash recovery
            check_fresh_or_resumable(folder, resume)
            save_run_config(folder, cfg)
        ranks.barrier()
        report = {"config": asdict(cfg), "timing": {},
                  "torch_threads": torch.get_num_threads(), "ranks": ranks.world}
        ranks.phase = "loading the model"
        model, tok, masks, plan, strategy, opt = setup(cfg, task, report, ranks=ranks)
        ranks.phase = "evaluating before training"
        t1 = time.perf_counter()
        report["before"] = strategy.evaluate()
        report["timing"]["eval_before_s"] = time.perf_counter() - t1
        progress = start_journal(cfg, folder, strategy, opt, report, resume, fsync, ranks)
        ck = (Checkpointer(folder, strategy, opt, every=cfg.checkpoint_every,
                           minutes=cfg.checkpoint_minutes, after_dev=bool(cfg.keep_best))
              if ranks.main else None)
        ranks.phase = "training"
        progress = run_loop(cfg, strategy, opt, report, log=_log, progress=progress,
                            on_step=ck, data_stream=ranks.data_stream)
        opt.close_journal()
        ranks.phase = "evaluating after training"
        finish_report(cfg, task, model, masks, plan, strategy, report, progress)
        if ranks.world > 1:
            _log(f"rank {ranks.rank}: trained tensors sha256 "
                 f"{tensors_hash(strategy.named_params())}")
        ranks.phase = "writing the outputs"
        with hold_sigterm():  # a SIGTERM now waits for the commit: the outputs are complete
            out = report if not ranks.main else write_outputs(
                cfg, report, strategy.trained(), tok, t_start, folder,
                masks=masks if isinstance(masks, dict) else None)
            ranks.phase = ("at the final barrier, after writing the outputs" if ranks.main
                           else "at the final barrier, waiting for rank 0 to write the outputs")
        crashpoint("final-barrier")
        ranks.barrier()  # leave the group together: a rank tearing gloo down early aborted
        return out
    finally:
        folder.release()


def save_run_config(folder: RunFolder, cfg: RunConfig) -> None:
    """``run.json``: the resolved configuration (the thread count included), which
    ``--resume`` reads back; committed in the manifest, so it is verified on resume."""
    folder.write_run_config((json.dumps(asdict(cfg), indent=2) + "\n").encode())


def start_journal(cfg, folder, strategy, opt, report, resume, fsync, ranks):
    """Resume (checkpoint + journal replay) when asked, then journal every following step
    (rank 0 only: every rank's records would be the same)."""
    progress = None
    dev0 = {"step": 0, **dev_point_of(report["before"])}
    if resume:
        check_base(folder.journal_path, strategy.named_params())
        folder.verify_journal(flag="--resume")
        progress = restore(folder, strategy, opt, dev0, log=_log)
        if progress.step > cfg.steps:  # resume_config refuses it first; never write over it
            raise ResumeError(f"--steps {cfg.steps} is lower than the {progress.step} steps "
                              f"{folder.path} has done; allowed: >= {progress.step}", "--steps")
        _log(f"resume: continuing at step {progress.step} of {cfg.steps}")
    ranks.barrier()  # every rank has read the journal before rank 0 appends to it
    if ranks.main:
        opt.set_journal(folder.journal_path, fsync=fsync, meta={"run_config": asdict(cfg)})
    return progress


def finish_report(cfg, task, model, masks, plan, strategy, report, progress=None) -> None:
    """Evaluate after training (``--keep-best``: then the best dev step's weights) and add the
    gain, sparsity and memory sections."""
    t2 = time.perf_counter()
    report["after"] = strategy.evaluate()
    report["timing"]["eval_after_s"] = time.perf_counter() - t2
    finish_curve(report, report.get("stopped", {}).get("step", cfg.steps))
    if progress is not None:
        finish_best(cfg, strategy, report, progress, log=_log)
    if task.kind == "classification":
        report["gain"] = _gain(report)
    if (cfg.prune or cfg.keep_zeros) and cfg.train == "lora" and isinstance(masks, dict):
        from zoengine.sparsity.lora import merged_sparsity  # what `zoengine merge` will write

        report["sparsity_after"] = merged_sparsity(model, list(masks))
    elif cfg.prune or cfg.keep_zeros:
        from zoengine.sparsity import sparsity_report

        report["sparsity_after"] = sparsity_report(model, masks if isinstance(masks, dict)
                                                   else None)
    if cfg.max_memory:
        from zoengine.sparsity import memory

        report["memory"] = memory.report_peak(plan, log=_log)


def write_outputs(cfg: RunConfig, report: dict, trained, tok, t_start: float,
                  folder: RunFolder | None = None, masks=None) -> dict:
    """Weights, curve.png and metrics.json, committed together by the folder's manifest (a
    kill leaves the previous outputs or these, never a mix); then the folder's lock is
    released. ``folder``: the acquired ``RunFolder`` (None: acquired here)."""
    name, write_weights = weights_writer(cfg, trained, tok)
    report["weights"] = name
    report["timing"]["total_s"] = time.perf_counter() - t_start
    folder = folder or RunFolder(cfg.output_dir, log=_log).acquire()
    try:
        files = {name: write_weights, **curve_files(report, log=_log),
                 "metrics.json": run_summary_json(report)}
        if masks and cfg.train == "lora":  # `zoengine merge` rebuilds the pruned base from them
            files[MASKS_FILE] = masks_writer(masks)
        folder.write_final(files, weights=name,
                           journal_records=report.get("stopped", {}).get("step", cfg.steps)
                           if os.path.exists(folder.journal_path) else None)
    finally:
        folder.release()
    for line in summary_lines(report):
        _log(line)
    curve = "curve.png, " if "curve.png" in files else ""
    _log(f"wrote {cfg.output_dir}/metrics.json, {curve}{report['weights']}")
    return report
