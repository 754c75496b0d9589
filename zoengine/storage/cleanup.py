"""Removing the checkpoint folders of a run folder that its manifest does not name: what a
killed save left, and a checkpoint a commit dropped (``RunFolder.recover``, ``write_final``).
A live process's temp folder is kept."""

from __future__ import annotations

import os

from zoengine.storage import fsio
from zoengine.storage.layout import CHECKPOINTS


def remove_unnamed_checkpoints(path: str, body: dict | None) -> None:
    """Delete every ``checkpoints/`` entry of the run folder ``path`` but the checkpoint the
    manifest ``body`` names and live processes' temps; ``checkpoints/`` itself when empty."""
    ck = os.path.join(path, CHECKPOINTS)
    if not os.path.isdir(ck):
        return
    current = (body or {}).get("checkpoint")
    keep = os.path.basename(current["dir"]) if current else None
    for name in os.listdir(ck):
        pid = fsio.temp_owner(name)
        live = pid is not None and (pid == os.getpid() or fsio.pid_alive(pid))
        if name == keep or live:
            continue
        if pid is not None or name.startswith("step-"):
            fsio.remove(os.path.join(ck, name))
    if keep is None and not os.listdir(ck):
        os.rmdir(ck)
    fsio.fsync_dir(path if keep is None else ck)
