"""Step journals: read them, replay them onto weights, check the base they start from.

Every zoengine optimizer journals with ``opt.set_journal(PATH)`` (or ``zoengine.journal.attach(
opt, PATH)``) and appends one fixed-size, checksummed record per step
(``zoengine.optim.journal_file`` has the format). This module turns a journal back into weights::

    opt = zoengine.journal.replay(model, "run/journal.zoj")   # no forward pass

Replay rebuilds the optimizer from the journal's header (the method's registry name and its
hyper-parameters: ``zoengine.optim.create(name, params, **hyperparameters)``) and re-runs each
step with closures that return the recorded losses, handing a method's own batch requests
(DiZO's search) the recorded values through ``set_batch_source``, so the weights repeat the
run's bit for bit on the reference and native backends (docs/reliability.md). Journals written
before the method record (header format 1: a class path and the constructor's arguments)
still replay: the class is looked up in the method registry by name, never imported.

A *shipped* journal (``zoengine export-journal``; ``shipped_bytes`` here) is the run's journal,
its torn tail dropped, followed by a fixed 64-byte trailer: a magic, the record count, the byte
length of everything before the trailer and its SHA-256 (plus a CRC-32 of the trailer itself)::

    header  record*  | b"ZOJSHIPPED1\\n"  u64 records  u64 body bytes  32-byte SHA-256  u32 CRC-32

A live journal tolerates a torn last record (a crash mid-write); a shipped one is complete by
construction, so ``read_shipped`` refuses anything short of that: no trailer (truncated, a live
journal, or exported before the trailer existed), a SHA-256 or count that differs, a damaged
record anywhere, a header without records. ``replay`` reads a file with a trailer the strict
way too. To an older zoengine the trailer is a torn tail, dropped: it still replays the records.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

import torch

from zoengine.optim.dizo import DiZO
from zoengine.optim.journal_file import (
    FLAG_RAISED,
    FLAG_SKIPPED,
    JournalError,
    JournalWriter,
    Layout,
    Record,
    read_header,
    read_records,
    tensors_sha256,
)
from zoengine.optim.registry import available_methods, create, method_spec
from zoengine.optim.virtual import VIRTUAL_REPLAY

tensors_hash = tensors_sha256  # the identity of a set of weights (SHA-256)

__all__ = ["SHIPPED_MAGIC", "TRAILER_SIZE", "JournalError", "JournalWriter", "Record",
           "apply_record", "attach", "build_optimizer", "is_shipped", "read_header",
           "read_records", "read_shipped", "replay", "shipped_bytes", "tensors_hash"]


def attach(opt, path, *, fsync: str | int = "step", meta: dict | None = None):
    """Journal every following step of ``opt`` into ``path``: ``opt.set_journal(path,
    fsync=fsync, meta=meta)`` (see there). Returns ``opt``."""
    opt.set_journal(path, fsync=fsync, meta=meta)
    return opt


class _Exhausted(JournalError):
    """A replayed step asked for more loss values than its record holds."""


def _named(model_or_named_params) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_named_params, torch.nn.Module):
        return [(n, p) for n, p in model_or_named_params.named_parameters() if p.requires_grad]
    return list(model_or_named_params)


def build_optimizer(header: dict, named_params, *, masks=None, path: str = "journal"):
    """The optimizer the journal was written by, on ``named_params`` (names and shapes must be
    the journal's). ``masks``: needed when the run used a dict of masks."""
    named = _named(named_params)
    names = [n for n, _ in named]
    if names != header["param_names"]:
        missing = sorted(set(header["param_names"]) - set(names))[:3]
        extra = sorted(set(names) - set(header["param_names"]))[:3]
        raise JournalError(f"{path}: the journal trains {len(header['param_names'])} tensors "
                           f"that these parameters do not match (missing {missing}, "
                           f"unexpected {extra})")
    for (n, p), shape in zip(named, header["shapes"]):
        if list(p.shape) != shape:
            raise JournalError(f"{path}: {n} has shape {list(p.shape)}; the journal's has {shape}")
    name, hyper, masks_spec = _method_of(header, path)
    if masks_spec == "dict" and masks is None:
        raise JournalError(f"{path}: the run used a dict of sparsity masks: pass masks=")
    kwargs = dict(hyper)
    if masks_spec is not None:
        kwargs["masks"] = masks if masks is not None else masks_spec
    opt = create(name, named, **kwargs)
    if header.get("config", {}).get("perturbation") == "virtual":
        opt.attach_virtual(VIRTUAL_REPLAY)  # no forward runs: each step is its update alone
    return opt


def _method_of(header: dict, path) -> tuple[str, dict, str | None]:
    """(registry name, hyper-parameters, masks spec) of the optimizer that wrote ``header``."""
    method = header.get("method")
    if isinstance(method, dict):
        return method["name"], dict(method["hyperparameters"]), method.get("masks")
    call = header.get("call")
    if not isinstance(call, dict):
        raise JournalError(f"{path}: the header names no optimizer (neither 'method' nor the "
                           "older 'call'): not a journal this zoengine can replay")
    return _legacy_method(call, path)


_LEGACY_POSITIONAL = ("lr", "eps", "weight_decay")  # every class took these after params
_NOT_HYPER = ("journal", "journal_fsync", "distributed", "perturbation", "model",
              "projection_closure", "masks")


def _legacy_method(call: dict, path) -> tuple[str, dict, str | None]:
    """A format-1 header (``{"class": "zoengine.optim.mezo.MeZO", "args": [...], "kwargs":
    {...}, "masks": ...}``) as (registry name, hyper-parameters, masks spec). The class is
    found among the registered classes by its name (never imported from the path); DiZO's
    ``clip`` was τ and becomes ``tau``."""
    cls_name = str(call.get("class", "")).rpartition(".")[2]
    names = [n for n in available_methods() if method_spec(n).cls.__name__ == cls_name
             and not method_spec(n).fixed and method_spec(n).factory is None]
    if not names:
        raise JournalError(
            f"{path}: written by an older zoengine for class {call.get('class')!r}, which is "
            "not in zoengine's method registry: register it (zoengine.optim.register_method("
            f"name, {cls_name})) and replay again, or train the run again")
    hyper = dict(zip(_LEGACY_POSITIONAL, call.get("args", [])))
    hyper.update({k: v for k, v in call.get("kwargs", {}).items() if k not in _NOT_HYPER})
    if issubclass(method_spec(names[0]).cls, DiZO) and "clip" in hyper:
        hyper["tau"] = hyper.pop("clip")  # DiZO's τ was called clip
    return names[0], hyper, call.get("masks")


def apply_record(opt, record: Record, *, path: str = "journal") -> None:
    """Re-run one recorded step on ``opt`` (whose step counter must be the record's)."""
    zo = opt.state["zo"]
    if record.step != zo["step"]:
        raise JournalError(f"{path}: record for step {record.step}, but the optimizer is at "
                           f"step {zo['step']}: the journal has a gap or belongs elsewhere")
    for g, (lr, eps, wd) in zip(opt.param_groups, record.hyper):
        g["lr"], g["eps"], g["weight_decay"] = lr, eps, wd
    values = iter(record.values)

    def closure():
        try:
            return next(values)
        except StopIteration:
            raise _Exhausted(f"{path}: step {record.step} needs more loss values than were "
                             "recorded: the replay diverged from the run") from None

    # a method's own batches (DiZO's search) are the recorded values too; the optimizer's
    # source (the run's own data) is put back afterwards
    previous = opt.set_batch_source(lambda step, k: closure)
    skipped = zo["skipped_steps"]
    try:
        with opt.journal_paused():  # a replayed step is already in the journal
            opt.step(closure)
    except Exception as exc:  # noqa: BLE001 - re-raised unless the run raised here too
        if not (record.flags & FLAG_RAISED) or isinstance(exc, _Exhausted):
            raise
    finally:
        opt.set_batch_source(previous)
    left = sum(1 for _ in values)
    if left or bool(zo["skipped_steps"] > skipped) != bool(record.flags & FLAG_SKIPPED):
        raise JournalError(f"{path}: step {record.step} replayed differently from the run "
                           f"({left} recorded values unused)")


def replay(model_or_named_params, path, *, masks=None, optimizer=None, until_step=None):
    """Apply the journal at ``path`` to the weights; returns the optimizer, at the journal's
    last step (or ``until_step``). ``optimizer``: an optimizer built by the caller (with
    several param groups, say) whose step counter says where to start; records before it are
    skipped. Without it the weights must be the run's starting weights: their hash is checked
    against the journal's ``base_sha256`` when the journal starts at step 0. A shipped journal
    (with a trailer) is verified whole first (``read_shipped``); a live one may end torn."""
    if is_shipped(path):
        header, records = read_shipped(path)
    else:
        header, records, _ = read_records(path)
    if optimizer is None:
        named = _named(model_or_named_params)
        optimizer = build_optimizer(header, named, masks=masks, path=str(path))
        base = header.get("base_sha256")
        if base and header.get("start_step", 0) == 0 and tensors_hash(named) != base:
            raise JournalError(f"{path}: these weights are not the run's starting weights "
                               "(SHA-256 differs from the journal's base_sha256)")
    with torch.no_grad():
        for r in records:
            if until_step is not None and r.step >= until_step:
                break
            if r.step >= optimizer.state["zo"]["step"]:
                apply_record(optimizer, r, path=str(path))
    return optimizer


# ---- shipped journals: complete, counted and hashed -------------------------------------------

SHIPPED_MAGIC = b"ZOJSHIPPED1\n"
_TRAILER = struct.Struct(f"<{len(SHIPPED_MAGIC)}sQQ32s")
TRAILER_SIZE = _TRAILER.size + 4  # + CRC-32 of the trailer's fields


def _trailer(records: int, body: bytes) -> bytes:
    fields = _TRAILER.pack(SHIPPED_MAGIC, records, len(body), hashlib.sha256(body).digest())
    return fields + struct.pack("<I", zlib.crc32(fields))


def shipped_bytes(path) -> tuple[bytes, int]:
    """(the shipped form of the live journal at ``path``, its record count): the header and
    every complete record (a torn tail dropped, as a live journal allows), then the trailer.
    A journal without records is refused: applying it would rebuild the base itself."""
    if is_shipped(path):
        read_shipped(path)  # already shipped: ship it again as it is, once verified
        with open(path, "rb") as f:
            data = f.read()
        return data, _TRAILER.unpack(data[-TRAILER_SIZE:-4])[1]
    header, start = read_header(path)
    _, records, _ = read_records(path)
    if not records:
        raise JournalError(f"{path}: the journal holds no steps (only its header): there is "
                           "nothing to ship")
    with open(path, "rb") as f:
        body = f.read(start + len(records) * Layout(header).size)
    return body + _trailer(len(records), body), len(records)


def is_shipped(path) -> bool:
    """Whether the file at ``path`` ends with a shipped journal's trailer magic (it is then
    read only through ``read_shipped``'s checks)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < TRAILER_SIZE:
                return False
            f.seek(-TRAILER_SIZE, os.SEEK_END)
            return f.read(len(SHIPPED_MAGIC)) == SHIPPED_MAGIC
    except OSError:
        return False


def _no_trailer(path, data: bytes) -> str:
    """Why a file without a trailer is not a shipped journal, as precisely as its bytes tell."""
    if not data:
        return f"{path}: the file is empty (0 bytes): not a shipped journal"
    try:
        header, start = read_header(path)
    except JournalError as exc:
        return f"{exc}; and it has no shipped-journal trailer"
    size = Layout(header).size
    full, tail = divmod(len(data) - start, size)
    how = ("refused: a shipped journal ends with a trailer holding its record count and "
           "SHA-256 (zoengine export-journal RUN OUT writes it; a run folder's own "
           "journal.zoj is accepted in place, verified by its manifest)")
    if full == 0 and tail == 0:
        return f"{path}: holds only a journal header, no steps and no trailer: {how}"
    if tail:
        return (f"{path}: ends {tail} bytes into a record after {full} whole records, with no "
                f"trailer: truncated; {how}")
    return (f"{path}: {full} records and no trailer: truncated at a record boundary, a live "
            f"run's journal, or exported by a zoengine before the trailer; {how}")


def read_shipped(path) -> tuple[dict, list[Record]]:
    """(header, records) of a shipped journal, verified whole: the trailer's magic and CRC,
    the byte length and SHA-256 of everything before it, a header and every record intact
    (no torn tail), at least one record, and as many as the trailer counts. Anything else is
    a ``JournalError`` naming the file and what is wrong."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < TRAILER_SIZE or not data[-TRAILER_SIZE:].startswith(SHIPPED_MAGIC):
        raise JournalError(_no_trailer(path, data))
    fields, (crc,) = data[-TRAILER_SIZE:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(fields) != crc:
        raise JournalError(f"{path}: the shipped journal's trailer (record count, SHA-256) is "
                           "damaged (its checksum differs)")
    _, count, length, digest = _TRAILER.unpack(fields)
    body = data[:-TRAILER_SIZE]
    if len(body) != length:
        raise JournalError(f"{path}: the trailer says {length:,} bytes precede it, the file has "
                           f"{len(body):,}: bytes were cut out or added")
    if hashlib.sha256(body).digest() != digest:
        raise JournalError(f"{path}: damaged: the SHA-256 of its {length:,} bytes differs from "
                           "the one its trailer records")
    header, start = read_header(path)  # the hash matched: a damage here is the exporter's
    layout = Layout(header)
    size = layout.size
    full, tail = divmod(len(body) - start, size)
    if tail:
        raise JournalError(f"{path}: {len(body) - start} bytes of records is not a whole "
                           f"number of {size}-byte records")
    if full != count:
        raise JournalError(f"{path}: holds {full} records; its trailer counts {count}")
    if count == 0:
        raise JournalError(f"{path}: holds no steps (only a header): applying it would "
                           "rebuild the base model itself")
    records = []
    for i in range(full):
        r = layout.unpack(body[start + i * size: start + (i + 1) * size])
        if r is None:
            raise JournalError(f"{path}: record {i} fails its checksum: the journal is corrupt")
        records.append(r)
    return header, records
