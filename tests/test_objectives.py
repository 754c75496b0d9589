"""--objective accuracy | f1 (MeZO's non-differentiable objectives): the closure returns minus the
batch's metric, computed as evaluation computes it; combinations without such a metric are
refused with exit 2 naming --objective, the value and what the task allows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cli import tiny_args
from test_task_suite import write_suite

from zoengine.cli import main
from zoengine.run.objectives import minus_accuracy

torch.set_num_threads(1)


def test_minus_accuracy_is_minus_the_share_of_argmax_hits():
    scores = torch.tensor([[0.1, 0.9], [2.0, 1.0], [0.5, 0.5], [0.0, 1.0]])
    v = minus_accuracy(scores, torch.tensor([1, 1, 0, 0]))
    assert v.dtype == torch.float32 and v.item() == pytest.approx(-0.5)  # rows 0 and 2 (tie: 0)


def test_accuracy_objective_on_a_classification_task(tiny, tmp_path):
    out = tmp_path / "acc"
    assert main(tiny_args(tiny, out, "--objective", "accuracy", "--steps", "12",
                          "--batch-size", "8", "--eps", "0.1", "--eval-every", "4")) == 0
    m = json.loads((out / "metrics.json").read_text())
    loss = np.array(m["curve"]["loss"])
    # the mean of two values -k/8 each: a multiple of 1/16 in [-1, 0]
    assert np.all(loss <= 0) and np.all(loss >= -1)
    assert np.allclose(loss * 16, np.round(loss * 16), atol=1e-5)
    assert [p["step"] for p in m["curve"]["dev"]] == [0, 4, 8, 12]
    assert m["config"]["objective"] == "accuracy"


@pytest.mark.parametrize("task, objective", [("sst2", "accuracy"), ("squad", "f1")])
def test_nondiff_objectives_on_suite_tasks(tiny, tmp_path, task, objective):
    d = write_suite(str(tmp_path / "data"), n_train=24, n_valid=12)[task]
    out = tmp_path / "out"
    assert main(["train", "--model", tiny["model"], "--task", task, "--data-dir", d,
                 "--split-sizes", "16,6,8", "--steps", "2", "--batch-size", "4",
                 "--train", "full", "--max-length", "64", "--eps", "0.1", "--objective",
                 objective, "--output-dir", str(out), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert all(-1 <= v <= 0 for v in m["curve"]["loss"])
    if objective == "accuracy":  # minus k/4 of a 4-row batch, averaged over the two sides
        assert all(abs(v * 8 - round(v * 8)) < 1e-5 for v in m["curve"]["loss"])


@pytest.mark.parametrize("extra, allowed", [
    (["--objective", "f1"], "allowed for it: lm, accuracy"),
    (["--objective", "kd"], "needs an LM task"),
])
def test_objectives_a_classification_task_refuses(tiny, tmp_path, capsys, extra, allowed):
    assert main(tiny_args(tiny, tmp_path / "x", "--steps", "1", *extra)) == 2
    err = capsys.readouterr().err
    assert "--objective" in err and allowed in err


@pytest.mark.parametrize("task, objective, allowed", [
    ("lm", "accuracy", "allowed for it: lm, kd, kd+lm"),
    ("squad", "accuracy", "allowed for it: lm, f1"),
    ("sst2", "f1", "allowed for it: lm, accuracy"),
])
def test_objectives_without_a_metric_per_batch_are_refused(tiny, tmp_path, capsys, task,
                                                           objective, allowed):
    if task == "lm":
        text = tmp_path / "t.txt"
        text.write_text("\n\n".join(f"line {i} of a text." for i in range(60)))
        where = ["--task", str(text)]
    else:
        d = write_suite(str(tmp_path / "data"), n_train=24, n_valid=12)[task]
        where = ["--task", task, "--data-dir", d, "--split-sizes", "16,6,8", "--train", "full"]
    rc = main(["train", "--model", tiny["model"], *where, "--objective", objective,
               "--output-dir", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--objective" in err and repr(objective) in err and allowed in err
    assert not (tmp_path / "o").exists()  # refused before anything was written
