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


# ---- ZOTrainer: zo_batched_samples, zo_rank, zo_resample_every -----------------------------------

@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_batched_steps_equal_the_one_group_steps(tmp_path, accumulate):
    pytest.importorskip("accelerate")
    from test_hf import StepGrads, lm_dataset, tiny_model, zo_args

    from zoengine.hf import ZOTrainer

    grads, losses = {}, {}
    for batched in (False, True):
        steps = StepGrads()
        args = zo_args(tmp_path / str(batched), zo_method="mezo-lowrank", zo_rank=2,
                       zo_resample_every=2, zo_n_samples=2, zo_perturbation="virtual",
                       zo_eps=1e-2, max_steps=3, per_device_train_batch_size=4 // accumulate,
                       gradient_accumulation_steps=accumulate, zo_batched_samples=batched)
        tr = ZOTrainer(model=tiny_model(), args=args, train_dataset=lm_dataset(),
                       callbacks=[steps])
        losses[batched] = tr.train().training_loss
        grads[batched] = steps.grads
        zo = tr.optimizer.optimizer
        assert zo.hyperparameters()["rank"] == 2
        assert getattr(zo._virtual, "batched_checked", False) is batched  # step_batched ran
    # the same weights evaluated in another order: ≤ 4·64·u·|L| per loss (test_batched.py's
    # bound), so g within that over ε
    tol = 4 * 64 * 2.0**-24 * max(abs(v) for v in losses.values()) / 1e-2
    assert len(grads[True]) == 3
    for ga, gb in zip(grads[True], grads[False]):
        assert ga == pytest.approx(gb, rel=0, abs=tol)
    assert max(abs(v) for g in grads[False] for v in g) >= 50 * tol


def test_trainer_refuses_batched_samples_it_cannot_split(tmp_path):
    from zoengine.hf import ZOTrainingArguments

    for bad, words in ((dict(), "zo_perturbation='virtual'"),
                       (dict(zo_perturbation="virtual", zo_method="fzoo"),
                        "FZOO has a step of its own"),
                       (dict(zo_perturbation="virtual", zo_batched_samples=1), "zo_batched")):
        with pytest.raises(ValueError, match=words):
            ZOTrainingArguments(str(tmp_path / "o"), use_cpu=True,
                                **{"zo_batched_samples": True, **bad})
    with pytest.raises(ValueError, match="zo_rank"):
        ZOTrainingArguments(str(tmp_path / "o"), use_cpu=True, zo_rank=2)  # mezo: no rank


def test_strategies_without_per_group_losses_refuse_naming_the_flag():
    from zoengine.run.strategies import LMStrategy, Strategy
    from zoengine.tasks import TaskError

    lm = LMStrategy.__new__(LMStrategy)
    lm.teacher = object()  # --objective kd: the distillation loss is one number per batch
    for strategy, words in ((lm, "--objective kd"), (Strategy(), "task suite")):
        with pytest.raises(TaskError, match=words) as info:
            strategy.batched_closure(None)
        assert "--batched-samples" in str(info.value)
