"""Running a fine-tune end to end: the config, what is trained (strategies), the one loop, the
output folder and its report, evaluation and pruning jobs. ``zoengine.cli`` and ``zoengine.hf``
sit above this package; ``zoengine.tasks``, ``zoengine.sparsity`` and ``zoengine.optim`` below.
"""

from zoengine.run.config import DEFAULT_MODEL, MODE_DEFAULTS, TRAIN_MODES, RunConfig
from zoengine.run.evaluate import run_eval
from zoengine.run.job import make_optimizer, run_train
from zoengine.run.loop import LOOP_STARTED, run_loop
from zoengine.run.resources import auto_threads, load_model
from zoengine.run.strategies import (
    ClassifierStrategy,
    HeadStrategy,
    LMStrategy,
    Strategy,
    make_strategy,
)

__all__ = ["DEFAULT_MODEL", "LOOP_STARTED", "MODE_DEFAULTS", "TRAIN_MODES", "ClassifierStrategy",
           "HeadStrategy", "LMStrategy", "RunConfig", "Strategy", "auto_threads", "load_model",
           "make_optimizer", "make_strategy", "run_eval", "run_loop", "run_train"]
