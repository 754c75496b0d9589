"""``--batched-samples`` / ``zo_batched_samples`` and the low-rank flags ``--rank`` /
``--resample-every``: a run with batched samples applies the same steps as the run without (its
journal's losses agree to the rounding of another evaluation order), and bad combinations exit
2 naming the flag."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import tiny_args

from zoengine.cli import main
from zoengine.journal import read_records

torch.set_num_threads(1)
LOWRANK = ("--method", "mezo-lowrank", "--perturbation", "virtual", "--rank", "2",
           "--resample-every", "2", "--n-samples", "2", "--steps", "3", "--eval-every", "0",
           )


def _losses(out):
    _, records, _ = read_records(str(out / "journal.zoj"))
    return [v for r in records for v in r.values]


def _run(argv, out) -> dict:
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def _same_losses(a, b):
    # fp32 forwards of the same weights in another order: ≤ 64·u32 relative per loss (dot
    # products of length ≤ 64 in the tiny model, docs/lowrank.md)
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=64 * 2.0**-24)


@pytest.mark.parametrize("train", ["full", "lora"])
def test_classification_run_equals_the_one_group_run(tiny, tmp_path, train):
    one = tmp_path / "one"
    _run(tiny_args(tiny, one, "--train", train, *LOWRANK), one)
    many = tmp_path / "many"
    m = _run(tiny_args(tiny, many, "--train", train, *LOWRANK, "--batched-samples"), many)
    _same_losses(_losses(one), _losses(many))
    assert m["config"]["batched_samples"] is True and m["config"]["rank"] == 2
    # 3 steps x 4 groups, plus the first step's check of each group alone and the virtual
    # probe's one forward (which the one-group run makes too)
    assert m["stopped"]["forwards"] == 3 * 4 + 4 + 1


def test_lm_run_equals_the_one_group_run(tiny, tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(f"the movie is good {i}. i love this day." for i in range(60)))
    base = ["train", "--model", tiny["model"], "--task", str(txt), "--batch-size", "2",
            "--block-size", "8", "--no-progress", "--train", "full", *LOWRANK]
    _run([*base, "--output-dir", str(tmp_path / "one")], tmp_path / "one")
    _run([*base, "--output-dir", str(tmp_path / "many"), "--batched-samples"],
         tmp_path / "many")
    _same_losses(_losses(tmp_path / "one"), _losses(tmp_path / "many"))


@pytest.mark.parametrize("extra, flag, words", [
    (["--batched-samples"], "--batched-samples", "--perturbation virtual"),
    (["--batched-samples", "--perturbation", "virtual", "--train", "full", "--method",
      "dizo"], "--batched-samples", "DiZO has a step of its own"),
    (["--rank", "2"], "--rank", "mezo-lowrank"),
    (["--resample-every", "5", "--method", "mezo"], "--resample-every", "mezo-lowrank"),
    (["--method", "mezo-lowrank", "--rank", "0"], "--rank", "integer > 0"),
])
def test_bad_combinations_exit_2_naming_the_flag(tiny, tmp_path, capsys, extra, flag, words):
    assert main(tiny_args(tiny, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert flag in err and words in err and "Traceback" not in err
