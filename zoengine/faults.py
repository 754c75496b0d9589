"""Crash points: named places where a test can make the process die or hang, to prove recovery.

``ZOENGINE_CRASH_AT="name:k"`` makes the k-th call (1-based) of ``crashpoint("name")`` kill
this process with SIGKILL, exactly as a power cut or the OOM killer would: no ``finally``
blocks, no flush. ``ZOENGINE_HANG_AT="name:k"`` makes it stop there instead, alive with its
sockets open, as a deadlocked or stalled process does (it sleeps until a signal ends it).
Either spec may end in ``@R`` (``"model-load:1@1"``): only the process whose ``RANK`` is R
(a torchrun rank) acts, so one rank of a launch can fail while the others go on. Unset (the
normal case) a crash point costs two dict lookups. Tests choose points by name instead of
sleeping and hoping to land mid-write.
"""

from __future__ import annotations

import os
import signal
import time

_counts: dict[tuple[str, str], int] = {}


def _fires(env: str, name: str) -> bool:
    spec = os.environ.get(env)
    if not spec:
        return False
    spec, _, rank = spec.partition("@")
    target, _, nth = spec.partition(":")
    if target != name or (rank and rank != os.environ.get("RANK", "0")):
        return False
    key = (env, name)
    _counts[key] = _counts.get(key, 0) + 1
    return _counts[key] == int(nth or 1)


def crashpoint(name: str) -> None:
    """Die (``ZOENGINE_CRASH_AT``) or hang (``ZOENGINE_HANG_AT``) here if the spec names this
    point, this is its chosen call and (with ``@R``) this process is rank R."""
    if _fires("ZOENGINE_CRASH_AT", name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _fires("ZOENGINE_HANG_AT", name):
        while True:  # a signal's handler may raise out of the sleep; SIGKILL ends it
            time.sleep(3600)
