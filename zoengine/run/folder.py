"""A run's output folder, written so that an interrupted run never leaves a half-written file:
atomic files and folders (temp + ``os.replace``) and the trained weights."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager


def _tmp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp-{os.getpid()}")


def atomic_write(path: str, data: bytes) -> None:
    """Write ``path`` completely or not at all (temp file in the same folder, fsync, rename)."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: str):
    """Yield a temp folder; on success it replaces ``path`` as a whole, on error it is removed."""
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        old = path + ".old-" + str(os.getpid())
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temps(folder: str) -> None:
    """Remove temp files left by a killed run (``.<name>.tmp-<pid>``)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".") and ".tmp-" in name:
                p = os.path.join(folder, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)


def make_tmpdir() -> str:
    return tempfile.mkdtemp(prefix="zoengine-")


def save_weights(cfg, out_dir: str, trained, tok) -> str:
    """Write the trained weights atomically; returns the path written.

    ``head``: ``head.safetensors`` (the option rows, their bias and token ids); ``lora``: the
    PEFT ``adapter`` folder; ``full``: a ``model`` folder with the tokenizer."""
    from safetensors.torch import save_file

    if cfg.train == "head":
        path = os.path.join(out_dir, "head.safetensors")
        tmp = _tmp_name(path)
        try:
            save_file({k: v.contiguous() for k, v in trained.items()}, tmp,
                      metadata={"model": str(cfg.model), "task": str(cfg.task),
                                "kind": "zoengine-head-rows"})
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path
    name = "adapter" if cfg.train == "lora" else "model"
    path = os.path.join(out_dir, name)
    with atomic_dir(path) as tmp:
        trained.save_pretrained(tmp, safe_serialization=True)
        if cfg.train == "full":
            tok.save_pretrained(tmp)
    return path
