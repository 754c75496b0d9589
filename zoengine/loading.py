"""Load a Hugging Face model folder (safetensors, one file or sharded) holding one copy of it.

``transformers.from_pretrained`` maps each safetensors file and converts from the mapping: when
the dtype asked differs from the file's, every page it reads stays counted in the process's
resident memory until the mapping goes. Measured (transformers 5.24, a 1.1B LLaMA in bf16
shards, loaded as fp32): peak 6.6 GiB for a 4.1 GiB model, 1.6x. For the largest model a
machine can train, the loader must not be the limit (issue 17), so zoengine loads this way:

1. build the model from its config with initialisation skipped (``no_init_weights``): the
   parameters are allocated but not touched, so no page is resident yet, while buffers that
   the constructor computes (rotary frequencies) are right;
2. read each tensor's bytes with plain ``read`` calls (page cache, not this process's memory)
   straight into its parameter, converting dtype through one bounded buffer
   (``CHUNK_BYTES``).

Peak: the model in the dtype asked + one chunk. Checkpoints this reader cannot map onto the
model by name (renamed keys, quantised or remote-code models) go through ``from_pretrained``,
with a note saying so.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections import Counter
from dataclasses import dataclass

import torch

CHUNK_BYTES = 64 * 2**20  # the conversion buffer; 64 MiB is 0.8 % of a 3B model in bf16
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file: an 8-byte little-endian header size, then JSON."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, which "
                             f"zoengine's loader does not read (known: {sorted(_DTYPES)})")
        begin, end = entry["data_offsets"]
        out[name] = StoredTensor(path, _DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                 8 + size + begin, end - begin)
    return out


def checkpoint_tensors(folder: str) -> dict[str, StoredTensor]:
    """Every tensor of a model folder: ``model.safetensors`` or the shards its index names."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for name in files:
        out.update(read_header(os.path.join(folder, name)))
    return out


def checkpoint_dtype(tensors: dict[str, StoredTensor]) -> torch.dtype:
    """The floating dtype most of a checkpoint's bytes are stored in."""
    count = Counter()
    for t in tensors.values():
        if t.dtype.is_floating_point:
            count[t.dtype] += t.nbytes
    return count.most_common(1)[0][0] if count else torch.float32


def checkpoint_bytes(folder: str) -> int:
    """The size of a checkpoint's tensors, in bytes."""
    return sum(t.nbytes for t in checkpoint_tensors(folder).values())


def _read_exact(f, view: memoryview, path: str) -> None:
    done = 0
    while done < len(view):  # readinto may return short counts on large reads
        n = f.readinto(view[done:])
        if not n:
            raise EOFError(f"{path}: the file ends inside a tensor")
        done += n


def read_into(stored: StoredTensor, target: torch.Tensor, f) -> None:
    """Fill ``target`` (contiguous, same shape) with ``stored``'s values, converting the dtype
    through a buffer of at most ``CHUNK_BYTES``."""
    if tuple(target.shape) != stored.shape:
        raise ValueError(f"{stored.path}: stored shape {stored.shape} != the model's "
                         f"{tuple(target.shape)}")
    flat = target.view(-1)
    if not flat.numel():
        return
    f.seek(stored.offset)
    if target.dtype == stored.dtype:
        _read_exact(f, memoryview(flat.view(torch.uint8).numpy()), stored.path)
        return
    item = torch.empty((), dtype=stored.dtype).element_size()
    per_chunk = max(1, CHUNK_BYTES // item)
    buf = torch.empty(min(per_chunk, flat.numel()), dtype=stored.dtype)
    raw = memoryview(buf.view(torch.uint8).numpy())
    for start in range(0, flat.numel(), per_chunk):
        n = min(per_chunk, flat.numel() - start)
        _read_exact(f, raw[: n * item], stored.path)
        flat[start:start + n].copy_(buf[:n])


def _needs_transformers(config) -> str | None:
    if getattr(config, "quantization_config", None):
        return "the checkpoint is quantised"
    if getattr(config, "auto_map", None):
        return "the model needs remote code"
    return None


def _fill(model, tensors: dict[str, StoredTensor]) -> list[str]:
    """Read every stored tensor into the model's parameter or buffer of the same name; the
    names of the model's tensors that the checkpoint does not hold (tied ones excepted)."""
    targets = dict(model.named_parameters(remove_duplicate=False))  # tied: every name
    targets.update(model.named_buffers())
    unknown = sorted(set(tensors) - set(targets))
    if unknown:
        raise KeyError(f"checkpoint tensors with no model tensor of that name: {unknown[:5]}")
    filled = set()
    by_place = sorted(tensors.items(), key=lambda kv: (kv[1].path, kv[1].offset))
    with torch.no_grad():
        for path, group in itertools.groupby(by_place, key=lambda kv: kv[1].path):
            with open(path, "rb") as f:  # one file at a time, read front to back
                for name, stored in group:
                    read_into(stored, targets[name].data, f)
                    filled.add(targets[name].data_ptr())
    return [n for n, p in model.named_parameters() if p.data_ptr() not in filled]


def load_pretrained(folder: str, dtype: torch.dtype = torch.float32, *, log=print):
    """A causal LM from a local Hugging Face folder, in ``dtype``, peak ~ its size in that
    dtype + ``CHUNK_BYTES`` (module docstring). Returns the model in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    reason = _needs_transformers(config)
    try:
        tensors = checkpoint_tensors(folder)
    except FileNotFoundError as exc:
        reason = reason or f"{exc} (a .bin checkpoint?)"
    if reason is None:
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # tied heads share one tensor before any byte is read
        try:
            missing = _fill(model, tensors)
        except KeyError as exc:
            reason, model = f"its names do not match the model's ({exc.args[0]})", None
        else:
            if missing:
                raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} of the model's "
                                 f"parameters, e.g. {missing[:3]}")
            return model.eval()
    log(f"loading {folder} through transformers.from_pretrained: {reason}; the peak may reach "
        "the model plus the checkpoint's size")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
