"""``--objective kd | kd+lm``: distillation from the dense model while recovering a pruned one.

The teacher's top-k logits over the first ``--kd-blocks`` training blocks are stored once, before
pruning, in the run folder (``teacher_cache/``), and the step's loss reads them from disk, so the
teacher is never resident while training (docs/distillation.md).
"""

from __future__ import annotations

import os

from zoengine.tasks import TaskError

TEACHER_DIR = "teacher_cache"


def kd_weight(cfg) -> float:
    """The KD term's weight: 1 for ``kd``, ``--kd-weight`` for ``kd+lm``, 0 for ``lm``."""
    return {"lm": 0.0, "kd": 1.0}.get(cfg.objective, cfg.kd_weight)


def check_objective(cfg, task) -> None:
    if cfg.objective not in ("kd", "kd+lm"):  # accuracy / f1: run/objectives.py
        return
    if task.kind != "lm":
        raise TaskError("--objective", f"{cfg.objective!r} distils next-token distributions: "
                                       "it needs an LM task (e.g. --task shakespeare)")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise TaskError("--objective", f"{cfg.objective!r} under torchrun is not supported yet "
                                       "(every rank would build the teacher cache); run one "
                                       "process")


def teacher_for_run(cfg, task, model, tok, log=print):
    """The teacher cache of this run (built from ``model`` now, before any pruning, or opened
    when a resumed run already has it), or None for any other ``--objective``."""
    if cfg.objective not in ("kd", "kd+lm"):
        return None
    from zoengine.tasks import TeacherCache, build_teacher_cache, lm_blocks

    blocks = lm_blocks(tok, task.splits["train"]["text"][0], cfg.block_size)[:cfg.kd_blocks]
    path = os.path.join(cfg.output_dir, TEACHER_DIR)
    if os.path.isdir(path):  # a resumed run: the model may be pruned already, never rebuild
        cache = TeacherCache.open(path, blocks)
        log(f"teacher cache: {cache.describe()}")
        return cache
    log(f"teacher cache: top-{cfg.kd_top_k} logits of the dense model over {len(blocks)} "
        f"blocks of {cfg.block_size} tokens ...")
    cache = build_teacher_cache(model, blocks, path, k=cfg.kd_top_k,
                                progress=bool(getattr(cfg, "progress", True)))
    log(f"teacher cache: {cache.describe()}")
    return cache
