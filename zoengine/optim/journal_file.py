"""The step journal's file format: an append-only file of fixed-size, checksummed records, one per step.

A ZO step is fully described by the run's seed, the step index and the scalars the closure
returned; the noise contract regenerates every z. So a run can be recorded in a few hundred bytes
per step, and *replayed* without a single forward pass: the optimizer is rebuilt from the
journal's header and each step re-run with a closure that hands back the recorded loss values.
The replay executes the very same in-place operations as the run (perturb, perturb, restore and
update), so it reproduces the weights bit for bit on the reference and native backends — even
the ~1 ulp drift of in-place perturbation (research/algorithms.md §0.4), which an update-only
replay would not.

File layout (little endian)::

    b"ZOJOURNAL1\\n"  u32 header length  header (JSON)  u32 CRC-32 of the header
    record*           each ``record_size`` bytes:
        u64 step  u32 flags  u32 n_values
        f64 lr, eps, weight_decay   x groups
        f64 value                   x capacity   (closure outputs in call order, NaN padded)
        f64 g                       x n_samples  (projected gradients, for reading; not replayed)
        u64 pool pointer after the step
        f64 DiZO gamma              x projected  (after a search; NaN otherwise)
        u32 CRC-32 of the record

A torn last record (a crash mid-write) is detected by its size or checksum and dropped, never
misread; a bad checksum anywhere else is an error naming the file and the step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from zoengine.faults import crashpoint

MAGIC = b"ZOJOURNAL1\n"
FLAG_SKIPPED = 1  # the step's loss was non-finite and nonfinite="skip" skipped it
FLAG_PROJECTED = 2  # DiZO ran its projection search in this step
FLAG_RAISED = 4  # the step raised after it had updated the weights (e.g. DiZO's search)
FSYNC_MODES = ("step", "checkpoint")
# header fields that describe where a journal started (and the CLI's informational copy of
# its configuration), not which run it belongs to: the optimizer's own fields decide that
_START_FIELDS = ("created", "start_step", "base_sha256", "run_config")


class JournalError(ValueError):
    """A journal cannot be read or does not fit what it is used with; names the file."""


@dataclass
class Record:
    """One step as the journal stores it."""

    step: int
    values: list[float]
    hyper: list[tuple[float, float, float]]  # (lr, eps, weight_decay) per group
    grads: list[float] = field(default_factory=list)
    flags: int = 0
    pool_pointer: int = 0
    gamma: list[float] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        return bool(self.flags & FLAG_SKIPPED)

    def step_loss(self, n_samples: int) -> float:
        """What ``step()`` returned: the mean of the step's 2n two-point evaluations (NaN for a
        skipped step)."""
        first = self.values[: 2 * n_samples]
        if self.skipped or len(first) < 2 * n_samples:
            return float("nan")
        return sum(first) / len(first)


class Layout:
    """The fixed record format of a journal, from its header."""

    def __init__(self, header: dict):
        self.groups = int(header["groups"])
        self.capacity = int(header["capacity"])
        self.n_samples = int(header["n_samples"])
        self.projected = int(header.get("projected", 0))
        self.body = struct.Struct(f"<QII{3 * self.groups}d{self.capacity}d{self.n_samples}dQ"
                                  f"{self.projected}d")
        self.size = self.body.size + 4

    def pack(self, r: Record) -> bytes:
        if len(r.values) > self.capacity:
            raise JournalError(f"step {r.step} recorded {len(r.values)} loss values; the "
                               f"journal's records hold {self.capacity}")
        nan = float("nan")
        hyper = [x for h in r.hyper for x in h]
        body = self.body.pack(
            r.step, r.flags, len(r.values), *hyper,
            *(list(r.values) + [nan] * (self.capacity - len(r.values))),
            *(list(r.grads) + [nan] * (self.n_samples - len(r.grads)))[: self.n_samples],
            r.pool_pointer,
            *(list(r.gamma) + [nan] * (self.projected - len(r.gamma)))[: self.projected])
        return body + struct.pack("<I", zlib.crc32(body))

    def unpack(self, raw: bytes) -> Record | None:
        """The record in ``raw``, or None when its checksum does not match."""
        body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
        if zlib.crc32(body) != crc:
            return None
        f = self.body.unpack(body)
        step, flags, n = f[0], f[1], f[2]
        i = 3
        hyper = [tuple(f[i + 3 * g: i + 3 * g + 3]) for g in range(self.groups)]
        i += 3 * self.groups
        values = list(f[i: i + n])
        i += self.capacity
        grads = [x for x in f[i: i + self.n_samples] if not math.isnan(x)]
        i += self.n_samples
        pointer = f[i]
        gamma = [x for x in f[i + 1: i + 1 + self.projected] if not math.isnan(x)]
        return Record(step=step, values=values, hyper=hyper, grads=grads, flags=flags,
                      pool_pointer=pointer, gamma=gamma)


def _encode_header(header: dict) -> bytes:
    text = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(text)) + text + struct.pack("<I", zlib.crc32(text))


def read_header(path: str) -> tuple[dict, int]:
    """(header, byte offset of the first record); ``JournalError`` if the file is not a journal."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
            raise JournalError(f"{path}: not a zoengine journal (bad magic)")
        (n,) = struct.unpack("<I", head[len(MAGIC):])
        text, crc = f.read(n), f.read(4)
    if len(text) != n or len(crc) != 4 or zlib.crc32(text) != struct.unpack("<I", crc)[0]:
        raise JournalError(f"{path}: the journal header is damaged (checksum mismatch)")
    return json.loads(text), len(MAGIC) + 8 + n


def read_records(path: str) -> tuple[dict, list[Record], int]:
    """(header, records, bytes of a torn tail that was dropped). A damaged record that is not
    the last raises ``JournalError`` naming the file and the step before it."""
    header, start = read_header(path)
    layout = Layout(header)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    full, tail = divmod(len(data), layout.size)
    records: list[Record] = []
    for i in range(full):
        r = layout.unpack(data[i * layout.size: (i + 1) * layout.size])
        if r is None:
            if i == full - 1 and tail == 0:  # a torn last record: the write never finished
                return header, records, layout.size
            after = records[-1].step if records else "the start"
            raise JournalError(f"{path}: record {i} (after step {after}) fails its checksum: "
                               "the journal is corrupt")
        records.append(r)
    return header, records, tail


def _comparable(header: dict, legacy: bool = False) -> dict:
    """``header`` without what may change between a run and its resumption: the launch's
    ``distributed=`` mode (journals before 2026-12-02 stored it; a data-parallel run may resume
    on another number of ranks, since its records hold the all-reduced losses).

    ``legacy``: one of the two headers was written before the method record (format 1 held the
    constructor call, ``"call"``; format 2 holds ``"method"``): how to rebuild the optimizer is
    left out, the run configuration (``"config"``), seed, tensors and record sizes still decide,
    and τ's configuration key before its rename (``"dizo.clip"``) reads as ``"dizo.tau"``."""
    if legacy:
        config = header.get("config")
        if isinstance(config, dict) and "dizo.clip" in config:
            config = {("dizo.tau" if k == "dizo.clip" else k): v for k, v in config.items()}
        return {**{k: v for k, v in header.items() if k not in ("format", "call", "method")},
                "config": config}
    call = header.get("call")
    if not isinstance(call, dict) or "distributed" not in call.get("kwargs", {}):
        return header
    kwargs = {k: v for k, v in call["kwargs"].items() if k != "distributed"}
    return {**header, "call": {**call, "kwargs": kwargs}}


class JournalWriter:
    """Appends records to a journal file; flushes every record, fsyncs as configured.

    ``fsync``: ``"step"`` (every record), an int k (every k records) or ``"checkpoint"``
    (only when ``sync()`` is called, e.g. by a checkpoint). Opening an existing journal checks
    that its header matches (same run), drops a torn last record and appends after it.
    """

    def __init__(self, path: str, header: dict, *, fsync: str | int = "step"):
        if not (fsync in FSYNC_MODES or (isinstance(fsync, int) and not isinstance(fsync, bool)
                                         and fsync > 0)):
            raise ValueError(f"fsync={fsync!r}: must be 'step', 'checkpoint' or an int k > 0 "
                             "(every k steps)")
        self.path, self.header, self.fsync = os.fspath(path), header, fsync
        self.layout = Layout(header)
        self._since_sync = 0
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            self._reopen()
        else:
            with open(self.path, "wb") as f:
                f.write(_encode_header(header))
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.path)
        self._file = open(self.path, "ab")

    def _reopen(self) -> None:
        old, start = read_header(self.path)
        legacy = "method" not in old or "method" not in self.header
        old, now = _comparable(old, legacy), _comparable(self.header, legacy)
        mismatch = {k: (old.get(k), now.get(k)) for k in set(old) | set(now)
                    if k not in _START_FIELDS and old.get(k) != now.get(k)}
        if mismatch:
            raise JournalError(f"{self.path}: belongs to another run; differing header "
                               f"fields (journal, now): {mismatch}")
        _, records, torn = read_records(self.path)
        keep = start + len(records) * self.layout.size
        if torn or os.path.getsize(self.path) != keep:
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        self.last_step = records[-1].step if records else None

    def append(self, record: Record) -> None:
        raw = self.layout.pack(record)
        half = len(raw) // 2
        self._file.write(raw[:half])
        self._file.flush()
        crashpoint("journal-mid-record")  # a torn record on disk: recovery must drop it
        self._file.write(raw[half:])
        self._file.flush()
        self._since_sync += 1
        if self.fsync == "step" or (isinstance(self.fsync, int)
                                    and self._since_sync >= self.fsync):
            self.sync()

    def truncate_after(self, step: int) -> None:
        """Drop every record after ``step`` (a resume from an older checkpoint rewrites them)."""
        _, start = read_header(self.path)
        _, records, _ = read_records(self.path)
        keep = sum(1 for r in records if r.step <= step)
        self._file.close()
        with open(self.path, "r+b") as f:
            f.truncate(start + keep * self.layout.size)
        self._file = open(self.path, "ab")

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._since_sync = 0

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


def _fsync_dir(path: str) -> None:
    """fsync the folder holding ``path`` so a new name survives a power cut."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def iter_steps(path: str, after: int | None = None) -> Iterator[Record]:
    """The records of ``path`` with step > ``after`` (all when None)."""
    _, records, _ = read_records(path)
    for r in records:
        if after is None or r.step > after:
            yield r


def tensors_sha256(named_tensors) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of torch tensors (the identity of the
    weights a journal starts from)."""
    import torch

    h = hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
