"""SHA-256 of a file, read in chunks: the one helper the run folder's manifest, the KD teacher
cache and the default model's cached conversion share. Stdlib only (layer 0)."""

from __future__ import annotations

import hashlib

_CHUNK = 1 << 20  # 1 MiB reads: hashing runs at disk speed with a small buffer


def sha256_file(path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of the file at ``path``."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()
