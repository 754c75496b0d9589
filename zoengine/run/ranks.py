"""``torchrun -m zoengine train``: one run over several data-parallel ranks.

Every rank holds the whole model, draws its own batch of each step (stream ``rank`` of
``step_rng``; rank 0's batches are a one-process run's) and all-reduces each loss
(``opt.set_distributed("losses")``), so every rank applies the same seeded update and the
replicas stay identical while exchanging 16 bytes a step. Rank 0 alone owns the output folder: its lock,
checkpoints, journal (which holds the reduced losses, so one process can replay the run) and
final outputs; the other ranks only read it, to resume.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch


class Ranks:
    """This process's place in a launch (a single process: rank 0 of 1)."""

    def __init__(self):
        world = os.environ.get("WORLD_SIZE", "1")
        self.world = int(world) if world.isdigit() else 1
        self.rank, self.owned = 0, False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # a rank that hangs (alive, not dead: a dead one closes its sockets and the
                # others raise at once) stops the others after this many seconds
                timeout = timedelta(seconds=float(os.environ.get("ZOENGINE_DIST_TIMEOUT", 600)))
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                        timeout=timeout)
                self.owned = True  # we made it, we close it
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> str | None:
        """The optimizer's ``set_distributed`` mode for this launch."""
        return "losses" if self.world > 1 else None

    @property
    def data_stream(self) -> int:
        """``step_rng`` stream of this rank's training batches (0: rank 0, as one process)."""
        return 0 if self.rank == 0 else (1 << 20) + self.rank

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False
