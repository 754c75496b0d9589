"""Whether a run may take its ``--output-dir``, checked before anything is written there: a
new, empty or zoengine run folder only (``check_output_dir``), and a fresh run or ``--resume``
that matches what the folder holds (``check_fresh_or_resumable``; docs/reliability.md, "Edges").
"""

from __future__ import annotations

import os

from zoengine.run.resources import log as _log
from zoengine.run.resume import ResumeError, journal_steps
from zoengine.storage.folder import RunFolder
from zoengine.storage.layout import JOURNAL, RUN_CONFIG
from zoengine.storage.lock import LOCK_NAME
from zoengine.storage.manifest import MANIFEST, read_manifest
from zoengine.tasks import TaskError

# what a run folder holds besides its outputs: a folder holding one of these is a zoengine run
RUN_MARKERS = (MANIFEST, RUN_CONFIG, JOURNAL, LOCK_NAME)


def check_output_dir(path) -> None:
    """``--output-dir`` must name a new folder, an empty one or a zoengine run folder: ``""``
    (the current folder), the root of the file system and a non-empty folder that holds no
    run (or another kind of zoengine folder, e.g. a pruned model) are refused, before
    anything is written."""
    allowed = "allowed: a new folder, an empty folder or a zoengine run folder"
    if path is None or not str(path).strip():
        raise TaskError("--output-dir", f"{path!r}: empty (it would write into the current "
                                        f"folder); {allowed}")
    real = os.path.realpath(str(path))
    if real == os.path.dirname(real):
        raise TaskError("--output-dir", f"{str(path)!r}: the root of the file system; {allowed}")
    if not os.path.isdir(real):
        return
    names = sorted(os.listdir(real))
    if not names:
        return
    kind = "run"
    if os.path.exists(os.path.join(real, MANIFEST)):
        try:
            kind = (read_manifest(real) or {}).get("kind", "run")
        except ValueError:  # damaged: the run checks say so, naming the file
            kind = "run"
    if kind != "run" or not any(n in RUN_MARKERS for n in names):
        what = f"a zoengine {kind} folder" if kind != "run" else "other files"
        raise TaskError("--output-dir", f"{str(path)!r} is an existing folder holding {what} "
                                        f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                                        f" and no zoengine run; {allowed}")


def check_fresh_or_resumable(folder: RunFolder, resume: bool) -> None:
    """The folder rules of docs/reliability.md ("Edges"): a completed run is never modified
    by a new run; a fresh run must not start over an interrupted one (its checkpoint or
    journal would be mixed with the new run's); ``--resume`` needs an unfinished run. A folder
    where no step was committed (no checkpoint, no journal record: a run that died in set-up,
    or a journal whose header never reached the disk) holds nothing trained: a fresh run takes
    it over and ``--resume`` starts it from step 0."""
    body = folder.manifest() or {}
    done = body.get("state") == "complete"
    ck = body.get("checkpoint")
    steps = journal_steps(folder.journal_path)
    started = bool(body) or any(os.path.exists(os.path.join(folder.path, f))
                                for f in (RUN_CONFIG, JOURNAL))
    trained = bool(ck) or steps is None or steps > 0
    if resume:
        if done or not started:
            raise ResumeError(f"{folder.path} holds {'a completed run' if done else 'no run'}: "
                              "nothing to resume")
        if not trained and os.path.exists(folder.journal_path):
            _log(f"{folder.path}: its journal holds no step ({_journal_state(folder)}); "
                 "resuming from step 0")
            os.remove(folder.journal_path)
        return
    if done:
        raise ResumeError(f"{folder.path} holds a completed run, and a new run never modifies "
                          "one: pass another --output-dir (or move or delete that folder "
                          "first)", "--output-dir")
    if trained:
        what = ("its journal cannot be read" if steps is None else
                f"{steps} journaled steps" + (f", a checkpoint at step {ck['step']}" if ck
                                              else ""))
        raise ResumeError(f"{folder.path} holds an interrupted run ({what}): continue it with "
                          f"`zoengine train --resume {folder.path}`, or choose another "
                          "--output-dir", "--output-dir")
    if started:
        _log(f"{folder.path}: taking over the folder of a run that never committed a step "
             f"(no checkpoint, {_journal_state(folder)}): nothing trained is lost")
        if os.path.exists(folder.journal_path):
            os.remove(folder.journal_path)


def _journal_state(folder: RunFolder) -> str:
    path = folder.journal_path
    if not os.path.exists(path):
        return "no journal"
    size = os.path.getsize(path)
    return "an empty journal" if size == 0 else f"a journal of {size} bytes and no record"
