"""MeZO's prompt-based task suite, read from the user's local files: SST-2, RTE, CB, BoolQ, WSC,
WiC, MultiRC (classification), COPA, ReCoRD (multiple choice), SQuAD, DROP (generation), with
MeZO's templates and verbalizers, its 1,000 / 500 / 1,000 sampling with a seed, its scoring and
its metrics (docs/tasks.md).

A task is a ``TaskSpec`` registered by name (``register_task``); each family lives in its own
small module (``glue``, ``superglue``, ``choice``, ``qa``). Registering a task also makes it a
``zoengine.tasks.load_task`` name, so ``zoengine train --task NAME --data-dir DIR`` runs it.
"""

from functools import partial

from zoengine.tasks.data import FILE_TASKS
from zoengine.tasks.suite.encoding import (
    MAX_NEW_TOKENS,
    Encoded,
    encode_candidates,
    encode_prompt,
    encode_target,
    full_text,
    prompt_text,
)
from zoengine.tasks.suite.files import read_split
from zoengine.tasks.suite.loader import SuiteTask, default_sizes, load_for_run, load_suite_task
from zoengine.tasks.suite.metrics import exact_match, f1, measure, normalize_answer
from zoengine.tasks.suite.registry import (
    FieldProblem,
    Sample,
    SuiteDataError,
    TaskSpec,
    get_task,
    on_register,
    register_task,
    task_names,
)
from zoengine.tasks.suite.sampling import sample_splits
from zoengine.tasks.suite.scoring import (
    candidate_scores,
    greedy_answers,
    predict,
    training_loss,
)


def _expose(name: str) -> None:
    FILE_TASKS[name] = partial(load_for_run, name)


on_register(_expose)

from zoengine.tasks.suite import choice, glue, qa, superglue  # noqa: E402,F401  (registers)

__all__ = ["MAX_NEW_TOKENS", "Encoded", "FieldProblem", "Sample", "SuiteDataError", "SuiteTask",
           "TaskSpec", "candidate_scores", "default_sizes", "encode_candidates",
           "encode_prompt", "encode_target", "exact_match", "f1", "full_text", "get_task",
           "greedy_answers", "load_suite_task", "measure", "normalize_answer", "predict",
           "prompt_text", "read_split", "register_task", "sample_splits", "task_names",
           "training_loss"]
