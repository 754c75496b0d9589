"""Ship a fine-tune as its journal: ``zoengine export-journal RUN OUT`` writes a run's verified
journal with a trailer holding its record count and SHA-256 (a few hundred bytes a step);
``zoengine apply-journal BASE JOURNAL OUT`` verifies that journal whole, then rebuilds the
trained weights from the base model without a forward pass, in the run's dtype, after checking
that the base is the one the run started from (SHA-256 of the trained tensors' start).

What apply-journal accepts (docs/reliability.md, "Shipped journals"): a shipped journal whose
trailer, length, SHA-256 and record count all agree (``zoengine.journal.read_shipped``), or a
run folder's own ``journal.zoj`` in place, whose prefix its manifest verifies (a live journal:
a torn last record is legitimate there). Anything else is refused, exit 2, naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import torch

from zoengine.journal import (
    JournalError,
    is_shipped,
    read_header,
    read_shipped,
    replay,
    shipped_bytes,
    tensors_hash,
)
from zoengine.run.config import DTYPES, RunConfig
from zoengine.run.report import weights_writer
from zoengine.run.strategies import initial_head, trainable
from zoengine.storage.folder import RunFolder
from zoengine.storage.fsio import atomic_write
from zoengine.storage.layout import JOURNAL
from zoengine.storage.manifest import MANIFEST, IntegrityError, read_manifest
from zoengine.tasks import OptionScorer, TaskError


def export_journal(run: str, out: str) -> None:
    """Verify ``run``'s journal against its manifest and write its shipped form (the records,
    a torn tail dropped, then the trailer: count and SHA-256) to ``out`` atomically."""
    folder = RunFolder(run)
    if not os.path.exists(folder.journal_path):
        raise TaskError("run", f"{run!r} holds no journal (journal.zoj)")
    if os.path.isdir(out):
        raise TaskError("out", f"{out!r} is a folder: OUT is the journal file to write")
    folder.verify_journal(flag="run")
    try:
        data, records = shipped_bytes(folder.journal_path)
    except JournalError as exc:
        raise TaskError("run", str(exc)) from None
    atomic_write(out, data)
    state = (folder.manifest() or {}).get("state")
    if state != "complete":
        print(f"note: {run} is not a completed run (state {state!r}): {out} ships the "
              f"{records} steps its journal holds", flush=True)
    print(f"wrote {out} ({len(data):,} bytes, {records} steps, SHA-256 in its trailer); "
          f"rebuild the weights with: zoengine apply-journal BASE {out} OUT", flush=True)


def _in_run_folder(journal: str) -> RunFolder | None:
    """The run folder whose own ``journal.zoj`` ``journal`` is, when its manifest names it."""
    parent = os.path.dirname(os.path.abspath(journal))
    if os.path.basename(journal) != JOURNAL or not os.path.exists(os.path.join(parent,
                                                                               MANIFEST)):
        return None
    try:
        body = read_manifest(parent) or {}
    except IntegrityError:
        return None
    return RunFolder(parent) if body.get("kind") == "run" and body.get("journal") else None


def verified_journal(journal: str) -> dict:
    """The header of ``journal`` once verified as complete: a shipped journal whole (trailer,
    SHA-256, record count, every record), or a run folder's own journal against its manifest.
    ``TaskError`` (flag ``journal``, exit 2) naming the file and what is wrong otherwise."""
    if not os.path.isfile(journal):
        raise TaskError("journal", f"{journal!r}: no such file")
    try:
        if is_shipped(journal):
            return read_shipped(journal)[0]
        folder = _in_run_folder(journal)
        if folder is None:
            read_shipped(journal)  # raises, saying why this is not a shipped journal
        folder.verify_journal(flag="journal")
        return read_header(journal)[0]
    except (OSError, JournalError, IntegrityError) as exc:
        raise TaskError("journal", str(exc)) from None


def _trained_tensors(cfg: RunConfig, task, model, tok):
    """(named tensors the run trained, in their starting state; what to save afterwards)."""
    from zoengine.run.job import prune_and_plan
    from zoengine.run.lora import apply_lora
    from zoengine.run.norms import norms_for_run

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


def run_dtypes(cfg: RunConfig, header: dict, task) -> list[str]:
    """The dtypes the run may have loaded its model in, most likely first: for full and norms
    training the dtype the journal records for the trained tensors; then ``--dtype`` as the
    run resolved it (with ``--max-memory``, the plan from the model's config); then the other
    dtypes that plan could have picked after loading."""
    from zoengine.run.job import load_dtype, plan_dtypes

    stored = {d for d in header.get("dtypes") or [] if d in DTYPES}
    first = [next(iter(stored))] if cfg.train in ("full", "norms") and len(stored) == 1 else []
    return list(dict.fromkeys([*first, load_dtype(cfg, task), *plan_dtypes(cfg)]))


def apply_journal(base: str, journal: str, out: str) -> None:
    """Rebuild the weights of the run recorded in ``journal`` from ``base`` into ``out``, in the
    run's dtype (its ``--dtype``, or what its ``--max-memory`` plan chose)."""
    from zoengine.run.job import run_task
    from zoengine.run.resources import load_model

    header = verified_journal(journal)
    if "run_config" not in header:
        raise TaskError("journal", f"{journal!r} was not written by `zoengine train` (no run "
                                   "configuration): use zoengine.journal.replay in Python")
    cfg = RunConfig(**{**header["run_config"], "model": base, "progress": False})
    t0 = time.perf_counter()
    task = run_task(cfg)
    # the memory plan is not redone here (it measures this process): its dtype is tried below
    plain = dataclasses.replace(cfg, max_memory=None)
    start = header.get("base_sha256") if header.get("start_step", 0) == 0 else None
    tried = run_dtypes(cfg, header, task)
    for dtype in tried:
        model, tok = load_model(base, dtype)
        named, masks, trained = _trained_tensors(plain, task, model, tok)
        if not start or tensors_hash(named) == start:
            break
    else:
        raise TaskError("base", f"{base!r} loaded in {' or '.join(tried)} does not give the "
                                "run's starting weights (SHA-256 differs from the journal's "
                                "base_sha256): pass the base model the run started from")
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
    print(f"rebuilt {target} ({dtype}) from {base} + {journal} in "
          f"{time.perf_counter() - t0:.1f} s (no forward pass)", flush=True)
