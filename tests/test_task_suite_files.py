"""Suite task files that cannot be used are refused before any model loads, naming the file, the
line (a save_to_disk folder: the row) and the field; save_to_disk folders read like JSON lines."""

from __future__ import annotations

import json
import os

import pytest
from test_task_suite import ROWS, write_jsonl

from zoengine.cli import main
from zoengine.tasks import TaskError
from zoengine.tasks.suite import SuiteDataError, load_suite_task, read_split
from zoengine.tasks.suite.registry import get_task


def _task_dir(tmp_path, task, train, valid=None):
    d = tmp_path / task
    d.mkdir()
    write_jsonl(d / "train.jsonl", train)
    if valid is not None:
        write_jsonl(d / "validation.jsonl", valid)
    return str(d)


def _error(task, d, split="train") -> SuiteDataError:
    with pytest.raises(SuiteDataError) as e:
        read_split(get_task(task), d, split)
    assert isinstance(e.value, TaskError)
    return e.value


@pytest.mark.parametrize("task, i, field, change, words", [
    ("rte", 2, "hypothesis", lambda r: r.pop("hypothesis"), "missing"),
    ("cb", 1, "label", lambda r: r.update(label=3), "outside the verbalizer"),
    ("sst2", 0, "label", lambda r: r.update(label=-1), "outside the verbalizer"),
    ("boolq", 1, "answer", lambda r: r.update(answer="yes"), "outside the verbalizer"),
    ("wsc", 1, "span2_text", lambda r: r.update(span2_text=3), "not a string"),
    ("copa", 2, "question", lambda r: r.update(question="why"), "'cause' or 'effect'"),
    ("record", 1, "answers", lambda r: r.update(answers=["Rome"]), "not among the entities"),
    ("record", 0, "entities", lambda r: r.update(entities=[]), "empty"),
    ("squad", 2, "answers.text", lambda r: r["answers"].update(text=[]), "empty"),
    ("drop", 1, "answers_spans.spans", lambda r: r.pop("answers_spans"), "missing"),
    ("multirc", 4, "answer", lambda r: r.update(answer=None), "missing"),
])
def test_a_bad_row_names_file_line_and_field(tmp_path, task, i, field, change, words):
    rows = [ROWS[task](k) for k in range(6)]
    change(rows[i])
    d = _task_dir(tmp_path, task, rows)
    e = _error(task, d)
    path = os.path.join(d, "train.jsonl")
    assert (e.path, e.line, e.field) == (path, i + 1, field if field != "answers_spans.spans"
                                         else "answers_spans")
    assert f"{path}, line {i + 1}, field '{e.field}'" in str(e) and words in str(e)
    assert e.flag == "--data-dir"


def test_line_numbers_count_blank_lines_and_bad_json(tmp_path):
    d = tmp_path / "rte"
    d.mkdir()
    good = json.dumps(ROWS["rte"](0))
    (d / "train.jsonl").write_text(f"{good}\n\n{good}\n{{not json\n")
    e = _error("rte", str(d))
    assert e.line == 4 and e.field is None and "not valid JSON" in str(e)


def test_empty_and_missing_splits(tmp_path):
    d = _task_dir(tmp_path, "cb", [ROWS["cb"](0)] * 3)
    (tmp_path / "cb" / "validation.jsonl").write_text("\n\n")
    e = _error("cb", d, "validation")
    assert "empty split" in str(e) and e.path.endswith("validation.jsonl")
    os.remove(tmp_path / "cb" / "validation.jsonl")
    with pytest.raises(SuiteDataError, match=r"validation\.jsonl.*missing.*premise"):
        load_suite_task("cb", d, sizes=(1, 1, 1))


def test_the_hub_test_split_unlabelled_is_refused(tmp_path):
    rows = [ROWS["rte"](k) for k in range(4)]
    d = _task_dir(tmp_path, "rte", rows, rows)
    write_jsonl(tmp_path / "rte" / "test.jsonl", [{**r, "label": -1} for r in rows])
    with pytest.raises(SuiteDataError, match=r"test\.jsonl, line 1, field 'label'"):
        load_suite_task("rte", d, sizes=(2, 1, 2), test_split="test")
    assert len(load_suite_task("rte", d, sizes=(2, 1, 2)).splits["test"]) == 2  # MeZO's


def test_save_to_disk_folders_read_like_jsonl(tmp_path):
    from datasets import Dataset, DatasetDict

    train, valid = [ROWS["squad"](k) for k in range(12)], [ROWS["squad"](k) for k in range(8)]
    jl = _task_dir(tmp_path, "squad", train, valid)
    DatasetDict({"train": Dataset.from_list(train), "validation": Dataset.from_list(valid)}
                ).save_to_disk(str(tmp_path / "arrow"))
    a = load_suite_task("squad", jl, seed=5, sizes=(6, 3, 5))
    b = load_suite_task("squad", str(tmp_path / "arrow"), seed=5, sizes=(6, 3, 5))
    for k in ("train", "dev", "test"):
        assert [s.gold for s in a.splits[k]] == [s.gold for s in b.splits[k]]
        assert [s.data["context"] for s in a.splits[k]] == [s.data["context"] for s in b.splits[k]]
        assert [s.source[1] for s in a.splits[k]] == [s.source[1] for s in b.splits[k]]
    bad = [dict(r) for r in train]
    bad[3]["question"] = None
    Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad" / "train"))
    e = _error("squad", str(tmp_path / "bad"))
    assert (e.line, e.field) == (4, "question") and "row 4" in str(e)


def test_cli_refuses_bad_suite_input_naming_the_flag(tmp_path, capsys):
    d = _task_dir(tmp_path, "rte", [ROWS["rte"](k) for k in range(5)],
                  [ROWS["rte"](k) for k in range(3)] + [{"premise": "p", "label": 0}])
    for args, words in [
        (["--task", "rte"], "--data-dir"),
        (["--data-dir", d], "--data-dir"),
        (["--task", "rte", "--data-dir", d, "--split-sizes", "3,1"], "--split-sizes"),
        (["--task", "rte", "--data-dir", str(tmp_path / "nope")], "--data-dir"),
        (["--task", "rte", "--data-dir", d, "--options", "a,b"], "--options"),
        (["--task", "rte", "--data-dir", d, "--split-sizes", "2,1,2"],
         "validation.jsonl, line 4, field 'hypothesis'"),
    ]:
        assert main(["train", *args, "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (args, err)
    assert not os.path.exists(tmp_path / "o" / "metrics.json")
