"""Ship a fine-tune as its journal: ``zoengine export-journal RUN OUT`` copies a run's verified
journal (a few hundred bytes a step); ``zoengine apply-journal BASE JOURNAL OUT`` rebuilds the
trained weights from the base model and that journal without a forward pass, after checking
that the base is the one the run started from (SHA-256 of the trained tensors' start)."""

from __future__ import annotations

import os
import shutil
import time

import torch

from zoengine.journal import JournalError, read_header, replay
from zoengine.run.config import RunConfig
from zoengine.run.report import weights_writer
from zoengine.run.strategies import initial_head, trainable
from zoengine.storage.folder import RunFolder
from zoengine.storage.fsio import atomic_write
from zoengine.tasks import OptionScorer, TaskError


def export_journal(run: str, out: str) -> None:
    """Verify ``run``'s journal against its manifest and write it to ``out`` atomically."""
    folder = RunFolder(run)
    if not os.path.exists(folder.journal_path):
        raise TaskError("run", f"{run!r} holds no journal (journal.zoj)")
    folder.verify_journal(flag="run")
    read_header(folder.journal_path)  # a journal, not something else with that name
    with open(folder.journal_path, "rb") as f:
        atomic_write(out, f.read())
    size = os.path.getsize(out)
    print(f"wrote {out} ({size:,} bytes); rebuild the weights with: zoengine apply-journal "
          f"BASE {out} OUT", flush=True)


def _trained_tensors(cfg: RunConfig, model, tok):
    """(named tensors the run trained, in their starting state; what to save afterwards)."""
    from zoengine.run.job import prune_and_plan, run_task
    from zoengine.run.lora import apply_lora
    from zoengine.run.norms import norms_for_run

    task = run_task(cfg)

    torch.manual_seed(cfg.seed)
    masks, _ = prune_and_plan(cfg, task, model, tok)
    if cfg.train == "head":
        ids, rows, bias = initial_head(model, OptionScorer(tok, task.options))
        saved = {"head_rows": rows, "head_bias": bias, "option_token_ids": torch.tensor(ids)}
        return [("head_rows", rows)], masks, saved
    if cfg.train == "lora":
        model = apply_lora(cfg, model)
    elif cfg.train == "norms":
        norms_for_run(model)
    return trainable(model), masks, model


def apply_journal(base: str, journal: str, out: str) -> None:
    """Rebuild the weights of the run recorded in ``journal`` from ``base`` into ``out``."""
    from zoengine.run.resources import load_model

    try:
        header, _ = read_header(journal)
    except (OSError, JournalError) as exc:
        raise TaskError("journal", str(exc)) from None
    if "run_config" not in header:
        raise TaskError("journal", f"{journal!r} was not written by `zoengine train` (no run "
                                   "configuration): use zoengine.journal.replay in Python")
    cfg = RunConfig(**{**header["run_config"], "model": base, "progress": False})
    t0 = time.perf_counter()
    model, tok = load_model(base)
    named, masks, trained = _trained_tensors(cfg, model, tok)
    try:
        replay(named, journal, masks=masks if isinstance(masks, dict) else None)
    except JournalError as exc:
        raise TaskError("base" if "starting weights" in str(exc) else "journal",
                        str(exc)) from None
    name, write = weights_writer(cfg, trained, tok)
    os.makedirs(out, exist_ok=True)
    target, tmp = os.path.join(out, name), os.path.join(out, f".{name}.tmp-{os.getpid()}")
    write(tmp)
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.replace(tmp, target)
    print(f"rebuilt {target} from {base} + {journal} in {time.perf_counter() - t0:.1f} s "
          "(no forward pass)", flush=True)
