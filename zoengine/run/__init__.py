"""Running a fine-tune end to end: the config, what is trained (strategies), the one loop, the
output folder and its report, evaluation and pruning jobs. ``zoengine.cli`` and ``zoengine.hf``
sit above this package; ``zoengine.tasks``, ``zoengine.sparsity``, ``zoengine.storage`` and
``zoengine.optim`` below.

The names below load on first use (PEP 562), so ``zoengine.run.config`` (and with it the CLI's
parser) imports without torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "DEFAULT_MODEL": "config", "MODE_DEFAULTS": "config", "TRAIN_MODES": "config",
    "RunConfig": "config", "run_eval": "evaluate", "make_optimizer": "job", "run_train": "job",
    "LOOP_STARTED": "loop", "run_loop": "loop", "auto_threads": "resources",
    "load_model": "resources", "ClassifierStrategy": "strategies", "HeadStrategy": "strategies",
    "LMStrategy": "strategies", "Strategy": "strategies", "make_strategy": "strategies",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'zoengine.run' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"zoengine.run.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
