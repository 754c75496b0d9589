"""The files of one checkpoint (``checkpoints/step-<n>/``): write them durably, read them back
refusing non-finite weights, and say clearly why a save failed. ``RunFolder`` commits them
(zoengine.storage.folder); this module never touches the manifest.

    weights.safetensors   the trained tensors
    optimizer.pt          ``torch.save`` of the optimizer's state_dict (read weights_only)
    state.json            the loop's extra state (RNG states, loss curve), JSON (NaN allowed)
"""

from __future__ import annotations

import errno
import json
import os

from zoengine.faults import crashpoint
from zoengine.storage.fsio import fsync_tree, remove, write_bytes
from zoengine.storage.manifest import IntegrityError

WEIGHTS, OPTIMIZER, STATE = "weights.safetensors", "optimizer.pt", "state.json"
CHECKPOINT_FILES = (WEIGHTS, OPTIMIZER, STATE)


class SaveError(OSError):
    """A save failed (disk full, I/O error); what the manifest named before is intact."""


def nonfinite(tensors: dict) -> tuple[str, int] | None:
    """(name, count) of the first floating tensor holding NaN or inf; None if all finite."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return name, bad
    return None


def nonfinite_in(path: str, name: str | None = None) -> tuple[str, str, int] | None:
    """(file, tensor, count) of the first floating tensor holding NaN or inf in the
    ``.safetensors`` file ``path`` (``name``: its final name, when ``path`` is a temp) or the
    ``.safetensors`` files under the folder ``path``; None if all are finite (or there are
    none). Reads one tensor at a time."""
    from safetensors import safe_open

    if os.path.isdir(path):
        files = sorted(os.path.join(root, n) for root, _, names in os.walk(path)
                       for n in names if n.endswith(".safetensors"))
    else:
        files = [path] if (name or path).endswith(".safetensors") else []
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                bad = nonfinite({name: st.get_tensor(name)})
                if bad:
                    return f, name, bad[1]
    return None


def _save_tensors(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v  # safetensors refuses shared storage
        seen.add(ptr)
    save_file(out, path, metadata={"kind": "zoengine-checkpoint"})


def _save_optimizer(state: dict, path: str) -> None:
    import torch

    torch.save(state, path)


def encode_extra(step: int, extra: dict) -> bytes:
    try:
        return json.dumps(extra, sort_keys=True).encode()  # NaN allowed: a skipped step's loss
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint step {step}: extra state is not JSON: {exc}") from None


def write_checkpoint_dir(tmp: str, tensors: dict, optimizer_state: dict, state: bytes) -> None:
    """Write the three files into the fresh folder ``tmp`` and fsync them and it."""
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    remove(tmp)
    os.makedirs(tmp)
    _save_tensors(tensors, os.path.join(tmp, WEIGHTS))
    crashpoint("save-weights-written")
    _save_optimizer(optimizer_state, os.path.join(tmp, OPTIMIZER))
    crashpoint("save-optimizer-written")
    write_bytes(os.path.join(tmp, STATE), state)
    fsync_tree(tmp)
    crashpoint("save-files-written")


def read_checkpoint_files(paths: dict, *, flag: str | None = None) -> tuple[dict, dict, dict]:
    """(tensors, optimizer_state, extra) from verified files ``{name: path}``; tensors with
    NaN or inf are refused with an ``IntegrityError`` naming the file and the tensor."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(paths[WEIGHTS])
    bad = nonfinite(tensors)
    if bad:
        raise IntegrityError(f"{paths[WEIGHTS]}: tensor {bad[0]!r} holds {bad[1]} NaN/inf "
                             "values; refusing to resume from it", path=paths[WEIGHTS],
                             flag=flag)
    opt = torch.load(paths[OPTIMIZER], map_location="cpu", weights_only=True)
    with open(paths[STATE], encoding="utf-8") as f:
        extra = json.load(f)
    return tensors, opt, extra


def save_error(exc: BaseException, what: str, folder: str, kept: str) -> BaseException:
    """A ``SaveError`` saying what could not be saved where, why (the disk full, an I/O
    error) and what is still intact; ``exc`` itself when it is not an I/O failure."""
    if not isinstance(exc, OSError) and type(exc).__name__ != "SafetensorError":
        return exc
    code = getattr(exc, "errno", None)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in reason
    return SaveError(code or errno.EIO, f"cannot save {what} in {folder}: {reason}"
                                        f"{' (the disk is full)' if full else ''}; {kept}")
