"""--keep-best: the run folder's weights are those of the best dev evaluation, checked against the
run's own recorded dev curve and against a run stopped at that step; a keep-best run
interrupted mid-way and resumed ends with the same best step and the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import tiny_args

import zoengine.run.loop as loop
from zoengine.cli import main

torch.set_num_threads(1)

# a large lr makes the dev accuracy move; the best step is the 2nd of 5 dev evaluations
BEST = ["--keep-best", "--eval-every", "2", "--steps", "10", "--lr", "3", "--eps", "0.05"]


def _done(out) -> tuple[dict, dict]:
    return (json.loads((out / "metrics.json").read_text()),
            load_file(str(out / "head.safetensors")))


@pytest.fixture(scope="module")
def best_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("best") / "run"
    assert main(tiny_args(tiny, out, *BEST)) == 0
    return out, *_done(out)


def test_keep_best_keeps_the_weights_of_the_best_dev_step(tiny, tmp_path, best_run):
    _, m, weights = best_run
    dev = m["curve"]["dev"]
    trained = [p for p in dev if p["step"] >= 1]
    top = max(p["dev_accuracy"] for p in trained)
    first = next(p for p in trained if p["dev_accuracy"] == top)  # a tie keeps the earlier
    assert m["best"] == {"step": first["step"], "metric": "dev_accuracy", "value": top,
                         "last_step": 10}
    assert first["step"] != 10, "the fixture should make an earlier step the best"
    assert m["after"]["dev"]["accuracy"] == pytest.approx(top)  # `after` is the best's
    assert m["last"]["dev"]["accuracy"] == pytest.approx(dev[-1]["dev_accuracy"])
    # the same run stopped at the best step has these weights, bit for bit
    ref = tmp_path / "ref"
    assert main(tiny_args(tiny, ref, "--eval-every", "2", "--steps", str(first["step"]),
                          "--lr", "3", "--eps", "0.05")) == 0
    assert torch.equal(load_file(str(ref / "head.safetensors"))["head_rows"],
                       weights["head_rows"])


def test_a_keep_best_run_resumed_ends_as_the_uninterrupted_one(tiny, tmp_path, best_run,
                                                               monkeypatch):
    _, m, weights = best_run
    out, calls = tmp_path / "cut", {"n": 0}

    def cut(name):  # an interruption at the 8th step, after the best step's checkpoint
        calls["n"] += name == "loop-step"
        if calls["n"] == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "crashpoint", cut)
    assert main(tiny_args(tiny, out, *BEST)) == 130
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    m2, w2 = _done(out)
    assert m2["best"] == m["best"] and m2["curve"]["dev"] == m["curve"]["dev"]
    assert m2["stopped"]["forwards"] == m["stopped"]["forwards"] == 20
    assert torch.equal(w2["head_rows"], weights["head_rows"])
