"""MeZO's task suite from local files: every task reads its fixture files (the hub's field
names, every field shape of the real data), formats its prompts character for character as
MeZO's templates do (princeton-nlp/MeZO, large_models/templates.py; the expected strings below
are written by hand from those templates), samples as MeZO does and measures as MeZO does.

``write_suite(folder)`` (used by the other test_task_suite*.py files) writes a few dozen rows per
task and split: SQuAD rows with several answers, ReCoRD rows with entity spans and two correct
entities, MultiRC questions whose answers are grouped rows, BoolQ questions without '?'.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from zoengine.tasks import load_task
from zoengine.tasks.suite import (
    SuiteDataError,
    TaskSpec,
    full_text,
    get_task,
    load_suite_task,
    prompt_text,
    register_task,
    sample_splits,
    task_names,
)
from zoengine.tasks.suite.metrics import accuracy, exact_match, f1, measure, normalize_answer

SUITE = ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad",
         "drop")
ADJ = ("good", "bad", "great", "terrible", "fine", "dull")


def _rows(task: str, n: int, off: int) -> list[dict]:
    """``n`` rows of ``task`` in its hub fields; ``off`` makes validation rows differ."""
    make = ROWS[task]
    return [make(i + off) for i in range(n)]


def _multirc(i: int) -> dict:
    q, a = divmod(i, 3)  # three answers (rows) per question: grouped by idx
    return {"paragraph": f"Paragraph {q // 2}. The day is {ADJ[q % 6]}.",
            "question": f"Is the day {ADJ[(q + a) % 6]}?", "answer": f"it is {ADJ[a]}",
            "idx": {"paragraph": q // 2, "question": q, "answer": a}, "label": int(a == 0)}


def _record(i: int) -> dict:
    ents = ["Paris", "London", "Anna Smith", "the movie"][: 2 + i % 3]
    passage = f"{ents[0]} met {ents[1]} on day {i}.\n@highlight\n{ents[1]} is {ADJ[i % 6]}"
    answers = [ents[i % len(ents)]] + ([ents[-1]] if i % 4 == 0 and len(ents) > 2 else [])
    spans = {"text": ents, "start": [passage.find(e) for e in ents],
             "end": [passage.find(e) + len(e) - 1 for e in ents]}
    return {"passage": passage, "query": f"@placeholder liked the {ADJ[i % 6]} day",
            "entities": ents, "entity_spans": spans, "answers": sorted(set(answers)),
            "idx": {"passage": i, "query": i}}


ROWS = {
    "sst2": lambda i: {"sentence": f"a {ADJ[i % 6]} movie {i} ", "label": i % 2, "idx": i},
    "rte": lambda i: {"premise": f"The day {i} is {ADJ[i % 6]}.", "hypothesis": "It is good.",
                      "label": i % 2, "idx": i},
    "cb": lambda i: {"premise": f"The day {i} is {ADJ[i % 6]}.", "hypothesis": "it is good",
                     "label": i % 3, "idx": i},
    "boolq": lambda i: {"question": f"is day {i} {ADJ[i % 6]}" + ("?" if i % 2 else ""),
                        "answer": bool(i % 3), "passage": f"Day {i} was {ADJ[i % 6]}."},
    "wsc": lambda i: {"text": f"Mark told Pete about day {i}. He was {ADJ[i % 6]}.",
                      "span1_index": 0, "span2_index": 7, "span1_text": "Mark",
                      "span2_text": "He", "label": i % 2, "idx": i},
    "wic": lambda i: {"word": "bank", "sentence1": f"The bank {i} was closed.",
                      "sentence2": "He sat on the bank.", "start1": 4, "start2": 14,
                      "end1": 8, "end2": 18, "label": i % 2, "idx": i},
    "multirc": _multirc,
    "copa": lambda i: {"premise": f"The man {i} was {ADJ[i % 6]}" + ("." if i % 2 else ""),
                       "choice1": "I laughed." if i % 3 == 0 else "He smiled.",
                       "choice2": "The Day ended.", "question": ("cause", "effect")[i % 2],
                       "label": i % 2, "idx": i},
    "record": _record,
    "squad": lambda i: {"id": str(i), "title": f"Title_{i}", "context": f"The day {i} is good.",
                        "question": "Which day is good? ",
                        "answers": {"text": [f"day {i}", f"The day {i}", f"day {i}"][: 1 + i % 3],
                                    "answer_start": [4, 0, 4][: 1 + i % 3]}},
    "drop": lambda i: {"section_id": f"s{i}", "query_id": f"q{i}",
                       "passage": f"There were {i} goals.", "question": "How many goals? ",
                       "answers_spans": {"spans": [str(i)] + (["two"] if i % 2 else []),
                                         "types": ["number"] + (["span"] if i % 2 else [])}},
}


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_suite(folder, n_train: int = 36, n_valid: int = 24) -> dict:
    """One folder per task (train.jsonl, validation.jsonl) under ``folder``: {task: folder}."""
    out = {}
    for task in SUITE:
        d = os.path.join(folder, task)
        os.makedirs(d, exist_ok=True)
        write_jsonl(os.path.join(d, "train.jsonl"), _rows(task, n_train, 0))
        write_jsonl(os.path.join(d, "validation.jsonl"), _rows(task, n_valid, 1000))
        out[task] = d
    return out


@pytest.fixture(scope="module")
def suite_dirs(tmp_path_factory):
    return write_suite(str(tmp_path_factory.mktemp("suite")))


def _sample(task: str, row: dict):
    spec = get_task(task)
    return spec, spec.build(row)


# ---- the registry and the files -----------------------------------------------------------------

def test_all_eleven_tasks_are_registered_and_load_from_local_files(suite_dirs):
    assert set(SUITE) <= set(task_names())
    for task in SUITE:
        t = load_task(task, seed=0, data_dir=suite_dirs[task], split_sizes=[20, 6, 10])
        assert t.kind == "suite" and t.spec.name == task
        assert [len(t.splits[k]) for k in ("train", "dev", "test")] == [20, 6, 10], task
        path, line = t.splits["test"][0].source
        assert path.endswith("validation.jsonl") and line >= 1


# ---- formatting: MeZO's templates, character for character ---------------------------------------

CASES = [  # (task, row, candidate, prompt MeZO encodes, text MeZO verbalizes), written by hand
    ("sst2", {"sentence": " it 's a charming journey . ", "label": 1}, 1,
     "it 's a charming journey . It was", "it 's a charming journey . It was great"),
    ("rte", {"premise": "Dana Reeve died.", "hypothesis": "Dana is dead.", "label": 0}, 1,
     'Dana Reeve died.\nDoes this mean that "Dana is dead." is true? Yes or No?\n',
     'Dana Reeve died.\nDoes this mean that "Dana is dead." is true? Yes or No?\nNo'),
    ("cb", {"premise": "It rained.", "hypothesis": "it was wet", "label": 2}, 2,
     'Suppose It rained. Can we infer that "it was wet"? Yes, No, or Maybe?\n',
     'Suppose It rained. Can we infer that "it was wet"? Yes, No, or Maybe?\nMaybe'),
    ("boolq", {"question": "is the sky blue", "answer": True, "passage": "Sky: blue."}, "Yes",
     "Sky: blue. Is the sky blue?\n", "Sky: blue. Is the sky blue?\nYes"),
    ("wsc", {"text": "Mark told Pete. He lied.", "span1_text": "Mark", "span2_text": "He",
             "label": 1}, 1,
     'Mark told Pete. He lied.\nIn the previous sentence, does the pronoun "he" refer to Mark? '
     'Yes or No?\n',
     'Mark told Pete. He lied.\nIn the previous sentence, does the pronoun "he" refer to Mark? '
     'Yes or No?\nYes'),
    ("wic", {"word": "bank", "sentence1": "A bank.", "sentence2": "A river bank.", "label": 0},
     0, 'Does the word "bank" have the same meaning in these two sentences? Yes, No?\nA bank.\n'
        'A river bank.\n',
     'Does the word "bank" have the same meaning in these two sentences? Yes, No?\nA bank.\n'
     'A river bank.\nNo'),
    ("multirc", {"paragraph": "P.", "question": "Q?", "answer": "A", "label": 1}, 1,
     'P.\nQuestion: Q?\nI found this answer "A". Is that correct? Yes or No?\n',
     'P.\nQuestion: Q?\nI found this answer "A". Is that correct? Yes or No?\nYes'),
    ("copa", {"premise": "My body cast a shadow.", "choice1": "The sun was rising.",
              "choice2": "I ran.", "question": "cause", "label": 0}, "The sun was rising.",
     "My body cast a shadow because ", "My body cast a shadow because the sun was rising."),
    ("copa", {"premise": "It was late", "choice1": "I Slept.", "choice2": "We ate.",
              "question": "effect", "label": 0}, "I Slept.",
     "It was late so ", "It was late so I Slept."),
    ("record", {"passage": "Ann won.\n@highlight\nBig day", "query": "@placeholder smiled",
                "entities": ["Ann", "Bob"], "answers": ["Ann"]}, "Bob",
     "Ann won.\n- Big day\n-", "Ann won.\n- Big day\n- Bob smiled"),
    ("squad", {"title": "T", "context": "C.", "question": " Who? ",
               "answers": {"text": ["x y", "x"], "answer_start": [0, 0]}}, "x y",
     "Title: T\nContext: C.\nQuestion: Who?\nAnswer:", "Title: T\nContext: C.\nQuestion: Who?\n"
                                                       "Answer: x y\n"),
    ("drop", {"passage": "P.", "question": "How many? ",
              "answers_spans": {"spans": ["2", "two"], "types": ["number", "span"]}}, "2",
     "Passage: P.\nQuestion: How many?\nAnswer:", "Passage: P.\nQuestion: How many?\nAnswer: 2\n"),
]


@pytest.mark.parametrize("task, row, cand, prompt, text", CASES,
                         ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_formatting_equals_mezo_template(task, row, cand, prompt, text):
    spec, s = _sample(task, row)
    assert spec.encode(s) == prompt
    assert spec.verbalize(s, cand) == text
    assert full_text(spec, s, cand) == text.strip(" ").lstrip()
    assert prompt_text(spec, s) == prompt.strip(" ").lstrip()


def test_candidates_and_gold_follow_mezo_datasets():
    _, s = _sample("boolq", {"question": "q", "answer": False, "passage": "p"})
    assert s.candidates == ["Yes", "No"] and s.gold == [1]
    _, s = _sample("boolq", {"question": "q", "label": 1, "passage": "p", "idx": 0})
    assert s.gold == [0]  # super_glue/boolq: label 1 is True
    _, s = _sample("copa", ROWS["copa"](1))
    assert s.candidates == ["He smiled.", "The Day ended."] and s.gold == [1]
    _, s = _sample("record", ROWS["record"](4))  # two correct entities
    assert s.candidates == ["Paris", "London", "Anna Smith"] and s.gold == [1, 2]
    spec, s = _sample("squad", ROWS["squad"](2))
    assert s.gold == ["day 2", "The day 2", "day 2"] and spec.target(s) == "day 2"
    _, s = _sample("drop", ROWS["drop"](3))
    assert s.gold == ["3", "two"]
    _, s = _sample("cb", {"premise": "p", "hypothesis": "h", "label": 1})
    assert s.candidates == [0, 1, 2] and s.gold == [1]


# ---- metrics: hand computations -------------------------------------------------------------------

def test_squad_normalisation_f1_and_em_by_hand():
    assert normalize_answer("The  Cat's, hat!") == "cats hat"
    assert normalize_answer("An apple a day") == "apple day"
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P 1, R 2/3, F1 0.8
    assert f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8, abs=1e-15)
    assert f1("the cat sat", ["dog", "a cat sat down", "cat"]) == pytest.approx(0.8, abs=1e-15)
    # repeated tokens count as a multiset: [a, a, b] vs [a, b]: common 2, P 2/3, R 1 -> 0.8
    assert f1("x x y", ["x y"]) == pytest.approx(0.8, abs=1e-15)
    assert f1("nothing here", ["cat"]) == 0.0
    assert f1("no answer!", ["no answer"]) == 1.0 and f1("cat", ["CANNOTANSWER"]) == 0.0
    assert exact_match("The Cat.", ["a cat", "dog"]) == 1.0 and exact_match("cat s", ["cats"]) == 0
    assert accuracy([0, 2, 1], [[0], [1, 2], [0]]) == pytest.approx(2 / 3, abs=1e-15)


def test_measure_reports_mezo_metric_by_hand():
    spec = get_task("squad")
    rows = [ROWS["squad"](i) for i in (0, 1)]
    samples = [spec.build(r) for r in rows]  # golds: ["day 0"], ["day 1", "The day 1"]
    m = measure(spec, samples, ["day 0", "the day"])
    # row 1: "the day" -> [day] vs "day 1" -> [day, 1]: P 1, R 1/2, F1 2/3 (the best of both)
    assert m["metric"] == "f1" and m["n"] == 2
    assert m["f1"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-15)
    assert m["em"] == pytest.approx(0.5, abs=1e-15)
    rec = get_task("record")
    samples = [rec.build(ROWS["record"](i)) for i in (4, 1)]  # gold [1, 2] and [1]
    m = measure(rec, samples, [2, 0])
    assert m["accuracy"] == 0.5 and m["em"] == 0.5 and m["metric"] == "accuracy"


# ---- sampling: MeZO's, with a seed ----------------------------------------------------------------

def _mezo_subset(n: int, seed: int, num: int) -> list[int]:
    """MeZO's ``sample_subset``, written as it is: the global numpy seed, then a permutation."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return np.random.permutation(n).tolist()[:num]
    finally:
        np.random.set_state(state)


def test_sampling_is_mezos_and_reproducible():
    train, valid = list(range(40)), list(range(1000, 1030))
    a = sample_splits(train, valid, seed=3, n_train=20, n_dev=8, n_test=25)
    pool = [train[i] for i in _mezo_subset(40, 3, 28)]
    assert a["train"] == pool[:20] and a["dev"] == pool[20:]  # dev: the last n_dev of the pool
    assert a["test"] == [valid[i] for i in _mezo_subset(30, 3, 25)]
    assert a == sample_splits(train, valid, seed=3, n_train=20, n_dev=8, n_test=25)
    b = sample_splits(train, valid, seed=4, n_train=20, n_dev=8, n_test=25)
    assert b["train"] != a["train"] and b["test"] != a["test"]
    small = sample_splits(train, valid, seed=0, n_train=1000, n_dev=10, n_test=1000)
    assert len(small["train"]) == 30 and len(small["dev"]) == 10 and len(small["test"]) == 30
    assert set(small["train"]).isdisjoint(small["dev"])


def test_default_sizes_follow_mezo_sh(suite_dirs):
    assert {t: get_task(t).n_dev for t in SUITE} == {
        t: (100 if t in ("cb", "copa") else 500) for t in SUITE}
    with pytest.raises(SuiteDataError, match=r"36 rows.*no training rows") as e:
        load_suite_task("rte", suite_dirs["rte"])  # 1000/500/1000 of 36 rows: dev takes all
    assert e.value.flag == "--split-sizes"


def test_same_seed_same_rows_from_files(suite_dirs):
    a = load_suite_task("squad", suite_dirs["squad"], seed=1, sizes=(10, 5, 8))
    b = load_suite_task("squad", suite_dirs["squad"], seed=1, sizes=(10, 5, 8))
    c = load_suite_task("squad", suite_dirs["squad"], seed=2, sizes=(10, 5, 8))
    key = [s.source[1] for s in a.splits["train"]]
    assert key == [s.source[1] for s in b.splits["train"]]
    assert key != [s.source[1] for s in c.splits["train"]]


# ---- a user's task: one small registration --------------------------------------------------------

def test_a_user_task_is_one_registration(tmp_path):
    from zoengine.tasks.suite.registry import Sample, label, text

    def build(row):
        text(row, "review")
        return Sample(row, [0, 1], [label(row, "stars", {0: "bad", 1: "good"})])

    register_task("reviews_test", TaskSpec(
        name="reviews_test", kind="classification", fields=("review", "stars"), build=build,
        encode=lambda s: f"{s.data['review']} Verdict:",
        verbalize=lambda s, c: f"{s.data['review']} Verdict: {('bad', 'good')[c]}", n_dev=2),
        replace=True)
    write_jsonl(tmp_path / "train.jsonl", [{"review": f"r{i}", "stars": i % 2} for i in range(8)])
    write_jsonl(tmp_path / "validation.jsonl", [{"review": "v", "stars": 1}] * 3)
    t = load_task("reviews_test", seed=0, data_dir=str(tmp_path))
    assert len(t.splits["dev"]) == 2 and len(t.splits["train"]) == 6
    with pytest.raises(ValueError, match="already registered"):
        register_task("reviews_test", t.spec)
