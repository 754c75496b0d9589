"""The scalars a data-parallel ZO step exchanges over ``torch.distributed`` (no weights, no z).

Lives in ``optim`` (layer 2) because ``opt.set_distributed(...)`` builds it; the user-facing helpers
(sharding, replica checks, launchers) are in ``zoengine.distributed`` (layer 3).

Modes (docs/distributed.md):

* ``"losses"``: every rank evaluates every sample on its own batch; each loss value is
  all-reduced (mean) before it is used, so every rank computes the same g and applies the same
  seeded update: one float64 per evaluation, 2n per step.
* ``"samples"``: rank r evaluates the samples k ≡ r (mod world) of the step on its own batch;
  the (ℓ₊, ℓ₋) pairs are all-gathered (2n float64 per step in all) and every rank applies the
  full n-sample update.
"""

from __future__ import annotations

import torch

MODES = ("losses", "samples")
CHECK_EVERY = 100  # steps between replica checksums (0.18 s for 134.5M fp32 weights, 1 thread)
_CHUNK = 1 << 20  # elements summed at a time by ``weights_checksum`` (8 MB of int64)


class RankFailureError(RuntimeError):
    """A collective of a ZO step failed: another rank died, was killed or timed out. Raised on
    every surviving rank instead of hanging; the run resumes from its journal/checkpoint."""


class ReplicaDivergenceError(RuntimeError):
    """The ranks' weights are no longer identical (raised on every rank by the drift guard)."""


def weights_checksum(tensors) -> int:
    """A cheap 63-bit checksum of the tensors' bits: per tensor, the wrapping sum of its words
    as integers, mixed in order. Any one changed element changes it; it reads the weights once
    and allocates one chunk."""
    total = 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[
            flat.element_size()]
        words = flat.contiguous().view(as_int)
        s = 0
        for i in range(0, words.numel(), _CHUNK):
            s += int(words[i:i + _CHUNK].to(torch.int64).sum())
        total = (total * 1_000_003 + s + words.numel()) % (1 << 63)
    return total


def _dist():
    import torch.distributed as dist

    return dist


class ScalarExchange:
    """Scalar collectives of one process group (None: the default group)."""

    def __init__(self, mode: str = "losses", group=None, *, check_every: int = CHECK_EVERY):
        if mode not in MODES:
            raise ValueError(f"distributed mode {mode!r}: must be one of {MODES}")
        if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 0:
            raise ValueError(f"check_every={check_every!r}: must be an int >= 0 (0: never)")
        self.check_every = check_every
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "set_distributed(...) needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group() first (torchrun sets the environment "
                "it reads), or leave it out for a single process")
        self.mode, self.group = mode, group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = (torch.device("cuda", torch.cuda.current_device()) if nccl
                       else torch.device("cpu"))

    @classmethod
    def resolve(cls, spec):
        """``opt.set_distributed(spec)``'s spec → a ScalarExchange or None."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls("losses")
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, ScalarExchange):
            return spec
        raise ValueError(f"set_distributed({spec!r}): must be None, True, 'losses', 'samples' or "
                         "a ScalarExchange")

    def local_samples(self, n: int) -> list[int]:
        """The samples of a step this rank evaluates."""
        if self.mode == "losses":
            return list(range(n))
        return list(range(self.rank, n, self.world))

    def reduce_loss(self, value: float) -> float:
        """Mode "losses": the mean over ranks of one loss value (identity otherwise)."""
        if self.mode != "losses" or self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self._collective("all-reduce of a loss", lambda: _dist().all_reduce(t, group=self.group))
        return float(t.item()) / self.world

    def _collective(self, what: str, run) -> None:
        """Run a collective; a failure (a dead peer closes its sockets; a hung one trips the
        process group's timeout) becomes a RankFailureError that says what to do."""
        try:
            run()
        except Exception as exc:  # gloo: RuntimeError; NCCL: DistBackendError
            raise RankFailureError(
                f"rank {self.rank} of {self.world}: the {what} failed ({type(exc).__name__}: "
                f"{str(exc).strip()[:300]}). Another rank has died, was killed or timed out; "
                "this rank stops too. The weights are restored; resume the run from its "
                "checkpoint and journal (zoengine train --resume DIR, any world size)") from exc

    def after_step(self, step: int, tensors) -> None:
        """The drift guard: every ``check_every`` steps, compare a checksum of the weights
        across ranks (one int64 each) and raise ReplicaDivergenceError on every rank if any
        differs."""
        if self.check_every == 0 or step % self.check_every or self.world == 1:
            return
        mine = torch.tensor([weights_checksum(tensors)], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        self._collective("replica checksum all-gather",
                         lambda: _dist().all_gather(parts, mine, group=self.group))
        sums = [int(p) for p in parts]
        if len(set(sums)) > 1:
            common = max(sums, key=sums.count)
            odd = [r for r, v in enumerate(sums) if v != common]
            raise ReplicaDivergenceError(
                f"after step {step} the ranks' weights differ (checksums per rank: {sums}; "
                f"odd ones out: {odd}). Something wrote the weights on some ranks only, or a "
                "rank ran with other options; stop and resume every rank from one checkpoint")

    def gather_pairs(self, pairs: list[tuple[float, float]], n: int) -> list[tuple[float, float]]:
        """Mode "samples": every rank's (ℓ₊, ℓ₋) pairs → all n pairs in sample order."""
        if self.mode != "samples" or self.world == 1:
            return pairs
        mine = torch.tensor([v for p in pairs for v in p], dtype=torch.float64,
                            device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        self._collective("all-gather of the loss pairs",
                         lambda: _dist().all_gather(parts, mine, group=self.group))
        out: list = [None] * n
        for r, part in enumerate(parts):
            values = part.tolist()
            for j, k in enumerate(range(r, n, self.world)):
                out[k] = (values[2 * j], values[2 * j + 1])
        return out

    def check_same(self, what: dict) -> None:
        """Refuse (on every rank) a run whose ranks disagree on any of ``what`` (ints < 2^64):
        different seeds or sample counts would apply different updates and drift apart."""
        names = sorted(what)
        words = [w for k in names for w in (what[k] & 0xFFFFFFFF, what[k] >> 32)]
        mine = torch.tensor(words, dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        _dist().all_gather(parts, mine, group=self.group)
        bad = [k for i, k in enumerate(names)
               if any(not torch.equal(p[2 * i:2 * i + 2], parts[0][2 * i:2 * i + 2])
                      for p in parts)]
        if bad:
            seen = {k: [int(p[2 * names.index(k)]) + (int(p[2 * names.index(k) + 1]) << 32)
                        for p in parts] for k in bad}
            raise ValueError(f"distributed ranks disagree on {', '.join(bad)} (per rank: "
                             f"{seen}); every rank must construct the optimizer with the same "
                             "values, or the replicas would drift apart")

class RecordedExchange:
    """A ScalarExchange that also appends every reduced loss to a journal record."""

    def __init__(self, inner, values: list):
        self._inner, self._values = inner, values

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def reduce_loss(self, value: float) -> float:
        out = self._inner.reduce_loss(value)
        self._values.append(out)
        return out

