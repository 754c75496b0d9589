"""The final outputs of a run folder, as ``RunFolder.write_final`` checks and records them: only
top-level names the folder does not reserve, the weights among them; no NaN/inf committed as
final weights (read back from their staged copy); and the manifest body that names them (state
``complete``, the pending renames of zoengine.storage.commit)."""

from __future__ import annotations

import os

from zoengine.storage.checkpoint import nonfinite_in
from zoengine.storage.layout import RESERVED, RUN_CONFIG

FINAL_OUTPUTS = "the final outputs"  # what a failed save of them names


def check_final_names(files: dict, weights: str | None) -> None:
    """``files``' names are top-level output names, and ``weights`` (if given) is one of them."""
    for name in files:
        if "/" in name or name.startswith(".") or name in RESERVED or name in ("", ".."):
            raise ValueError(f"write_final: {name!r} is not a top-level output name")
    if weights is not None and weights not in files:
        raise ValueError(f"write_final: weights {weights!r} is not among {list(files)}")


def refuse_nonfinite(path: str, staged: dict, weights: str | None) -> None:
    """No NaN/inf is committed as final weights: the staged weights (a ``.safetensors``
    file, or the ones in a folder) of the run folder ``path`` are read back tensor by tensor
    before the commit."""
    if weights is None:
        return
    bad = nonfinite_in(os.path.join(path, staged[weights]), weights)
    if bad:
        f, tensor, count = bad
        inner = os.path.relpath(f, os.path.join(path, staged[weights]))
        where = weights if inner == "." else f"{weights}/{inner}"
        raise ValueError(f"refusing to commit the final outputs of {path}: {where} "
                         f"tensor {tensor!r} holds {count} NaN/inf values; the folder keeps "
                         "what it held before (its last checkpoint, if any)")


def final_body(old: dict, gen: int, names: list, weights: str | None, entries: dict,
               staged: dict, journal: dict | None, keep_checkpoint: bool) -> dict:
    """The manifest body committing the final outputs ``names`` over ``old``: ``run.json``
    (and the checkpoint, if ``keep_checkpoint``) kept, ``journal`` recorded, the staged temp
    names ``pending`` and the outputs no longer written ``obsolete``."""
    ck = old.get("checkpoint") if keep_checkpoint else None
    files = {k: v for k, v in old["files"].items()
             if (ck and k.startswith(ck["dir"] + "/")) or k == RUN_CONFIG}
    files.update(entries)
    old_names = (old.get("final") or {}).get("names", [])
    return {"kind": "run", "generation": gen, "state": "complete", "files": files,
            "checkpoint": ck, "final": {"names": names, "weights": weights},
            "journal": journal,
            "pending": {"staged": staged, "obsolete": [n for n in old_names if n not in names]}}
