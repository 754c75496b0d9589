"""A self-describing model folder (``zoengine prune``'s output), replaced as a whole.

The folder carries its own manifest (kind ``model``, written last inside it), so a reader can
verify every file and ``zoengine prune`` can tell its own output (which it may replace) from a
user's folder (which it refuses to touch). Replacing: the new folder is written complete under
``.<name>.tmp-<pid>`` and fsynced; the old folder is renamed to ``.<name>.tmp-<pid>.old``, the
new one onto the name, the old one deleted. A kill between the two renames leaves no folder
under the name for a moment: the next ``zoengine prune`` into it (``recover_model_dir``) moves
the complete new folder in, or the old one back.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from zoengine.faults import crashpoint
from zoengine.storage.fsio import fsync_dir, fsync_tree, pid_alive, remove, temp_owner, tmp_name
from zoengine.storage.lock import FolderError
from zoengine.storage.manifest import (
    MANIFEST,
    IntegrityError,
    entries_of,
    read_manifest,
    verify_file,
    write_manifest,
)


def check_target(path: str, flag: str = "--output-dir") -> None:
    """Refuse a target that is an existing file, or a non-empty folder that zoengine did not
    write as a model folder: the user's data is never replaced."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise FolderError(f"{path} is an existing file; zoengine prune writes a folder and "
                          f"does not replace files: choose another {flag}", flag)
    if not os.listdir(path):
        return
    try:
        body = read_manifest(path)
    except IntegrityError:
        body = None
    if body is None or body.get("kind") != "model":
        raise FolderError(f"{path} is a non-empty folder that zoengine prune did not write "
                          f"(no model {MANIFEST} in it); choose a new or empty {flag}, or "
                          "remove that folder yourself", flag)


def _complete(folder: str) -> bool:
    try:
        return (read_manifest(folder) or {}).get("kind") == "model"
    except IntegrityError:
        return False


def recover_model_dir(path: str) -> None:
    """Finish or undo a replacement a killed process left (its temps carry its dead pid)."""
    path = os.path.abspath(path)
    parent, base = os.path.split(path)
    if not os.path.isdir(parent):
        return
    prefix = f".{base}.tmp-"
    temps = [n for n in sorted(os.listdir(parent)) if n.startswith(prefix)]
    dead = [n for n in temps if not pid_alive(temp_owner(n) or 0)]
    if not os.path.lexists(path):
        new = [n for n in dead if not n.endswith(".old") and _complete(os.path.join(parent, n))]
        old = [n for n in dead if n.endswith(".old")]
        pick = (new or old or [None])[0]
        if pick is not None:
            os.replace(os.path.join(parent, pick), path)
            fsync_dir(parent)
    for n in dead:
        remove(os.path.join(parent, n))


def write_model_dir(path: str, writer: Callable[[str], None]) -> str:
    """Write a model folder at ``path`` with ``writer(folder)``, then its manifest, and put it
    in place of any previous one (module docstring). Returns ``path``."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    recover_model_dir(path)
    check_target(path)
    old_gen = (read_manifest(path) or {}).get("generation", 0) if os.path.isdir(path) else 0
    tmp, old = tmp_name(path), tmp_name(path, "old")
    remove(tmp)
    try:
        os.makedirs(tmp)
        writer(tmp)
        crashpoint("model-files-written")
        write_manifest(tmp, {"kind": "model", "generation": old_gen + 1,
                             "files": entries_of(tmp, "")})
        fsync_tree(tmp)
        fsync_dir(parent)
        if os.path.lexists(path):
            os.replace(path, old)
            crashpoint("model-between-renames")
        os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException as exc:
        if not os.path.lexists(path) and os.path.lexists(old):
            os.replace(old, path)
        remove(tmp)
        if isinstance(exc, OSError):
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise OSError(exc.errno, f"cannot write the model folder {path}: {exc.strerror}"
                          f"{' (the disk is full)' if full else ''}; the previous content is "
                          "intact") from exc
        raise
    crashpoint("model-renamed")
    remove(old)
    fsync_dir(parent)
    return path


def verify_model_dir(path: str, *, flag: str | None = None) -> bool:
    """Verify every file a model folder's manifest names; False when it has no manifest."""
    body = read_manifest(path)
    if body is None:
        return False
    for name in body.get("files", {}):
        verify_file(path, body, name, flag=flag)
    return True
