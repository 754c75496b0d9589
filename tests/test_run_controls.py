"""The run controls of `zoengine train` do what docs/cli.md says: the lr schedule's lrs equal the
formula (and transformers' schedulers), --max-forwards stops at exactly the budget counting
n samples and DiZO's search, --max-minutes stops after the step that reaches it, the method
flags reach the optimizer, and each bad value exits 2 naming its flag."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_cli import tiny_args

from zoengine.cli import main
from zoengine.journal import read_records
from zoengine.run.controls import hf_scheduler, lr_factor

torch.set_num_threads(1)


def _run(tiny, out, *extra) -> dict:
    assert main(tiny_args(tiny, out, "--eval-every", "0", *extra)) == 0
    return json.loads((out / "metrics.json").read_text())


def _records(out):
    header, records, _ = read_records(str(out / "journal.zoj"))
    return header, records


# ---- the learning-rate schedule ------------------------------------------------------------------

def test_cosine_and_linear_lrs_equal_the_formulas():
    T, W = 10, 3
    for t in range(T):
        warm = t / W
        cos = 0.5 * (1 + math.cos(math.pi * (t - W) / (T - W)))
        assert lr_factor("cosine", t, T, W) == pytest.approx(warm if t < W else cos)
        assert lr_factor("linear", t, T, W) == pytest.approx(warm if t < W else (T - t) / (T - W))
        assert lr_factor("constant", t, T, W) == pytest.approx(warm if t < W else 1.0)
    assert lr_factor("cosine", 0, T) == 1.0 and lr_factor("cosine", 5, T) == pytest.approx(0.5)


def test_the_schedules_equal_transformers_under_the_mapped_name():
    from transformers import get_scheduler

    for kind in ("constant", "linear", "cosine"):
        for warmup in (0, 2):
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            sched = get_scheduler(hf_scheduler(kind, warmup), opt, num_warmup_steps=warmup,
                                  num_training_steps=8)
            for t in range(8):
                assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor(kind, t, 8, warmup))
                opt.step()
                sched.step()


def test_a_run_steps_with_the_scheduled_lrs(tiny, tmp_path):
    m = _run(tiny, tmp_path / "cos", "--steps", "6", "--lr", "0.01", "--lr-scheduler", "cosine",
             "--warmup-steps", "2")
    assert m["config"]["lr_scheduler"] == "cosine" and m["config"]["warmup_steps"] == 2
    _, records = _records(tmp_path / "cos")
    lrs = [r.hyper[0][0] for r in records]
    assert lrs == pytest.approx([0.01 * lr_factor("cosine", t, 6, 2) for t in range(6)])
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.01)


def test_defaults_are_meZOs_constant_lr_no_decay_one_sample(tiny, tmp_path):
    m = _run(tiny, tmp_path / "d", "--steps", "3")
    c = m["config"]
    assert (c["lr_scheduler"], c["warmup_steps"], c["weight_decay"], c["n_samples"]) == (
        "constant", 0, 0.0, 1)
    header, records = _records(tmp_path / "d")
    assert [r.hyper[0] for r in records] == [(1e-4, 1e-3, 0.0)] * 3
    assert m["stopped"] == {**m["stopped"], "reason": "steps", "step": 3, "forwards": 6}


def test_n_samples_weight_decay_and_method_flags_reach_the_optimizer(tiny, tmp_path):
    _run(tiny, tmp_path / "k", "--steps", "2", "--method", "kerzoo", "--kernel-order", "5",
         "--r-range", "0.5", "--n-samples", "3", "--weight-decay", "0.01")
    header, records = _records(tmp_path / "k")
    hyper = header["method"]["hyperparameters"]
    assert (hyper["kernel_order"], hyper["r_range"], header["n_samples"]) == (5, 0.5, 3)
    assert records[0].hyper[0][2] == 0.01 and len(records[0].values) == 6
    _run(tiny, tmp_path / "p", "--steps", "1", "--method", "pezo", "--pool-size", "4099")
    assert _records(tmp_path / "p")[0]["method"]["hyperparameters"]["pool_size"] == 4099
    _run(tiny, tmp_path / "z", "--steps", "1", "--method", "dizo", "--proj-eps", "0.05",
         "--proj-lr", "1.5", "--tau", "0.1")
    hyper = _records(tmp_path / "z")[0]["method"]["hyperparameters"]
    assert (hyper["proj_eps"], hyper["proj_lr"], hyper["tau"]) == (0.05, 1.5, 0.1)


# ---- budgets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, budget, steps, forwards", [
    (["--n-samples", "2"], 20, 5, 20),  # 4 forwards a step
    (["--n-samples", "2"], 19, 4, 16),  # a step that would pass the budget is not taken
    # DiZO, interval 2: 2 forwards a step, + 2 x 10 search iterations after every 2nd step
    (["--method", "dizo", "--dizo-interval", "2"], 48, 4, 48),
    (["--method", "dizo", "--dizo-interval", "2"], 47, 3, 26),
])
def test_max_forwards_stops_at_exactly_the_budget(tiny, tmp_path, extra, budget, steps,
                                                  forwards):
    m = _run(tiny, tmp_path / "b", "--steps", "50", "--max-forwards", str(budget), *extra)
    assert m["stopped"]["reason"] == "max_forwards"
    assert (m["stopped"]["step"], m["stopped"]["forwards"]) == (steps, forwards)
    assert len(m["curve"]["loss"]) == steps and m["curve"]["dev"][-1]["step"] == steps
    _, records = _records(tmp_path / "b")  # the journal holds every evaluation counted
    assert len(records) == steps and sum(len(r.values) for r in records) == forwards


def test_max_minutes_stops_after_the_step_that_reaches_it(tiny, tmp_path):
    m = _run(tiny, tmp_path / "t", "--steps", "50", "--max-minutes", "1e-9")
    assert m["stopped"]["reason"] == "max_minutes" and m["stopped"]["step"] == 1
    assert (tmp_path / "t" / "head.safetensors").exists()


# ---- bad values: exit 2, the flag named ------------------------------------------------------------

@pytest.mark.parametrize("extra, flag", [
    (["--n-samples", "0"], "--n-samples"),
    (["--lr-scheduler", "step"], "--lr-scheduler"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--max-forwards", "0"], "--max-forwards"),
    (["--max-minutes", "0"], "--max-minutes"),
    (["--method", "kerzoo", "--kernel-order", "2"], "--kernel-order"),
    (["--kernel-order", "3"], "--kernel-order"),  # mezo takes no kernel
    (["--method", "pezo-rotate", "--pool-size", "64"], "--pool-size"),
    (["--method", "kerzoo", "--pool-size", "64"], "--pool-size"),
    (["--r-range", "0.5"], "--r-range"),
    (["--proj-eps", "0.1"], "--proj-eps"),
    (["--method", "dizo", "--tau", "1"], "--tau"),
    (["--method", "dizo", "--proj-lr", "-1"], "--proj-lr"),
    (["--train", "full", "--keep-best"], "--keep-best"),  # no dev evaluation to pick from
])
def test_bad_values_exit_2_naming_the_flag(tiny, tmp_path, capsys, extra, flag):
    assert main(tiny_args(tiny, tmp_path / "x", "--steps", "2", *extra)) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    if flag in ("--kernel-order", "--pool-size", "--r-range", "--proj-eps") and "3" in extra:
        assert "applies to --method" in err
