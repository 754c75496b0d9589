"""Crash points: named places where a test can make the process die, to prove recovery.

``ZOENGINE_CRASH_AT="name:k"`` makes the k-th call (1-based) of ``crashpoint("name")`` kill
this process with SIGKILL, exactly as a power cut or the OOM killer would: no ``finally``
blocks, no flush. Unset (the normal case) a crash point costs one dict lookup. Tests choose
points by name instead of sleeping and hoping to land mid-write.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crashpoint(name: str) -> None:
    """Die here if ``ZOENGINE_CRASH_AT`` names this point and this is its chosen call."""
    spec = os.environ.get("ZOENGINE_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
