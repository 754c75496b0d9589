"""How a run stops when it is told to or when another rank fails, said in words.

* **SIGTERM** (a scheduler's stop, torchrun stopping the ranks when one fails or when it is
  stopped itself) interrupts ``zoengine train`` the way Ctrl-C does: the ``finally`` blocks
  run, the folder's lock is released, the journal and checkpoints stay resumable, and the
  process says what it was doing and what the folder holds (exit 143). While the final
  outputs are committed it waits for the commit to end first (``hold_sigterm``).
* **The launcher's death**: a rank started by torchrun asks the kernel for SIGTERM when its
  parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux), so killing torchrun, even with SIGKILL,
  leaves no orphan rank holding the output folder's lock.
* **The words**: ``folder_words`` (what the output folder holds, and what to do with it).

Stdlib only at import: ``zoengine train`` calls ``die_with_launcher`` before torch loads.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_TERMINATED = 128 + signal.SIGTERM
_PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``words`` says where and what the folder holds, and
    the command line exits with ``code``."""

    def __init__(self, words: str, code: int = EXIT_TERMINATED):
        super().__init__(words)
        self.words, self.code = words, code


class Terminated(Interrupted):
    """SIGTERM arrived (raised from the signal handler; a KeyboardInterrupt, so no ``except
    Exception`` swallows it). ``run_train`` replaces it with words that name the phase and
    the folder's state; these are the words of one that escapes it."""

    def __init__(self):
        super().__init__("stopped by SIGTERM; outputs of this run were not written unless "
                         "it said so; a training run goes on with `zoengine train --resume "
                         "OUTPUT_DIR`")


_state = {"hold": 0, "pending": False, "muted": False}
_launcher: dict = {"pid": None}


def _on_sigterm(signum, frame) -> None:
    if _state["hold"] or _state["muted"]:
        _state["pending"] = True  # said (or raised) once the commit or the stop is done
        return
    _state["muted"] = True  # one Terminated: the clean-up that follows is not cut short
    raise Terminated()


class sigterm_interrupts:
    """``with sigterm_interrupts():`` SIGTERM raises ``Terminated`` inside the block (main
    thread only; elsewhere nothing changes); the previous handler comes back after it."""

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _on_sigterm)
            _state.update(hold=0, pending=False, muted=False)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        _state.update(hold=0, pending=False, muted=False)


def mute_sigterm() -> None:
    """From now on a SIGTERM is only noted: the run is already stopping (its message is
    being written), a second stop must not cut it short."""
    _state["muted"] = True


class hold_sigterm:
    """``with hold_sigterm():`` a SIGTERM that arrives inside the block (the final outputs'
    commit, seconds long) is raised when the block ends, so the commit completes."""

    def __enter__(self):
        _state["hold"] += 1
        return self

    def __exit__(self, *exc) -> None:
        _state["hold"] -= 1
        if not _state["hold"] and _state["pending"] and not _state["muted"] and exc[0] is None:
            _state.update(pending=False, muted=True)
            raise Terminated()


def launched_by_torchrun() -> bool:
    """Whether torchrun (torch.distributed.elastic) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher() -> bool:
    """Under torchrun on Linux: have the kernel send this process SIGTERM when its parent (the
    launcher) dies. Without it, a torchrun killed with SIGKILL leaves its ranks running as
    orphans, rank 0 holding the output folder's lock. Returns whether it is set."""
    if not launched_by_torchrun() or not sys.platform.startswith("linux"):
        return False
    if _launcher["pid"] is not None:
        return True  # asked already (the command line asks before torch loads)
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    _launcher["pid"] = parent
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def launcher_pid() -> int | None:
    """The launcher's pid, as seen when ``die_with_launcher`` asked to die with it."""
    return _launcher["pid"]


def folder_words(path: str | None) -> str:
    """What the output folder holds after a stop, and what to do with it."""
    if not path:
        return ""
    try:
        from zoengine.run.resume import journal_steps
        from zoengine.storage.folder import RunFolder

        folder = RunFolder(path)
        body = folder.manifest() or {}
        steps = journal_steps(folder.journal_path)
    except Exception as exc:  # noqa: BLE001 - a damaged folder: --resume's checks say more
        return f"{path} could not be read back ({type(exc).__name__}: {exc})"
    if body.get("state") == "complete":
        return (f"{path} holds the complete run (its outputs were committed before the stop): "
                "nothing is lost and there is nothing to resume")
    ck = body.get("checkpoint")
    if ck or steps is None or steps > 0:
        held = "a journal that --resume will check" if steps is None else f"{steps} journaled steps"
        if ck:
            held += f", a checkpoint at step {ck['step']}"
        return (f"{path} holds an interrupted run ({held}): continue it with `zoengine train "
                f"--resume {path}` (under torchrun with any number of ranks, or one process)")
    return (f"{path} holds no trained step: run the same command again (a fresh run takes "
            "the folder over)")
