"""MeZO's sampling of a run's examples (princeton-nlp/MeZO, large_models/tasks.py
``Dataset.sample_train_sets`` / ``sample_subset`` and large_models/run.py ``main``).

With seed s (MeZO's ``--train_set_seed``): the training rows are permuted by
``np.random.seed(s); np.random.permutation(n)``, the first ``n_train + n_dev`` are kept, the
last ``n_dev`` of those are the dev set and the rest the training set; the test set is the first
``n_test`` rows of the validation file under the same seed's permutation (all of them, permuted,
when it has fewer). ``RandomState(s).permutation`` draws the same permutation without touching
numpy's global state."""

from __future__ import annotations

import numpy as np

from zoengine.tasks.suite.registry import SuiteDataError

N_TRAIN, N_TEST = 1000, 1000  # MeZO's mezo.sh: TRAIN=1000, EVAL=1000; DEV per task (n_dev)


def permuted(n: int, seed: int, k: int) -> list[int]:
    """The first ``k`` indices of seed ``seed``'s permutation of ``range(n)`` (MeZO's
    ``sample_subset``)."""
    return np.random.RandomState(seed).permutation(n).tolist()[:k]


def sample_splits(train: list, validation: list, *, seed: int, n_train: int, n_dev: int,
                  n_test: int, train_path: str = "train.jsonl") -> dict:
    """``{"train", "dev", "test"}`` drawn as MeZO draws them (module docstring). A training
    file with no more than ``n_dev`` rows leaves no training rows: refused."""
    for name, v in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}: must be an integer >= 1")
    pool = [train[i] for i in permuted(len(train), seed, n_train + n_dev)]
    if len(pool) <= n_dev:
        raise SuiteDataError(train_path, 0, None, f"{len(train)} rows: the dev set takes "
                             f"{n_dev} of them first (MeZO's sampling), which leaves no "
                             "training rows; give more rows or fewer dev rows (--split-sizes)",
                             flag="--split-sizes")
    test = [validation[i] for i in permuted(len(validation), seed, n_test)]
    return {"train": pool[:-n_dev], "dev": pool[-n_dev:], "test": test}
