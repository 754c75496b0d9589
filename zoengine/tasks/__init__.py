"""Tasks: loading data sets (``datasets``, local files only), scoring prompts with a causal LM,
and the metrics of a run (accuracy, AUC, the dev-calibrated baseline, perplexity); MeZO's
prompt-based task suite read from local files (``zoengine.tasks.suite``, docs/tasks.md).

Sits beside ``zoengine.sparsity``, above ``zoengine.optim`` (it needs none of it) and below
``zoengine.run``.
"""

from zoengine.tasks.data import (
    BUNDLED,
    FILE_TASKS,
    ClassificationTask,
    LMTask,
    TaskError,
    column,
    load_task,
    shakespeare,
    task_from_file,
    tweet_sentiment,
)
from zoengine.tasks.distill import (
    KDBatch,
    KDCacheError,
    TeacherCache,
    build_teacher_cache,
    cache_nbytes,
    check_kd_weight,
    kd_batch_loss,
    kd_loss,
    lm_cross_entropy,
    mixed_loss,
)
from zoengine.tasks.metrics import auc, auc_binary, class_metrics, evaluate_scores, fit_bias
from zoengine.tasks.scoring import (
    OptionScorer,
    encode_prompts,
    last_features,
    left_pad,
    length_batches,
    lm_blocks,
    lm_eval,
    lm_loss,
)
from zoengine.tasks.suite import SuiteTask, load_suite_task, register_task, task_names

__all__ = ["BUNDLED", "FILE_TASKS", "ClassificationTask", "LMTask", "OptionScorer", "TaskError", "auc",
           "auc_binary", "class_metrics", "column", "encode_prompts", "evaluate_scores",
           "fit_bias", "last_features", "left_pad", "length_batches", "lm_blocks", "lm_eval",
           "lm_loss", "load_task", "shakespeare", "task_from_file", "tweet_sentiment",
           "KDBatch", "KDCacheError", "TeacherCache", "build_teacher_cache", "cache_nbytes",
           "check_kd_weight", "kd_batch_loss", "kd_loss", "lm_cross_entropy", "mixed_loss",
           "SuiteTask", "load_suite_task", "register_task", "task_names"]
