"""Durable file primitives for the run folder: fsync of files and folders, atomic writes,
SHA-256 of files, temp names that carry their owner's pid, and the cleaning of temps left by
dead processes (never by a live one).

A temp name is ``.<name>.tmp-<pid>`` optionally followed by ``.<tag>``; the pid says whose it
is, so a cleaner can tell a killed run's leftovers from a running one's files.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil

from zoengine.faults import crashpoint

_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)(?:\..*)?$")
_LEGACY_OLD_RE = re.compile(r"^(?:model|adapter)\.old-(\d+)$")  # the old atomic_dir's leftovers
_CHUNK = 1 << 20


def tmp_name(path: str, tag: str = "") -> str:
    """``<dir>/.<base>.tmp-<pid>[.<tag>]``: a sibling temp of ``path`` owned by this process."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp-{os.getpid()}" + (f".{tag}" if tag else ""))


def temp_owner(name: str) -> int | None:
    """The pid in a temp name (``tmp_name``'s or a legacy ``<name>.old-<pid>``), else None."""
    m = _TMP_RE.match(name) or _LEGACY_OLD_RE.match(name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return True


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a folder, so the names created, renamed or removed in it survive a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms that cannot open a folder (not Linux) have nothing to sync
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file and folder under ``path`` (a file: just it), folders last."""
    if not os.path.isdir(path):
        fsync_file(path)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def probe_writable(folder: str) -> None:
    """Create, fsync and remove a file in ``folder``; raises the ``OSError`` of a folder that
    cannot be written (read-only, full, no permission)."""
    probe = tmp_name(os.path.join(folder, "write-probe"))
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"zoengine write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.remove(probe)
        fsync_dir(folder)
    except OSError:
        remove(probe)
        raise


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (not atomic: the caller renames it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, data: bytes) -> None:
    """Write ``path`` completely or not at all: temp in the same folder, fsync, rename, fsync
    of the folder."""
    tmp = tmp_name(path)
    try:
        write_bytes(tmp, data)
        crashpoint("atomic-write-before-rename")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def sha256_prefix(path: str, size: int) -> str | None:
    """SHA-256 of the first ``size`` bytes of ``path``; None when the file is shorter."""
    h, left = hashlib.sha256(), size
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                return None
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def remove(path: str) -> None:
    """Remove a file, a link or a folder tree; a missing path is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def clean_stale_temps(folder: str) -> list[str]:
    """Remove the temp files and folders in ``folder`` whose owner process is dead (a killed
    run's leftovers); a live process's temps (this one's included) are never touched.
    Returns the names removed."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        pid = temp_owner(name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        remove(os.path.join(folder, name))
        removed.append(name)
    if removed:
        fsync_dir(folder)
    return removed
