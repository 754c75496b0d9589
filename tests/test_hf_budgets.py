"""ZOTrainer's budgets, ZOTrainingArguments(zo_max_forwards=N, zo_max_minutes=M): the CLI's
--max-forwards / --max-minutes through a TrainerCallback. Every loss-closure call counts (n
samples, the conservative rule's extra evaluations, DiZO's search), a step that could pass the
budget is not taken, the stop is recorded, the final save runs, and a resumed run keeps
counting from the checkpoint's optimizer.pt."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
torch.set_num_threads(1)

from test_hf import lm_dataset, tiny_model, zo_args  # noqa: E402

from zoengine.hf import ZOTrainer  # noqa: E402


def _train(out, model=None, resume=None, **kw):
    model = model or tiny_model()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))  # every model forward
    tr = ZOTrainer(model=model, args=zo_args(out, **kw), train_dataset=lm_dataset(16))
    tr.train(resume_from_checkpoint=resume)
    return tr, len(calls)


def _zo(tr):
    return tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer


@pytest.mark.parametrize("kw, budget, steps, used", [
    (dict(), 6, 3, 6),                                     # MeZO: 2 a step, exactly N
    (dict(), 7, 3, 6),                                     # at or below N
    (dict(zo_n_samples=3), 18, 3, 18),                     # 6 a step
    (dict(zo_update="conservative"), 10, 2, 10),           # 2 + 3 extra a step
    (dict(zo_method="dizo", zo_dizo_interval=2,            # 2; 2 + 2·2 search every 2nd
          zo_kwargs={"search_iters": 2}), 16, 4, 16),      # 2, 8, 10, 16 | next: 18
])
def test_max_forwards_stops_at_the_budget(tmp_path, kw, budget, steps, used):
    tr, model_forwards = _train(tmp_path, zo_max_forwards=budget, max_steps=8, **kw)
    assert tr.state.global_step == steps == _zo(tr).step_count
    assert _zo(tr).state["zo"]["forwards"] == used == model_forwards  # each call counted
    stop = tr.zo_stopped
    assert (stop["reason"], stop["step"], stop["steps"], stop["forwards"]) == \
        ("max_forwards", steps, 8, used)
    logged = [e for e in tr.state.log_history if "zo_stopped_reason" in e]
    assert [(e["zo_stopped_reason"], e["zo_stopped_forwards"]) for e in logged] == \
        [("max_forwards", used)]


def test_stop_saves_and_evaluates_as_at_max_steps(tmp_path):
    model = tiny_model()
    tr = ZOTrainer(model=model, args=zo_args(tmp_path, zo_max_forwards=6, save_strategy="steps",
                                             save_steps=100, eval_strategy="steps",
                                             eval_steps=100),
                   train_dataset=lm_dataset(16), eval_dataset=lm_dataset(4))
    tr.train()
    assert tr.state.global_step == 3 and (tmp_path / "checkpoint-3" / "optimizer.pt").exists()
    assert any("eval_loss" in e and e["step"] == 3 for e in tr.state.log_history)


def test_budget_not_reached_records_steps(tmp_path):
    tr, n = _train(tmp_path, zo_max_forwards=100, max_steps=2)
    assert tr.zo_stopped["reason"] == "steps" and tr.zo_stopped["forwards"] == 4 == n


def test_max_minutes_stops_after_the_first_step(tmp_path):
    tr, _ = _train(tmp_path, zo_max_minutes=1e-9, max_steps=6)
    assert tr.state.global_step == 1 == _zo(tr).step_count
    assert tr.zo_stopped["reason"] == "max_minutes" and tr.zo_stopped["step"] == 1


def test_budget_below_one_step_takes_no_forward(tmp_path):
    tr, n = _train(tmp_path, zo_max_forwards=1, max_steps=6)
    assert n == 0 and _zo(tr).step_count == 0
    assert tr.zo_stopped["reason"] == "max_forwards" and tr.zo_stopped["step"] == 0


def test_resume_keeps_counting_from_the_checkpoint(tmp_path):
    kw = dict(zo_max_forwards=8, max_steps=6, save_strategy="steps", save_steps=2)
    full, _ = _train(tmp_path / "a", **kw)
    assert full.state.global_step == 4 and full.zo_stopped["forwards"] == 8
    ckpt = tmp_path / "a" / "checkpoint-2"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert state["state"]["zo"]["forwards"] == 4  # the count is in the checkpoint
    resumed, n = _train(tmp_path / "a", model=tiny_model(seed=5), resume=str(ckpt), **kw)
    assert n == 4 and resumed.state.global_step == 4
    assert resumed.zo_stopped == {**resumed.zo_stopped, "reason": "max_forwards", "step": 4,
                                  "forwards": 8}


def test_journal_replay_counts_the_recorded_forwards(tmp_path):
    """zo_journal: the steps replayed after the checkpoint count their recorded values, so the
    resumed run stops where the uninterrupted one did, without a forward pass."""
    kw = dict(zo_max_forwards=8, save_strategy="steps", save_steps=2, zo_journal=True)
    _train(tmp_path, **kw)
    resumed, n = _train(tmp_path, model=tiny_model(seed=5),
                        resume=str(tmp_path / "checkpoint-2"), **kw)
    assert n == 0 and resumed.state.global_step == 4  # steps 2, 3 came from the journal
    assert resumed.zo_stopped["forwards"] == 8


@pytest.mark.parametrize("name, bad", [
    ("zo_max_forwards", 0), ("zo_max_forwards", -3), ("zo_max_forwards", 2.5),
    ("zo_max_forwards", True), ("zo_max_minutes", 0), ("zo_max_minutes", -1.0),
    ("zo_max_minutes", float("nan")), ("zo_max_minutes", "5"),
])
def test_bad_budgets_are_refused_with_the_cli_words(tmp_path, name, bad):
    from dataclasses import fields

    from zoengine.checks import ConfigError
    from zoengine.run.config import RunConfig

    check = {f.name: f for f in fields(RunConfig)}[name.removeprefix("zo_")].metadata["check"]
    with pytest.raises(ConfigError, match=name) as err:
        zo_args(tmp_path, **{name: bad})
    assert err.value.field == name and err.value.allowed == check.describe()
    assert str(err.value).startswith(f"{name}: {bad!r}: must be")
