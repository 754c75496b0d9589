"""The task registry of the prompt-based suite: one ``TaskSpec`` per task, registered by name.

A spec says how to read one row of the dataset (in the dataset's own field names) into a
``Sample`` (the candidates and the correct ones), how to write the prompt (MeZO's
``Template.encode``) and the prompt with a candidate (``Template.verbalize``), and how the task
is scored and measured. Adding a task is one small module that calls ``register_task``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from zoengine.tasks.data import TaskError

KINDS = ("classification", "multiple_choice", "generation")
METRICS = ("accuracy", "f1")


class FieldProblem(ValueError):
    """A row's field is missing or holds a value the task cannot use (raised by a spec's
    ``build``; the file reader adds the file and the line)."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"field {field_name!r}: {problem}")
        self.field, self.problem = field_name, problem


class SuiteDataError(TaskError):
    """A task file cannot be used: names the file, the line (1-based; 0 for the whole file;
    ``unit`` "row" in a ``save_to_disk`` folder) and the field."""

    def __init__(self, path: str, line: int, field_name: str | None, problem: str,
                 flag: str = "--data-dir", unit: str = "line"):
        where = f"{path}, {unit} {line}" if line else path
        what = f", field {field_name!r}" if field_name else ""
        super().__init__(flag, f"{where}{what}: {problem}")
        self.path, self.line, self.field, self.problem = path, line, field_name, problem


@dataclass
class Sample:
    """One row: ``data`` (the row, the dataset's fields), ``candidates`` (what ``verbalize``
    takes: label ids for classification, texts for multiple choice, ``[]`` for generation),
    ``gold`` (indices into ``candidates``; for generation the reference answers) and where it
    came from (``source``: file, line)."""

    data: dict
    candidates: list
    gold: list
    source: tuple = ("", 0)


@dataclass(frozen=True)
class TaskSpec:
    """How a task reads, formats, scores and measures its rows.

    ``build(row) -> Sample`` raises ``FieldProblem``; ``encode(sample) -> str`` is the prompt
    without an answer, ``verbalize(sample, candidate) -> str`` the prompt with one (MeZO's
    templates). ``kind``: classification (trained as classification over the verbalizer's
    words), multiple_choice (candidates' length-normalised log-likelihood; trained on the
    correct candidate's tokens) or generation (greedy decoding; trained on the first answer's
    tokens). ``n_dev``: dev rows drawn from the training file (MeZO's mezo.sh).
    ``extra_metrics``: "f1" / "em" reported beside ``metric`` (the predicted candidate's or
    answer's text against the references). ``verbalizer``, ``source``, ``hub``: for the
    documentation."""

    name: str
    kind: str
    fields: tuple
    build: Callable[[dict], Sample]
    encode: Callable[[Sample], str]
    verbalize: Callable[[Sample, object], str]
    metric: str = "accuracy"
    n_dev: int = 500
    verbalizer: dict = field(default_factory=dict)
    extra_metrics: tuple = ()
    source: str = ""
    hub: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: must be one of {', '.join(KINDS)}")
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}: must be one of {', '.join(METRICS)}")
        if not isinstance(self.n_dev, int) or self.n_dev < 1:
            raise ValueError(f"n_dev={self.n_dev!r}: must be an integer >= 1")

    def target(self, sample: Sample):
        """The candidate trained on by teacher forcing: the first correct candidate (MeZO:
        ``candidates.index(correct_candidate[0])``), or the first answer of a generation task."""
        return sample.gold[0] if self.kind == "generation" else sample.candidates[sample.gold[0]]


_REGISTRY: dict[str, TaskSpec] = {}
_LISTENERS: list = []


def on_register(listener: Callable[[str], None]) -> None:
    """Call ``listener(name)`` for every task registered, now and later (the package exposes
    each name to ``zoengine.tasks.load_task`` this way)."""
    _LISTENERS.append(listener)
    for name in _REGISTRY:
        listener(name)


def register_task(name: str, spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add ``spec`` under ``name`` (``--task name``). A name already taken is refused unless
    ``replace`` is set."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"name={name!r}: must be a non-empty name without surrounding spaces")
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"spec={type(spec).__name__}: must be a TaskSpec")
    if name in _REGISTRY and not replace:
        raise ValueError(f"name={name!r}: already registered (pass replace=True to replace it)")
    _REGISTRY[name] = spec
    for listener in _LISTENERS:
        listener(name)
    return spec


def get_task(name: str) -> TaskSpec:
    """The spec registered as ``name``; a ``TaskError`` naming ``--task`` otherwise."""
    if name not in _REGISTRY:
        raise TaskError("--task", f"{name!r}: not a suite task (registered: "
                                  f"{', '.join(task_names())})")
    return _REGISTRY[name]


def task_names() -> tuple[str, ...]:
    """The registered suite tasks, in registration order."""
    return tuple(_REGISTRY)


# ---- field readers for ``build`` -------------------------------------------------------------

def need(row: dict, name: str):
    """``row[name]``, or ``FieldProblem`` when the field is missing or null."""
    if not isinstance(row, dict):
        raise FieldProblem(name, f"the row is a {type(row).__name__}, not an object")
    if name not in row or row[name] is None:
        raise FieldProblem(name, "missing")
    return row[name]


def text(row: dict, name: str, *, nonempty: bool = False) -> str:
    """A string field (``nonempty``: with a non-space character)."""
    v = need(row, name)
    if not isinstance(v, str):
        raise FieldProblem(name, f"{v!r} is a {type(v).__name__}, not a string")
    if nonempty and not v.strip():
        raise FieldProblem(name, "empty")
    return v


def label(row: dict, name: str, verbalizer: dict) -> int:
    """An integer label among ``verbalizer``'s keys."""
    v = need(row, name)
    if isinstance(v, bool) or not isinstance(v, int) or v not in verbalizer:
        allowed = ", ".join(f"{k} ({w})" for k, w in verbalizer.items())
        raise FieldProblem(name, f"{v!r} is outside the verbalizer: allowed {allowed}")
    return v


def strings(row: dict, name: str, key: str | None = None, *, nonempty: bool = True) -> list:
    """A list of strings: ``row[name]`` or, with ``key``, ``row[name][key]`` (SQuAD's
    ``answers.text``, DROP's ``answers_spans.spans``)."""
    v = need(row, name)
    where = name if key is None else f"{name}.{key}"
    if key is not None:
        if not isinstance(v, dict) or v.get(key) is None:
            raise FieldProblem(where, "missing")
        v = v[key]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise FieldProblem(where, f"{v!r}: must be a list of strings")
    if nonempty and not v:
        raise FieldProblem(where, "empty: needs at least one")
    return list(v)
