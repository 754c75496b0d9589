"""A run's output folder that is always consistent (docs/reliability.md)::

    manifest.json                 the commit point: names every trusted file (size, SHA-256)
    .zoengine.lock                the live run's lock (pid, host; zoengine.storage.lock)
    journal.zoj                   the step journal (zoengine.journal)
    checkpoints/step-<n>/         weights.safetensors, optimizer.pt, state.json
    head.safetensors | model/ | adapter/, curve.png, metrics.json     the final outputs

**Checkpoint**: written into a temp folder, fsynced, renamed to ``step-<n>``; then the manifest
names it; only then is the previous checkpoint deleted. **Final outputs**: a two-phase commit
(zoengine.storage.commit): each is written under a temp name and fsynced; the manifest flips to
``complete`` naming them all (the temp names recorded as ``pending``); then each temp is renamed
onto its name, leftovers are deleted and the manifest is rewritten without ``pending``. A kill at
any moment leaves the old state or the new one: ``acquire()`` finishes a pending commit (roll
forward) and removes what a killed save left, and readers look up pending names (``locate``).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import weakref
from collections.abc import Callable

from zoengine.faults import crashpoint
from zoengine.hashing import sha256_file
from zoengine.storage import fsio
from zoengine.storage.checkpoint import (
    CHECKPOINT_FILES,
    SaveError,
    encode_extra,
    nonfinite,
    read_checkpoint_files,
    save_error,
    write_checkpoint_dir,
)
from zoengine.storage.cleanup import remove_unnamed_checkpoints
from zoengine.storage.commit import finish_pending, stage
from zoengine.storage.final import FINAL_OUTPUTS, check_final_names, final_body, refuse_nonfinite
from zoengine.storage.fsio import atomic_write, clean_stale_temps
from zoengine.storage.layout import CHECKPOINTS, JOURNAL, RESERVED, RUN_CONFIG
from zoengine.storage.lock import FolderError, FolderLock, LockedError
from zoengine.storage.manifest import (
    MANIFEST,
    IntegrityError,
    entries_of,
    file_entry,
    read_manifest,
    verify_file,
    verify_under,
    write_manifest,
)

__all__ = ["CHECKPOINTS", "JOURNAL", "RUN_CONFIG", "FolderError", "IntegrityError", "LockedError",
           "RunFolder", "SaveError", "atomic_write", "clean_stale_temps", "nonfinite"]

_HELD: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _release_all() -> None:
    """A run that ended by an exception without ``release()`` still leaves no lock file."""
    for folder in list(_HELD):
        folder.release()


class RunFolder:
    """The output folder of one run. Writers ``acquire()`` it first (lock, writability probe,
    crash recovery) or use it as a context manager; readers need no lock."""

    def __init__(self, path: str, *, log: Callable[[str], None] | None = None):
        self.path = os.path.abspath(path)
        self.log = log or (lambda _msg: None)
        self._lock = FolderLock(self.path)

    @property
    def journal_path(self) -> str:
        return os.path.join(self.path, JOURNAL)

    @property
    def held(self) -> bool:
        return self._lock.held

    def __enter__(self) -> RunFolder:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- lock and set-up ------------------------------------------------------------------

    def acquire(self) -> RunFolder:
        """Create the folder, check it is writable, take its lock, finish or clean what a
        killed run left. Raises ``FolderError`` (``.flag == "--output-dir"``) naming the
        folder: a file, not creatable, not writable, or locked by a live run."""
        if self.held:
            return self
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise FolderError(f"{self.path} is an existing file, not a folder; choose another "
                              "--output-dir")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise FolderError(f"cannot create the output folder {self.path} "
                              f"({exc.strerror or exc})") from None
        self._probe()
        try:
            previous = self._lock.acquire()
        except OSError as exc:
            raise FolderError(f"cannot lock the output folder {self.path} "
                              f"({exc.strerror or exc})") from None
        try:
            self.recover()
        except BaseException:
            self._lock.release()
            raise
        _HELD.add(self)
        if previous is not None and previous.get("pid") != os.getpid():
            self.log(f"took over the stale lock of pid {previous.get('pid')} on host "
                     f"{previous.get('host')} (that run is dead)")
        return self

    def _probe(self) -> None:
        """Create, fsync and remove a file: a read-only folder fails here, before training."""
        try:
            fsio.probe_writable(self.path)
        except OSError as exc:
            raise FolderError(f"the output folder {self.path} is not writable "
                              f"({exc.strerror or exc}); zoengine writes its outputs, "
                              "checkpoints and journal there: choose another --output-dir"
                              ) from None

    def release(self) -> None:
        _HELD.discard(self)
        self._lock.release()

    def _need_lock(self) -> None:
        if not self.held:
            raise RuntimeError(f"RunFolder({self.path!r}): call acquire() before writing")

    def recover(self) -> None:
        """Finish a pending commit, delete unnamed checkpoints and dead processes' temps."""
        self._need_lock()
        body = read_manifest(self.path)
        if body is not None and body.get("pending"):
            self.log(f"{self.path}: finishing the save a killed run left half done")
            self._finish_commit(body)
        remove_unnamed_checkpoints(self.path, body)
        clean_stale_temps(self.path)

    # ---- reading --------------------------------------------------------------------------

    def manifest(self) -> dict | None:
        """The verified manifest body (None: no manifest yet)."""
        return read_manifest(self.path)

    def _body(self, flag: str | None = None) -> dict:
        body = self.manifest()
        if body is None:
            raise IntegrityError(f"{self.path} has no {MANIFEST}: no save of zoengine is "
                                 "complete there", path=self.path, flag=flag)
        return body

    def verify_file(self, relpath: str, *, flag: str | None = None) -> str:
        """Check a named file against the manifest; returns where it lies."""
        return verify_file(self.path, self._body(flag), relpath, flag=flag)

    def verify(self, *, flag: str | None = None) -> dict:
        """Check every file the manifest names, and the journal's recorded prefix."""
        body = self._body(flag)
        for name in body.get("files", {}):
            verify_file(self.path, body, name, flag=flag)
        self.verify_journal(flag=flag)
        return body

    def final_weights(self, *, flag: str | None = None) -> str:
        """The final weights (file or folder) of a completed run, verified; raises
        ``IntegrityError`` when the run never completed. A live writer's commit between
        reading the manifest and the files is retried (the manifest's generation moved on)."""
        for _ in range(3):
            body = self._body(flag)
            final = body.get("final") or {}
            if not final.get("weights"):
                ck = body.get("checkpoint")
                at = f"; its last checkpoint is step {ck['step']}" if ck else ""
                raise IntegrityError(f"{self.path} holds no completed run{at}",
                                     path=self.path, flag=flag)
            try:
                return verify_under(self.path, body, final["weights"], flag=flag)
            except IntegrityError:
                if self._on_disk_generation() == body["generation"]:
                    raise
        raise IntegrityError(f"{self.path} kept changing while it was read (a live run is "
                             "writing it); try again", path=self.path, flag=flag)

    def verify_journal(self, *, flag: str | None = None) -> int | None:
        """Check the journal's prefix recorded by the last save (size, SHA-256); returns its
        record count then (None: no journal recorded)."""
        body = self.manifest() or {}
        j = body.get("journal")
        if not j:
            return None
        if not os.path.exists(self.journal_path):
            raise IntegrityError(f"{self.journal_path}: missing, though {MANIFEST} names it",
                                 path=self.journal_path, flag=flag)
        if fsio.sha256_prefix(self.journal_path, j["size"]) != j["sha256"]:
            raise IntegrityError(f"{self.journal_path}: corrupted or truncated: its first "
                                 f"{j['size']} bytes do not match {MANIFEST}'s SHA-256",
                                 path=self.journal_path, flag=flag)
        return j.get("records")

    def read_run_config(self, *, flag: str | None = None) -> tuple[bytes, bool] | None:
        """(bytes of ``run.json``, verified): verified against the manifest when it names the
        file (a mismatch raises ``IntegrityError``); ``verified`` False for a ``run.json`` the
        manifest does not name (written by a zoengine before 0.3). None when there is none."""
        body = self.manifest()
        if body is not None and RUN_CONFIG in body.get("files", {}):
            path = verify_file(self.path, body, RUN_CONFIG, flag=flag)
            with open(path, "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != body["files"][RUN_CONFIG]["sha256"]:
                raise IntegrityError(f"{path}: changed while it was read", path=path, flag=flag)
            return data, True
        path = os.path.join(self.path, RUN_CONFIG)
        try:
            with open(path, "rb") as f:
                return f.read(), False
        except FileNotFoundError:
            return None

    def load_checkpoint(self, *, flag: str | None = None):
        """``(step, tensors, optimizer_state, extra)`` of the checkpoint the manifest names,
        every file verified and the tensors checked finite; None when there is none."""
        body = self.manifest()
        ck = (body or {}).get("checkpoint")
        if not ck:
            return None
        paths = {f: verify_file(self.path, body, f"{ck['dir']}/{f}", flag=flag)
                 for f in CHECKPOINT_FILES}
        return (int(ck["step"]), *read_checkpoint_files(paths, flag=flag))

    # ---- writing --------------------------------------------------------------------------

    def _empty(self) -> dict:
        return {"kind": "run", "generation": 0, "state": "empty", "files": {},
                "checkpoint": None, "final": None, "journal": None}

    def _current(self) -> dict:
        """The manifest a writer builds on, a pending commit finished first."""
        body = self.manifest()
        if body is not None and body.get("pending"):
            self._finish_commit(body)
        return body or self._empty()

    def _on_disk_generation(self) -> int | None:
        try:
            return (read_manifest(self.path) or {}).get("generation")
        except IntegrityError:
            return None

    def _journal_info(self, records: int | None) -> dict | None:
        if not os.path.exists(self.journal_path):
            return None
        size, digest = sha256_file(self.journal_path)
        return {"records": records, "size": size, "sha256": digest}

    def _save_error(self, exc: BaseException, what: str, body: dict) -> BaseException:
        ck = body.get("checkpoint")
        kept = ("the outputs the folder held before are intact" if what == FINAL_OUTPUTS
                else f"the previous checkpoint (step {ck['step']}) is intact" if ck
                else "what the folder held before is intact")
        return save_error(exc, what, self.path, kept)

    def write_run_config(self, data: bytes) -> None:
        """Commit ``run.json`` (the run's configuration, read back by ``--resume``) in the
        manifest: written under a temp name and fsynced; the manifest names it (the temp name
        as ``pending``); the temp is renamed onto ``run.json``; the manifest is rewritten
        without ``pending`` (the rest of it is kept). A kill leaves the previous ``run.json``
        or this one, both named by the manifest: ``acquire()`` finishes the rename."""
        self._need_lock()
        old = self._current()
        gen = old["generation"] + 1
        tmp = fsio.tmp_name(os.path.join(self.path, RUN_CONFIG), f"g{gen}")
        try:
            fsio.write_bytes(tmp, data)
            fsio.fsync_dir(self.path)
            body = {**old, "generation": gen,
                    "files": {**old["files"], RUN_CONFIG: file_entry(tmp)},
                    "pending": {"staged": {RUN_CONFIG: os.path.basename(tmp)}, "obsolete": []}}
            write_manifest(self.path, body, crash_points=False)
        except BaseException as exc:
            if self._on_disk_generation() == gen:
                raise
            fsio.remove(tmp)
            err = self._save_error(exc, RUN_CONFIG, old)
            if err is exc:
                raise
            raise err from exc
        os.replace(tmp, os.path.join(self.path, RUN_CONFIG))
        fsio.fsync_dir(self.path)
        body.pop("pending")
        write_manifest(self.path, body, crash_points=False)

    def save_checkpoint(self, step: int, tensors: dict, optimizer_state: dict, extra: dict,
                        journal_records: int | None = None) -> str:
        """Write ``checkpoints/step-<step>/`` (weights.safetensors, optimizer.pt, state.json),
        commit it in the manifest, then delete the previous one. Returns its relative path.
        Non-finite weights are refused (the previous checkpoint stays the one named)."""
        self._need_lock()
        old = self._current()
        bad = nonfinite(tensors)
        if bad:
            raise ValueError(f"refusing to checkpoint step {step}: tensor {bad[0]!r} holds "
                             f"{bad[1]} NaN/inf values (the previous checkpoint is kept)")
        state = encode_extra(step, extra)
        prev, gen = old.get("checkpoint"), old["generation"] + 1
        rel = f"{CHECKPOINTS}/step-{step:08d}"
        if prev and prev["dir"] == rel:
            rel += f".g{gen}"
        target = os.path.join(self.path, rel)
        tmp = fsio.tmp_name(target)
        try:
            write_checkpoint_dir(tmp, tensors, optimizer_state, state)
            entries = entries_of(tmp, rel)
            fsio.remove(target)  # an unnamed leftover of a killed save
            os.replace(tmp, target)
            fsio.fsync_dir(os.path.dirname(target))
            crashpoint("checkpoint-between-renames")
            write_manifest(self.path, self._checkpoint_body(old, gen, step, rel, entries,
                                                            journal_records))
        except BaseException as exc:
            if self._on_disk_generation() == gen:
                raise  # committed (only the folder's fsync failed): the new one is named
            fsio.remove(tmp)
            fsio.remove(target)
            err = self._save_error(exc, f"checkpoint step {step}", old)
            if err is exc:
                raise
            raise err from exc
        crashpoint("checkpoint-committed")
        if prev and prev["dir"] != rel:
            fsio.remove(os.path.join(self.path, prev["dir"]))
            fsio.fsync_dir(os.path.dirname(target))
        return rel

    def _checkpoint_body(self, old: dict, gen: int, step: int, rel: str, entries: dict,
                         journal_records: int | None) -> dict:
        prev = old.get("checkpoint")
        files = {k: v for k, v in old["files"].items()
                 if not (prev and k.startswith(prev["dir"] + "/"))}
        files.update(entries)
        return {**old, "kind": "run", "generation": gen, "state": "checkpoint", "files": files,
                "checkpoint": {"step": int(step), "dir": rel, "journal_records": journal_records},
                "journal": self._journal_info(journal_records)}

    def write_final(self, files: dict, *, weights: str | None = None,
                    journal_records: int | None = None, keep_checkpoint: bool = False) -> dict:
        """Commit the final outputs together. ``files``: top-level name -> bytes, or a
        callable that writes a file *or a folder* at the path it is given. ``weights``: the
        name of the weights among them (``eval --weights RUN`` reads it). The checkpoint is
        dropped unless ``keep_checkpoint``. Returns the new manifest body."""
        self._need_lock()
        check_final_names(files, weights)
        old = self._current()
        gen, staged = old["generation"] + 1, {}
        try:
            entries = stage(self.path, files, gen, staged)
            refuse_nonfinite(self.path, staged, weights)
            body = final_body(old, gen, list(files), weights, entries, staged,
                              self._journal_info(journal_records), keep_checkpoint)
            write_manifest(self.path, body)
        except BaseException as exc:
            if self._on_disk_generation() == gen:
                raise  # committed: the next acquire() finishes the renames
            for s in staged.values():
                fsio.remove(os.path.join(self.path, s))
            err = self._save_error(exc, FINAL_OUTPUTS, old)
            if err is exc:
                raise
            raise err from exc
        crashpoint("final-committed")
        self._finish_commit(body)
        remove_unnamed_checkpoints(self.path, body)
        return body

    def _finish_commit(self, body: dict) -> None:
        finish_pending(self.path, body, RESERVED)
