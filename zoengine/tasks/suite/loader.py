"""A suite task ready to run: the registered spec, the rows read from ``--data-dir`` and
MeZO's train/dev/test sample of them (``zoengine.tasks.suite.sampling``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from zoengine.tasks.suite.files import read_split, split_source
from zoengine.tasks.suite.registry import TaskSpec, get_task
from zoengine.tasks.suite.sampling import N_TEST, N_TRAIN, sample_splits

TEST_SPLITS = ("validation", "test")


@dataclass
class SuiteTask:
    """A task of the suite: ``splits`` maps train / dev / test to lists of ``Sample``."""

    name: str
    spec: TaskSpec
    splits: dict
    kind: str = "suite"
    meta: dict = field(default_factory=dict)


def default_sizes(spec: TaskSpec) -> tuple[int, int, int]:
    """MeZO's (train, dev, test) counts for ``spec``: 1000, the task's dev count, 1000."""
    return N_TRAIN, spec.n_dev, N_TEST


def load_suite_task(name: str, data_dir: str, *, seed: int = 0, sizes=None,
                    test_split: str = "validation") -> SuiteTask:
    """Read ``name``'s files from ``data_dir`` and sample them as MeZO does.

    ``sizes``: (n_train, n_dev, n_test), default MeZO's (``default_sizes``). ``test_split``:
    where the test rows come from: ``validation`` (MeZO: the hub's test labels are hidden) or
    ``test`` (a labelled ``test.jsonl``, drawn the same way)."""
    spec = get_task(name)
    if test_split not in TEST_SPLITS:
        raise ValueError(f"test_split={test_split!r}: must be one of {', '.join(TEST_SPLITS)}")
    n_train, n_dev, n_test = default_sizes(spec) if sizes is None else tuple(sizes)
    train = read_split(spec, data_dir, "train")
    held = read_split(spec, data_dir, test_split)
    splits = sample_splits(train, held, seed=seed, n_train=n_train, n_dev=n_dev,
                           n_test=n_test, train_path=split_source(data_dir, "train"))
    meta = {"data_dir": os.path.abspath(data_dir), "seed": seed,
            "sizes": {"train": n_train, "dev": n_dev, "test": n_test},
            "rows": {"train": len(train), test_split: len(held)},
            "drawn": {k: len(v) for k, v in splits.items()}, "test_from": test_split,
            "metric": spec.metric, "kind": spec.kind}
    return SuiteTask(name=name, spec=spec, splits=splits, meta=meta)


def load_for_run(name: str, seed: int = 0, *, data_dir: str | None = None,
                 split_sizes=None, **_ignored) -> SuiteTask:
    """``zoengine.tasks.load_task``'s entry for a suite task (the run's other task options
    do not apply to it)."""
    if data_dir is None:
        from zoengine.tasks.data import TaskError

        raise TaskError("--data-dir", f"--task {name} reads local files: give --data-dir DIR "
                                      "holding train.jsonl and validation.jsonl "
                                      "(docs/tasks.md)")
    return load_suite_task(name, data_dir, seed=seed, sizes=split_sizes)
