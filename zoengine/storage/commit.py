"""The two-phase commit of a folder's top-level outputs (files or folders), used by
``RunFolder.write_final``:

1. **stage**: each output is written under ``.<name>.tmp-<pid>.g<generation>`` and fsynced;
2. the caller writes the manifest naming the outputs by their own names, with
   ``pending = {"staged": {name: temp name}, "obsolete": [names]}`` (the commit point);
3. **finish**: each temp is renamed onto its name (a folder or a file/folder swap moves the old
   one aside to ``.<name>.tmp-<pid>.old`` first), obsolete names and the moved-aside ones are
   deleted, and the manifest is rewritten without ``pending``.

A kill before 2 leaves the old manifest and only temps (removed later as a dead process's);
after 2, readers find each output under its temp name while that exists
(``manifest.locate``), and ``finish_pending`` (idempotent) completes the commit on the next
``acquire()``.
"""

from __future__ import annotations

import os

from zoengine.faults import crashpoint
from zoengine.storage import fsio
from zoengine.storage.manifest import entries_of, write_manifest


def stage(folder: str, files: dict, generation: int, staged: dict) -> dict:
    """Write each of ``files`` (name -> bytes, or a callable writing a file or folder at the
    path it is given) under its temp name; fills ``staged`` (name -> temp name) as it goes, so
    a caller can remove them on error. Returns the manifest entries, by final name."""
    entries = {}
    for name, content in files.items():
        tmp = fsio.tmp_name(os.path.join(folder, name), f"g{generation}")
        fsio.remove(tmp)
        staged[name] = os.path.basename(tmp)
        content(tmp) if callable(content) else fsio.write_bytes(tmp, content)
        if not os.path.lexists(tmp):
            raise RuntimeError(f"the writer of {name!r} wrote nothing at {tmp}")
        fsio.fsync_tree(tmp)
        crashpoint("final-file-written")
        entries.update(entries_of(tmp, name))
    fsio.fsync_dir(folder)
    return entries


def finish_pending(folder: str, body: dict, protected: set) -> None:
    """Move each staged temp onto its name, delete what the commit made obsolete (never a
    ``protected`` name or one the manifest names), then rewrite the manifest without
    ``pending``. Idempotent: recovery repeats it after a kill at any point."""
    pending = body.get("pending") or {}
    for name, staged in pending.get("staged", {}).items():
        src, dst = os.path.join(folder, staged), os.path.join(folder, name)
        if not os.path.lexists(src):
            continue  # moved already
        if os.path.lexists(dst) and (os.path.isdir(dst) or os.path.isdir(src)):
            trash = fsio.tmp_name(dst, "old")
            fsio.remove(trash)
            os.replace(dst, trash)
            crashpoint("final-between-renames")
        os.replace(src, dst)
        fsio.fsync_dir(folder)
    crashpoint("final-renamed")
    named = {n.partition("/")[0] for n in body.get("files", {})}
    for name in pending.get("obsolete", []):
        if name not in named and name not in protected and "/" not in name:
            fsio.remove(os.path.join(folder, name))
    for name in pending.get("staged", {}):
        fsio.remove(fsio.tmp_name(os.path.join(folder, name), "old"))
    fsio.fsync_dir(folder)
    body.pop("pending", None)
    write_manifest(folder, body)
