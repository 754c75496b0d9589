"""``keep_masks.safetensors``: a pruned run's keep-masks as bits, written beside its adapter so
``zoengine merge`` restores the pruned base exactly."""

from __future__ import annotations

MASKS_FILE = "keep_masks.safetensors"


def masks_writer(masks: dict):
    """A writer of ``keep_masks.safetensors``: each keep-mask as bits (uint8) with its shape in
    the metadata, so ``zoengine merge`` restores the pruned base exactly (1/32 of fp32)."""
    from safetensors.torch import save_file

    from zoengine.optim.masks import pack_mask

    def write(path: str) -> None:
        tensors = {n: pack_mask(m) for n, m in masks.items()}
        meta = {n: ",".join(map(str, m.shape)) for n, m in masks.items()}
        save_file(tensors, path, metadata=meta)
    return write


def read_masks(path: str) -> dict:
    from safetensors import safe_open

    from zoengine.optim.masks import unpack_mask

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        return {n: unpack_mask(f.get_tensor(n), tuple(int(x) for x in meta[n].split(",") if x))
                for n in f.keys()}
