"""``torchrun -m zoengine train``: one run over several data-parallel ranks.

Every rank holds the whole model, draws its own batch of each step (stream ``rank`` of
``step_rng``; rank 0's batches are a one-process run's) and all-reduces each loss
(``opt.set_distributed("losses")``), so every rank applies the same seeded update and the
replicas stay identical while exchanging 16 bytes a step. Rank 0 alone owns the output folder: its lock,
checkpoints, journal (which holds the reduced losses, so one process can replay the run) and
final outputs; the other ranks only read it, to resume.

When a rank fails (docs/distributed.md, "When a rank fails"): every collective outside the
steps is a monitored barrier, bounded by ``ZOENGINE_DIST_TIMEOUT`` (default 600 s); the steps'
collectives run on a group of their own, bounded by ``ZOENGINE_STEP_TIMEOUT`` (default 300 s).
A failure becomes ``RankStopped``, which names the phase, the rank that died or hangs (where
it can be known) and what the output folder holds.
"""

from __future__ import annotations

import os
import re
import socket
import time
from contextlib import contextmanager
from datetime import timedelta

import torch

from zoengine.optim.exchange import RankFailureError
from zoengine.run.stops import (
    Interrupted,
    Terminated,
    die_with_launcher,
    folder_words,
    launched_by_torchrun,
    launcher_pid,
    mute_sigterm,
)

DIST_TIMEOUT_S = 600.0  # a wait outside the steps: a model load, an evaluation, rank 0 writing
STEP_TIMEOUT_S = 300.0  # a step's collectives; they also wait while rank 0 writes a checkpoint
PROBE_S = 10.0  # after a step timed out: how long the ranks wait for each other to answer
_MARKERS = ("connection closed by peer", "connection reset by peer", "timed out waiting", "gloo",
            "nccl", "monitoredbarrier")


def env_seconds(name: str, default: float) -> float:
    """A timeout from the environment (seconds > 0), or ``default`` when it is unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}={raw!r}: must be a number of seconds > 0")
    return value


def is_dist_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed torch.distributed call (a dead, hung or departed peer)."""
    import torch.distributed as dist

    return isinstance(exc, RuntimeError) and (
        isinstance(exc, getattr(dist, "DistError", ())) or
        any(m in str(exc).lower() for m in _MARKERS))


def _cause(exc: BaseException) -> str:
    """The first sentence of a gloo/NCCL error, without its source path."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(exc)).strip()
    text = text.split(". This is typically")[0].split("\n")[0]
    return text[:200]


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def _listed(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


class RankStopped(RankFailureError):
    """A distributed run stopped because a rank died, hung or left: the message names this
    rank, the phase, the rank at fault (where it can be known) and what the folder holds."""


class Ranks:
    """This process's place in a launch (a single process: rank 0 of 1). ``join()`` forms the
    process group; ``phase`` says what the run is doing, for the messages."""

    def __init__(self):
        world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
        self.world = int(world) if world.isdigit() else 1
        self.rank = int(rank) if rank.isdigit() and self.world > 1 else 0
        self.owned, self.phase, self.output_dir = False, "starting", None
        self.peers: list = []  # (host, pid) of every rank
        self.steps_group = self._barriers = self._probe = None
        self.timeout = self.step_timeout = DIST_TIMEOUT_S

    def join(self) -> Ranks:
        """Join the launch's process group (torchrun's environment); a no-op for one process.
        Besides the default group: a gloo group for the monitored barriers (the default one
        under gloo), one for the steps' collectives and one for probing a hung rank."""
        if self.world == 1:
            return self
        import torch.distributed as dist

        die_with_launcher()
        self.timeout = env_seconds("ZOENGINE_DIST_TIMEOUT", DIST_TIMEOUT_S)
        self.step_timeout = env_seconds("ZOENGINE_STEP_TIMEOUT",
                                        min(STEP_TIMEOUT_S, self.timeout))
        self.phase = "joining the process group"
        with self._translated():
            if not dist.is_initialized():
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                        timeout=_td(self.timeout))
                self.owned = True  # we made it, we close it
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() != "gloo":  # monitored barriers exist on gloo only
                self._barriers = dist.new_group(backend="gloo", timeout=_td(self.timeout))
            self._probe = dist.new_group(backend="gloo",
                                         timeout=_td(min(PROBE_S, self.step_timeout)))
            self.steps_group = dist.new_group(timeout=_td(self.step_timeout))
            peers: list = [None] * self.world
            dist.all_gather_object(peers, (socket.gethostname(), os.getpid()),
                                   group=self._barriers)
            self.peers = peers
        return self

    @property
    def main(self) -> bool:
        """Rank 0: the one that owns the output folder."""
        return self.rank == 0

    @property
    def distributed(self) -> str | None:
        """The optimizer's ``set_distributed`` mode for this launch."""
        return "losses" if self.world > 1 else None

    @property
    def data_stream(self) -> int:
        """``step_rng`` stream of this rank's training batches (0: rank 0, as one process)."""
        return 0 if self.rank == 0 else (1 << 20) + self.rank

    @contextmanager
    def _translated(self):
        try:
            yield
        except RankFailureError:
            raise
        except Exception as exc:  # noqa: BLE001 - only collectives run inside
            raise RankFailureError(f"rank {self.rank} of {self.world}: {self.phase}: "
                                   f"{_cause(exc)}") from exc

    def barrier(self) -> None:
        """Wait until every rank has finished ``self.phase``, at most ``timeout`` seconds
        (a monitored barrier: rank 0 names the ranks that did not arrive)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with self._translated():
            dist.monitored_barrier(group=self._barriers, timeout=_td(self.timeout),
                                   wait_all_ranks=True)

    def close(self) -> None:
        """Leave the process group if ``join`` formed it."""
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False

    # ---- a stop, in words ---------------------------------------------------------------

    def stops(self, exc: BaseException) -> bool:
        """Whether ``exc`` stops the run as ``stopped`` says: SIGTERM, or a failed collective
        (any of them, wrapped or not)."""
        return isinstance(exc, (Terminated, RankFailureError)) or (
            self.world > 1 and is_dist_failure(exc))

    def stopped(self, exc: BaseException) -> BaseException:
        """What to raise instead of ``exc`` (SIGTERM, or a failed collective): an
        ``Interrupted`` or a ``RankStopped`` whose words name this rank, the phase, the rank
        at fault where it can be known, and what the output folder holds."""
        mute_sigterm()
        me = f"rank {self.rank} of {self.world} " if self.world > 1 else ""
        state = folder_words(self.output_dir)
        if isinstance(exc, Terminated):
            why = self._why_terminated() if self.world > 1 else ""
            return Interrupted(f"{me}stopped by SIGTERM while {self.phase}{why}. {state}".strip())
        return RankStopped(f"{me}stopped while {self.phase}: {self._at_fault(exc)}. "
                           f"{state}".strip())

    def dead_peers(self, wait_s: float = 1.0) -> list[int]:
        """The other ranks on this host whose process is gone (a closed socket can be seen a
        moment before its process has exited: wait up to ``wait_s`` for one)."""
        from zoengine.storage.fsio import pid_alive

        host, deadline = socket.gethostname(), time.monotonic() + wait_s
        while True:
            dead = [r for r, (h, pid) in enumerate(self.peers)
                    if r != self.rank and h == host and not pid_alive(pid)]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def _why_terminated(self) -> str:
        if self._launcher_died():
            return (f" (the launcher, pid {launcher_pid()}, has died: this rank stopped with "
                    "it, so no rank is left holding the folder)")
        dead, torchrun = self.dead_peers(wait_s=0), launched_by_torchrun()
        if dead:
            pids = ", ".join(str(self.peers[r][1]) for r in dead)
            return (f" ({_listed(dead)} had stopped first (pid {pids}); "
                    + ("torchrun then stops every rank: its own output and torchrun's summary "
                       "say why)" if torchrun else "its own output says why)"))
        return (" (torchrun sends SIGTERM to every rank when one fails or when it is stopped "
                "itself; its summary names the rank that failed)" if torchrun else "")

    @staticmethod
    def _launcher_died(wait_s: float = 1.0) -> bool:
        """Whether the launcher is gone. The parent-death signal comes as the launcher's
        threads exit, while its pid may still be this process's parent: wait for it a moment."""
        from zoengine.storage.fsio import pid_alive

        parent = launcher_pid()
        if parent is None:
            return False
        deadline = time.monotonic() + wait_s
        while os.getppid() == parent and pid_alive(parent):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _at_fault(self, exc: BaseException) -> str:
        cause = exc.__cause__ or exc
        text = str(cause)
        said = f" ({_cause(cause)})"
        if not self.peers:  # the group never formed
            if "timed out" not in text.lower() and "timeout" not in text.lower():
                return f"the process group could not be formed{said}"
            return (f"the process group did not form within {self.timeout:g} s "
                    "(ZOENGINE_DIST_TIMEOUT): a rank did not start, died before joining, or "
                    f"cannot reach MASTER_ADDR:MASTER_PORT{said}")
        dead = self.dead_peers(wait_s=1.0 if "closed by peer" in text.lower() else 0)
        if dead:
            pids = ", ".join(f"{self.peers[r][1]}" for r in dead)
            return (f"{_listed(dead)} (pid {pids}, this host) stopped first: died, was killed "
                    f"or exited on an error; its own output says why{said}")
        named = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
        if named:
            late = [int(r) for r in re.findall(r"\d+", named.group(1))]
            return (f"{_listed(late)} did not arrive within {self.timeout:g} s "
                    f"(ZOENGINE_DIST_TIMEOUT): it hangs (alive but stuck) or is that much "
                    f"slower{said}")
        if "closed by peer" in text.lower() or "reset by peer" in text.lower():
            return f"a rank on another host closed its connection: it died or was stopped{said}"
        if "timed out" not in text.lower() and "timeout" not in text.lower():
            return f"a collective failed{said}"
        if self.phase == "training":
            return self._hung(said)
        # a monitored barrier outside the steps: rank 0 names the late ranks (above); the
        # others wait for rank 0's word
        return (f"rank 0 did not confirm that every rank arrived within {self.timeout:g} s "
                "(ZOENGINE_DIST_TIMEOUT): rank 0 hangs, or its message names the rank it "
                f"waited for{said}")

    def _hung(self, said: str) -> str:
        """After a timeout at a step: ask every rank to answer (a monitored barrier on the
        probe group) and name those that do not."""
        import torch.distributed as dist

        limit = self.step_timeout if self.phase == "training" else self.timeout
        env = "ZOENGINE_STEP_TIMEOUT" if self.phase == "training" else "ZOENGINE_DIST_TIMEOUT"
        probe = min(PROBE_S, self.step_timeout)
        try:
            dist.monitored_barrier(group=self._probe, timeout=_td(probe), wait_all_ranks=True)
            late: list[int] | None = []
        except Exception as exc:  # noqa: BLE001 - the answer is in its words
            m = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(exc))
            late = ([int(r) for r in re.findall(r"\d+", m.group(1))] if m else
                    [0] if self.rank != 0 and self.world == 2 else None)
        waited = f"within {limit:g} s ({env}), nor within {probe:g} s after"
        if late:
            checkpoints = " (rank 0 also writes the checkpoints, while the others wait)" \
                if 0 in late else ""
            return (f"{_listed(late)} did not answer {waited}: it hangs (alive but stuck) or "
                    f"is that much slower{checkpoints}; raise {env} if its steps are that "
                    f"slow{said}")
        if late is None:
            return f"a rank did not answer {waited}; rank 0's message names it{said}"
        return (f"no answer within {limit:g} s ({env}), yet every rank answered after: a rank "
                f"was that much slower; raise {env}{said}")
