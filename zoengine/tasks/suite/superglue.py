"""The SuperGLUE classification tasks (RTE, CB, WSC, WiC, MultiRC) and BoolQ, in the Hugging
Face hub's field names, as MeZO's templates (PromptSource-derived) and datasets
(princeton-nlp/MeZO, large_models/templates.py and tasks.py). Each prompt ends where the
verbalizer's word follows; MultiRC is scored per (paragraph, question, answer) row, as MeZO
does, so a question's grouped answers are separate rows."""

from __future__ import annotations

from zoengine.tasks.suite.registry import (
    FieldProblem,
    Sample,
    TaskSpec,
    label,
    need,
    register_task,
    text,
)

YES_NO = {0: "Yes", 1: "No"}  # RTE: 0 entailment, 1 not_entailment
CB_WORDS = {0: "Yes", 1: "No", 2: "Maybe"}  # entailment, contradiction, neutral
NO_YES = {0: "No", 1: "Yes"}  # WSC, WiC, MultiRC: 0 False, 1 True


def _classifier(fields: tuple, words: dict):
    """``build`` for a task whose prompt reads ``fields`` (strings) and whose ``label`` is one
    of ``words``' keys."""
    def build(row: dict) -> Sample:
        for f in fields:
            text(row, f)
        return Sample(row, list(words), [label(row, "label", words)])
    return build


def _rte(s: Sample) -> str:
    d = s.data
    return f"{d['premise']}\nDoes this mean that \"{d['hypothesis']}\" is true? Yes or No?\n"


def _cb(s: Sample) -> str:
    d = s.data
    return f"Suppose {d['premise']} Can we infer that \"{d['hypothesis']}\"? Yes, No, or Maybe?\n"


def _wsc(s: Sample) -> str:
    d = s.data
    return (f"{d['text']}\nIn the previous sentence, does the pronoun "
            f"\"{d['span2_text'].lower()}\" refer to {d['span1_text']}? Yes or No?\n")


def _wic(s: Sample) -> str:
    d = s.data
    return (f"Does the word \"{d['word']}\" have the same meaning in these two sentences? "
            f"Yes, No?\n{d['sentence1']}\n{d['sentence2']}\n")


def _multirc(s: Sample) -> str:
    d = s.data
    return (f"{d['paragraph']}\nQuestion: {d['question']}\nI found this answer "
            f"\"{d['answer']}\". Is that correct? Yes or No?\n")


def _with_word(encode, words: dict):
    """MeZO's ``verbalize``: the prompt followed directly by the label's word."""
    return lambda s, c: encode(s) + words[c]


def _boolq_build(row: dict) -> Sample:
    text(row, "passage")
    text(row, "question", nonempty=True)
    if "answer" in row:  # the boolq dataset (MeZO's source): a boolean
        v = need(row, "answer")
        if not isinstance(v, bool):
            raise FieldProblem("answer", f"{v!r} is outside the verbalizer: allowed true (Yes), "
                                         "false (No)")
    elif "label" in row:  # super_glue/boolq: 1 True, 0 False
        v = label(row, "label", {1: "Yes", 0: "No"}) == 1
    else:
        raise FieldProblem("answer", "missing (or 'label' as in super_glue/boolq)")
    return Sample(row, ["Yes", "No"], [0 if v else 1])


def _boolq(s: Sample) -> str:
    """MeZO's ``BoolQTemplateV3`` (``BoolQDataset.get_template``'s default, version 2)."""
    q = s.data["question"]
    q = q if q.endswith("?") else q + "?"
    return f"{s.data['passage']} {q[0].upper() + q[1:]}\n"


_TASKS = [
    ("rte", ("premise", "hypothesis"), YES_NO, _rte, "RTETemplate, RTEDataset",
     "super_glue/rte", 500),
    ("cb", ("premise", "hypothesis"), CB_WORDS, _cb, "CBTemplate, CBDataset", "super_glue/cb",
     100),
    ("wsc", ("text", "span1_text", "span2_text"), NO_YES, _wsc, "WSCTemplate, WSCDataset",
     "super_glue/wsc.fixed", 500),
    ("wic", ("word", "sentence1", "sentence2"), NO_YES, _wic, "WICTemplate, WICDataset",
     "super_glue/wic", 500),
    ("multirc", ("paragraph", "question", "answer"), NO_YES, _multirc,
     "MultiRCTemplate, MultiRCDataset", "super_glue/multirc", 500),
]
for _name, _fields, _words, _encode, _source, _hub, _n_dev in _TASKS:
    register_task(_name, TaskSpec(
        name=_name, kind="classification", fields=(*_fields, "label"),
        build=_classifier(_fields, _words), encode=_encode,
        verbalize=_with_word(_encode, _words), verbalizer=_words, source=_source, hub=_hub,
        n_dev=_n_dev))

register_task("boolq", TaskSpec(
    name="boolq", kind="classification", fields=("passage", "question", "answer"),
    build=_boolq_build, encode=_boolq, verbalize=lambda s, c: _boolq(s) + c,
    verbalizer={True: "Yes", False: "No"}, source="BoolQTemplateV3, BoolQDataset",
    hub="boolq"))
