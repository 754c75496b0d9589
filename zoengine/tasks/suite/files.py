"""Reading a suite task's splits from a local folder: ``train.jsonl``, ``validation.jsonl``
(and ``test.jsonl``), one JSON object a line in the dataset's own field names, or a folder
written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (one sub-folder a
split, read with ``datasets.load_from_disk``). Every row is checked by the task's ``build``; a
bad one raises ``SuiteDataError`` naming the file, the line (row) and the field."""

from __future__ import annotations

import json
import os

from zoengine.tasks.suite.registry import FieldProblem, Sample, SuiteDataError, TaskSpec

SPLITS = ("train", "validation", "test")


def split_source(data_dir: str, split: str) -> str | None:
    """The file or folder holding ``split`` in ``data_dir`` (``<split>.jsonl`` first, then a
    ``save_to_disk`` folder ``<split>/``), or None."""
    path = os.path.join(data_dir, f"{split}.jsonl")
    if os.path.isfile(path):
        return path
    folder = os.path.join(data_dir, split)
    if os.path.isfile(os.path.join(folder, "state.json")):
        return folder
    return None


def _build(spec: TaskSpec, row, path: str, line: int, unit: str) -> Sample:
    try:
        sample = spec.build(row)
    except FieldProblem as exc:
        raise SuiteDataError(path, line, exc.field, exc.problem, unit=unit) from None
    sample.source = (path, line)
    return sample


def read_jsonl(spec: TaskSpec, path: str) -> list[Sample]:
    """Every row of a JSON-lines file as a ``Sample`` (blank lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SuiteDataError(path, n, None, f"not valid JSON ({exc.msg} at column "
                                                    f"{exc.colno})") from None
            out.append(_build(spec, row, path, n, "line"))
    return out


def read_arrow(spec: TaskSpec, folder: str) -> list[Sample]:
    """Every row of a ``save_to_disk`` folder as a ``Sample`` (rows numbered from 1)."""
    from datasets import load_from_disk

    try:
        ds = load_from_disk(folder)
    except Exception as exc:  # noqa: BLE001 - datasets raises several kinds
        raise SuiteDataError(folder, 0, None, f"cannot be read by datasets.load_from_disk: "
                                              f"{type(exc).__name__}: {exc}") from None
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):
        raise SuiteDataError(folder, 0, None, "holds a DatasetDict; give its parent folder")
    out, n = [], 0
    for batch in ds.iter(batch_size=1000):
        cols = list(batch)
        for values in zip(*(batch[c] for c in cols)):
            n += 1
            out.append(_build(spec, dict(zip(cols, values)), folder, n, "row"))
    return out


def read_split(spec: TaskSpec, data_dir: str, split: str, *, required: bool = True
               ) -> list[Sample] | None:
    """The rows of ``split`` (train, validation, test) in ``data_dir``; a missing required
    split or an empty one raises ``SuiteDataError``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if not os.path.isdir(data_dir):
        raise SuiteDataError(data_dir, 0, None, "no such folder")
    src = split_source(data_dir, split)
    if src is None:
        if not required:
            return None
        raise SuiteDataError(os.path.join(data_dir, f"{split}.jsonl"), 0, None,
                             f"missing: --task {spec.name} needs {split}.jsonl (or a "
                             f"save_to_disk folder {split}/) with the fields "
                             f"{', '.join(spec.fields)}")
    rows = read_jsonl(spec, src) if os.path.isfile(src) else read_arrow(spec, src)
    if not rows:
        raise SuiteDataError(src, 0, None, "empty split: no rows")
    return rows
