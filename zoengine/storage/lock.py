"""One run per folder: a lock file (``.zoengine.lock``) holding the owner's pid and host.

The lock is an exclusive ``flock`` on that file, so it dies with its process (a SIGKILL or a
power cut leaves no live lock: the next run takes the stale one over, whatever its pid is now
used for). The pid and host written in it name the owner in the refusal. On a file system
without ``flock`` the lock falls back to the file's contents: a live pid on this host (same
process start time) or any pid on another host holds it; a dead pid's lock is taken over.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time

from zoengine.storage.fsio import pid_alive

LOCK_NAME = ".zoengine.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class FolderError(ValueError):
    """The output folder cannot be used (locked, read-only, a file, someone else's data).
    ``flag`` makes the command line print it as a usage error of that flag."""

    def __init__(self, message: str, flag: str = "--output-dir"):
        super().__init__(message)
        self.flag = flag


class LockedError(FolderError):
    """Another live run holds the folder's lock."""


def _start_ticks(pid: int) -> int | None:
    """The process start time (clock ticks since boot, /proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _owner_text() -> bytes:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_ticks(os.getpid()),
          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return (json.dumps(me) + "\n").encode()


def _parse(raw: bytes) -> dict | None:
    try:
        d = json.loads(raw)
        return d if isinstance(d, dict) and isinstance(d.get("pid"), int) else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "another process"
    me = owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()
    return (f"pid {owner['pid']} on host {owner.get('host', '?')}"
            + (" (this process)" if me else "") + f", since {owner.get('time', '?')}")


def owner_alive(owner: dict) -> bool:
    """Whether the owner named in a lock file still runs (unknowable on another host: True)."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner["pid"]
    if not pid_alive(pid):
        return False
    start = owner.get("start")
    return start is None or _start_ticks(pid) in (None, start)


class FolderLock:
    """The lock of one folder. ``acquire()`` returns the previous (stale) owner it took over,
    or None; it raises ``LockedError`` naming the live owner."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> dict | None:
        """The owner named in the lock file (None: no lock file or unreadable)."""
        try:
            with open(self.path, "rb") as f:
                return _parse(f.read())
        except OSError:
            return None

    def _refuse(self, owner: dict | None):
        raise LockedError(f"{self.folder} is in use by another zoengine run ({_describe(owner)}); "
                          f"wait for it to end or choose another --output-dir (if that run is "
                          f"dead on another host, delete {self.path})")

    def acquire(self) -> dict | None:
        if self._fd is not None:
            return None
        for _ in range(8):  # retried only when the file was replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(self.owner())
            except (OSError, ImportError) as exc:
                os.close(fd)
                if isinstance(exc, OSError) and exc.errno not in _NO_FLOCK:
                    raise
                return self._acquire_without_flock()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder released (unlinked) it between our open and flock
                os.close(fd)
                continue
            previous = _parse(os.pread(fd, 4096, 0))
            os.ftruncate(fd, 0)
            os.pwrite(fd, _owner_text(), 0)
            os.fsync(fd)
            self._fd = fd
            return previous
        self._refuse(self.owner())

    def _acquire_without_flock(self) -> dict | None:
        """The fallback: ``O_EXCL`` creation; a dead owner's file is moved aside, checked and
        removed, then creation is retried."""
        previous = None
        for _ in range(8):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner is not None and owner_alive(owner):
                    self._refuse(owner)
                previous = owner
                aside = f"{self.path}.stale-{os.getpid()}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                with open(aside, "rb") as f:
                    moved = _parse(f.read())
                if moved != owner:  # we moved a fresh lock of another process: put it back
                    try:
                        os.link(aside, self.path)
                    finally:
                        os.remove(aside)
                    self._refuse(moved)
                os.remove(aside)
                continue
            os.write(fd, _owner_text())
            os.fsync(fd)
            self._fd = fd
            return previous
        self._refuse(self.owner())

    def release(self) -> None:
        """Remove the lock file (only if it is still ours) and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.remove(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)
