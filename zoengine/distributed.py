"""Data-parallel and sharded ZO on ``torch.distributed``: helpers around the optimizers'
``opt.set_distributed(...)`` (docs/distributed.md).

What crosses the wire is scalars only: the optimizers exchange loss values
(``zoengine.optim.exchange.ScalarExchange``, built by ``set_distributed``); every rank then applies
the same seeded update, so replicas stay identical without sending weights or z. A rank that
holds a slice of a tensor trains it through the param group's ``shard_offsets``: it generates
exactly its slice of the full tensor's z (noise contract: z is indexed by element).
"""

from __future__ import annotations

import hashlib
import os

import torch

from zoengine.optim.exchange import MODES, ScalarExchange

__all__ = ["MODES", "ScalarExchange", "launcher_world_size", "row_shard", "sharded_group",
           "dtensor_shards", "replicas_agree"]


def launcher_world_size() -> int:
    """The world size a launcher (torchrun, accelerate launch) announced, 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def row_shard(full: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """Rows ``[rank·m, (rank+1)·m)`` of ``full`` (m = rows / world, which must divide) as a
    contiguous trainable ``nn.Parameter``, and the element offset of its first element in ``full`` (row-major).
    A dim-0 (FSDP-style) or tensor-parallel row split is a contiguous range of elements, so
    its z is the full tensor's z from that offset on."""
    rows = full.shape[0]
    if world < 1 or not 0 <= rank < world or rows % world:
        raise ValueError(f"row_shard: {rows} rows cannot be split evenly over {world} ranks "
                         f"(rank {rank})")
    m = rows // world
    per_row = full[0].numel() if full.dim() > 1 else 1
    shard = torch.nn.Parameter(full[rank * m:(rank + 1) * m].detach().clone().contiguous())
    return shard, rank * m * per_row


def sharded_group(named: list[tuple[str, torch.Tensor, int]], **hyper) -> dict:
    """A param group of (full tensor's name, local shard, element offset) triples: the name
    gives the full tensor's noise key on every rank, the offset picks this rank's slice."""
    return {"params": [t for _, t, _ in named], "param_names": [n for n, _, _ in named],
            "shard_offsets": [int(o) for _, _, o in named], **hyper}


def dtensor_shards(module: torch.nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """(name, local shard, element offset) of every trainable parameter of a module sharded by
    FSDP2 (``torch.distributed.fsdp.fully_shard``: DTensors with one ``Shard(0)`` placement);
    plain tensors come back whole (offset 0). Feed it to ``sharded_group``.

    The local shards share storage with the DTensors, so the optimizer's in-place writes are
    what FSDP2 all-gathers. FSDP2 keeps the root module unsharded after a forward pass (no
    backward follows a ZO evaluation), so the closure must call ``module.reshard()`` after its
    forward, or the next evaluation would not see the new perturbation."""
    from torch.distributed.tensor import DTensor, Shard

    out = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if not isinstance(p, DTensor):
            out.append((name, p, 0))
            continue
        if tuple(p.placements) != (Shard(0),):
            raise ValueError(f"{name}: placements {tuple(p.placements)}; only a single "
                             "Shard(0) placement (FSDP2's) is supported")
        rank, world = p.device_mesh.get_local_rank(), p.device_mesh.size()
        rows = -(-p.shape[0] // world)  # torch.chunk's split, as FSDP2 shards
        per_row = p.numel() // max(p.shape[0], 1)
        local = p.to_local().detach().requires_grad_(True)
        out.append((name, local, min(rank * rows, p.shape[0]) * per_row))
    return out


def _digest(tensors) -> int:
    h = hashlib.blake2b(digest_size=7)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def replicas_agree(tensors, group=None) -> bool:
    """True when every rank holds bit-identical ``tensors`` (one 8-byte digest per rank is
    exchanged, never the weights)."""
    import torch.distributed as dist

    mine = torch.tensor([_digest(list(tensors))], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return all(torch.equal(p, parts[0]) for p in parts)
