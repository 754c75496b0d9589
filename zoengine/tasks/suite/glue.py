"""SST-2 (GLUE, fields ``sentence``, ``label``), as MeZO's ``SST2Template`` /
``SST2Dataset`` (princeton-nlp/MeZO, large_models/templates.py and tasks.py)."""

from __future__ import annotations

from zoengine.tasks.suite.registry import Sample, TaskSpec, label, register_task, text

SST2_WORDS = {0: "terrible", 1: "great"}


def _sst2(row: dict) -> Sample:
    text(row, "sentence")
    return Sample(row, [0, 1], [label(row, "label", SST2_WORDS)])


register_task("sst2", TaskSpec(
    name="sst2", kind="classification", fields=("sentence", "label"), build=_sst2,
    encode=lambda s: f"{s.data['sentence'].strip()} It was",
    verbalize=lambda s, c: f"{s.data['sentence'].strip()} It was {SST2_WORDS[c]}",
    verbalizer=SST2_WORDS, source="SST2Template, SST2Dataset", hub="glue/sst2"))
