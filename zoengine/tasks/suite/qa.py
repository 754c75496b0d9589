"""The generation tasks: SQuAD (``title``, ``context``, ``question``, ``answers.text``) and
DROP (``passage``, ``question``, ``answers_spans.spans``), as MeZO's ``SQuADv2Template`` /
``DROPTemplate`` with ``SQuADDataset`` / ``DROPDataset`` (princeton-nlp/MeZO,
large_models/templates.py and tasks.py). The answer is decoded greedily and scored by F1
against every reference answer (the best counts); training teaches the first answer."""

from __future__ import annotations

from zoengine.tasks.suite.registry import Sample, TaskSpec, register_task, strings, text


def _squad_build(row: dict) -> Sample:
    for f in ("title", "context", "question"):
        text(row, f)
    return Sample(row, [], strings(row, "answers", "text"))


def _squad(s: Sample) -> str:
    d = s.data
    return f"Title: {d['title']}\nContext: {d['context']}\nQuestion: {d['question'].strip()}\nAnswer:"


def _drop_build(row: dict) -> Sample:
    for f in ("passage", "question"):
        text(row, f)
    return Sample(row, [], strings(row, "answers_spans", "spans"))


def _drop(s: Sample) -> str:
    return f"Passage: {s.data['passage']}\nQuestion: {s.data['question'].strip()}\nAnswer:"


register_task("squad", TaskSpec(
    name="squad", kind="generation", fields=("title", "context", "question", "answers"),
    build=_squad_build, encode=_squad, verbalize=lambda s, a: f"{_squad(s)} {a}\n",
    metric="f1", extra_metrics=("em",), source="SQuADv2Template, SQuADDataset", hub="squad"))

register_task("drop", TaskSpec(
    name="drop", kind="generation", fields=("passage", "question", "answers_spans"),
    build=_drop_build, encode=_drop, verbalize=lambda s, a: f"{_drop(s)} {a}\n",
    metric="f1", extra_metrics=("em",), source="DROPTemplate, DROPDataset", hub="drop"))
