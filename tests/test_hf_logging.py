"""What ZOTrainer logs: the projected gradient (what ZO measures), never the Trainer's
``grad_norm`` of gradients it does not form (0 at every step before). Tiny model from a config."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from zoengine.hf import ProjectedGradLog, ZOTrainer, ZOTrainingArguments


def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def dataset(n: int = 24, same: bool = False):
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (1 if same else n, 12), generator=g).repeat(n if same else 1, 1)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def common(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-3,
                max_steps=6, use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=1,
                save_strategy="no", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return base


class RecordG(TrainerCallback):
    """Each step's g_k as the optimizer holds them (independent of the trainer's log)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        zo = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        self.steps.append(list(zo.state["zo"]["projected_grads"]))


def train_logs(args, **kw):
    rec = RecordG()
    tr = ZOTrainer(model=tiny_model(), args=args, train_dataset=dataset(**kw), callbacks=[rec])
    tr.train()
    return [h for h in tr.state.log_history if "loss" in h], rec.steps


@pytest.mark.parametrize("arguments", [ZOTrainingArguments, TrainingArguments])
def test_logs_projected_gradient_not_grad_norm(tmp_path, arguments):
    """Every training log has the step's g (and |g| as its RMS with n = 1, one step a log),
    and no grad_norm; with plain TrainingArguments (max_grad_norm=1, which the Trainer clips
    with) as well."""
    logs, steps = train_logs(arguments(**common(tmp_path)))
    assert len(logs) == 6 and len(steps) == 6
    for log, g in zip(logs, steps):
        assert "grad_norm" not in log
        assert list(log)[:3] == ["loss", "projected_grad", "projected_grad_rms"]
        assert log["projected_grad"] == pytest.approx(g[0], rel=1e-12)
        assert log["projected_grad_rms"] == pytest.approx(abs(g[0]), rel=1e-12)
    assert len({round(log["projected_grad"], 9) for log in logs}) == 6  # a new value each step


def test_window_of_several_steps_and_samples(tmp_path):
    """logging_steps=3, n_samples=2: projected_grad is the last step's mean g, the RMS runs over
    all six g_k of the window."""
    args = ZOTrainingArguments(**common(tmp_path, logging_steps=3,
                                        zo_kwargs={"n_samples": 2}))
    logs, steps = train_logs(args)
    assert len(logs) == 2
    for i, log in enumerate(logs):
        window = steps[3 * i:3 * i + 3]
        assert all(len(g) == 2 for g in window)
        assert log["projected_grad"] == pytest.approx(sum(window[-1]) / 2, rel=1e-12)
        rms = math.sqrt(sum(v * v for g in window for v in g) / 6)
        assert log["projected_grad_rms"] == pytest.approx(rms, rel=1e-12)


def test_rms_estimates_the_gradient_norm(tmp_path):
    """With θ (all but) fixed and one batch, g = zᵀ∇ℓ for fresh z each step: the RMS of 150
    steps is ‖∇ℓ‖ (backprop) within sampling error (relative sd ~ 1/√(2·150) = 6 %)."""
    args = ZOTrainingArguments(**common(tmp_path, learning_rate=1e-12, max_steps=150,
                                        logging_steps=150, zo_eps=1e-4))
    logs, _ = train_logs(args, n=4, same=True)
    model = tiny_model()
    batch = torch.tensor(dataset(4, same=True)["input_ids"])
    model(input_ids=batch, labels=batch).loss.backward()
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    assert logs[0]["projected_grad_rms"] == pytest.approx(float(norm), rel=0.2)


def test_skipped_and_foreign_steps_add_nothing():
    """A skipped step (nonfinite="skip"), no step, or an optimizer without zoengine's run
    state leaves the window as it was; pop() resets it."""

    class Opt:
        state = {"zo": {"step": 0, "skipped_steps": 0, "projected_grads": []}}

    log, opt = ProjectedGradLog(), Opt()
    zo = opt.state["zo"]
    mark = log.mark(opt)
    zo.update(step=1, projected_grads=[3.0, -1.0])
    log.note(opt, mark)
    mark = log.mark(opt)
    log.note(opt, mark)  # no step since the mark
    zo.update(step=2, skipped_steps=1)  # skipped: projected_grads still the previous step's
    log.note(opt, mark)
    log.note(object(), log.mark(object()))
    assert log.pop() == {"projected_grad": 1.0, "projected_grad_rms": math.sqrt(5.0)}
    assert log.pop() == {}
