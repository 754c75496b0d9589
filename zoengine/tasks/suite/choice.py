"""The multiple-choice tasks: COPA (``premise``, ``choice1``, ``choice2``, ``question``,
``label``) and ReCoRD (``passage``, ``query``, ``entities``, ``answers``), as MeZO's
``CopaTemplate`` and ``ReCoRDTemplateGPT3`` with ``CopaDataset`` / ``ReCoRDDataset``
(princeton-nlp/MeZO, large_models/templates.py and tasks.py). The candidates are COPA's two
choices and ReCoRD's entities; ReCoRD may have several correct entities (``answers``)."""

from __future__ import annotations

from zoengine.tasks.suite.registry import (
    FieldProblem,
    Sample,
    TaskSpec,
    label,
    register_task,
    strings,
    text,
)

CONJUNCTIONS = {"cause": " because ", "effect": " so "}


def _copa_build(row: dict) -> Sample:
    text(row, "premise")
    choices = [text(row, "choice1", nonempty=True), text(row, "choice2", nonempty=True)]
    q = text(row, "question")
    if q not in CONJUNCTIONS:
        raise FieldProblem("question", f"{q!r}: must be 'cause' or 'effect'")
    return Sample(row, choices, [label(row, "label", {0: "choice1", 1: "choice2"})])


def _copa(s: Sample) -> str:
    """The premise without its final full stop, then ' because ' (cause) or ' so ' (effect)."""
    premise = s.data["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    return premise + CONJUNCTIONS[s.data["question"]]


def copa_choice(c: str) -> str:
    """MeZO's "correct" capitalisation: the choice's first word lower-cased unless it is 'I'."""
    words = c.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def _record_build(row: dict) -> Sample:
    text(row, "passage")
    query = text(row, "query")
    if "@placeholder" not in query:
        raise FieldProblem("query", "has no @placeholder")
    entities = strings(row, "entities")
    answers = strings(row, "answers")
    missing = [a for a in answers if a not in entities]
    if missing:
        raise FieldProblem("answers", f"{missing!r} not among the entities {entities!r}")
    return Sample(row, entities, sorted({entities.index(a) for a in answers}))


def _record_passage(s: Sample) -> str:
    return s.data["passage"].replace("@highlight\n", "- ")


register_task("copa", TaskSpec(
    name="copa", kind="multiple_choice",
    fields=("premise", "choice1", "choice2", "question", "label"), build=_copa_build,
    encode=_copa, verbalize=lambda s, c: _copa(s) + copa_choice(c), n_dev=100,
    source="CopaTemplate, CopaDataset", hub="super_glue/copa"))

register_task("record", TaskSpec(
    name="record", kind="multiple_choice", fields=("passage", "query", "entities", "answers"),
    build=_record_build, encode=lambda s: _record_passage(s) + "\n-",
    verbalize=lambda s, c: f"{_record_passage(s)}\n- {s.data['query'].replace('@placeholder', c)}",
    extra_metrics=("f1", "em"), source="ReCoRDTemplateGPT3, ReCoRDDataset", hub="super_glue/record"))
