"""ZOTrainer: a transformers.Trainer with training_step overridden, on a tiny model from a config,
with LR schedulers, PEFT (only adapter weights change), checkpoints and resume (ZO state
included), and a few steps on the real SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import ulp
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback

from zoengine.hf import ZOTrainer, ZOTrainingArguments

U32 = 2.0 ** -24  # fp32 unit roundoff u (docs/testing.md, "Tolerances")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def lm_dataset(n: int = 32, length: int = 12):
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def zo_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-3,
                zo_eps=1e-3, max_steps=6, use_cpu=True, report_to=[], disable_tqdm=True,
                logging_steps=2, save_strategy="no", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return ZOTrainingArguments(**base)


class StepGrads(TrainerCallback):
    """Each optimizer step's projected gradients and the noise bound max|z| (for tolerances)."""

    def __init__(self):
        self.grads, self.z_bound = [], None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        zo = getattr(optimizer, "optimizer", optimizer)
        self.grads.append(list(zo.state["zo"]["projected_grads"]))
        self.z_bound = zo._z_bound()


def drift_tolerance(p, q, grads_a, grads_b, *, lr, eps, z_bound, r=1.0) -> float:
    """Bound on max|θ_a − θ_b| of one tensor after two runs of the same steps whose projected
    gradients differ by rounding only (docs/testing.md, "Tolerances"). Step t moves the two
    runs apart by lr·Δg_t·z with |z| ≤ z_bound; and each run rounds an element at most 8 times
    per sample and step (the +εz and −2εz perturbations and the restore + update, a product
    and a sum each), by ≤ ½ ulp(R) each, R the largest magnitude the element passes through:
    the final |θ| plus what the steps moved (≤ lr·|g|·z_bound each) plus ε·r·z_bound."""
    dg = sum(max(abs(a - b) for a, b in zip(ga, gb)) for ga, gb in zip(grads_a, grads_b))
    moved = lr * z_bound * sum(max(abs(v) for v in ga + gb) for ga, gb in zip(grads_a, grads_b))
    R = max(float(p.detach().abs().max()), float(q.detach().abs().max())) + moved \
        + eps * r * z_bound
    roundings = 2 * 8 * len(grads_a[0]) * len(grads_a)  # both runs, every sample and step
    return roundings * 0.5 * float(ulp(torch.tensor(R, dtype=torch.float32))) + lr * z_bound * dg


def test_overrides_training_step_only():
    own = {k for k, v in vars(ZOTrainer).items() if callable(v) and not k.startswith("__")}
    assert own == {"training_step", "log"}  # log: projected gradient, no grad_norm of 0
    assert issubclass(ZOTrainer, Trainer)


def test_trains_tiny_model_with_scheduler(tmp_path):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = ZOTrainer(model=model, args=zo_args(tmp_path, lr_scheduler_type="linear",
                                             warmup_steps=2), train_dataset=lm_dataset(),
                   eval_dataset=lm_dataset(8))
    out = tr.train()
    assert tr.state.global_step == 6 and out.training_loss > 0
    zo = tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer
    assert zo.state_dict()["state"]["zo"]["step"] == 6
    assert tr.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)  # linear decay reached 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())  # forward passes only
    assert "eval_loss" in tr.evaluate()


def test_bad_arguments():
    with pytest.raises(ValueError, match="zo_method"):
        zo_args("x", zo_method="sgd")
    with pytest.raises(ValueError, match="zo_perturbation"):
        zo_args("x", zo_perturbation="sideways")


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """gradient_accumulation_steps=2 of batch 2 takes one ZO step per 4 rows whose loss is the
    4 rows' (token-weighted) mean: the run matches batch 4 without accumulation (fp32 sums in
    another order) and keeps the step count; nothing but the inputs is held between calls."""
    runs = {}
    for name, kw in {"accum": dict(per_device_train_batch_size=2,
                                   gradient_accumulation_steps=2),
                     "big": dict(per_device_train_batch_size=4)}.items():
        model, steps = tiny_model(), StepGrads()
        tr = ZOTrainer(model=model, args=zo_args(tmp_path / name, **kw),
                       train_dataset=lm_dataset(), callbacks=[steps])
        out = tr.train()
        zo = tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer
        assert zo.state_dict()["state"]["zo"]["step"] == 6 and tr.state.global_step == 6
        runs[name] = (model, out.training_loss, steps)
    (a, la, sa), (b, lb, sb) = runs["accum"], runs["big"]
    # Tolerances from a bound (docs/testing.md, "Tolerances"). Each evaluation's loss is a sum
    # of n = 4 rows × 11 = 44 token terms ≥ 0 (Σ|terms| = L), added in another order: each
    # order is within (n − 1)·u·L of the exact sum (u = 2^-24), so the two differ by ≤ 2n·u·|L|
    # (a BLAS blocking by batch size adds a few u·|L| more). Hence the losses within 2n·u = 5.2e-6
    # relative (rel=1e-5 also leaves room for the first-order effect on L of the weights' drift
    # below, lr·Σ_t|Δg_t|·|g| ≈ 1e-6·|L|), and g = (ℓ₊ − ℓ₋)/(2ε) within 2·2n·u·|L|/(2ε) =
    # 2n·u·|L|/ε ≈ 2.2e-2 at |L| ≈ 4.2, ε = 1e-3 (observed: 0 or one ulp of L over 2ε, 2.4e-4).
    # A wrong sign moves g by 2|g| (|g| is 0.45 to 2.1 here); a dropped micro-batch moves L by
    # ~4e-3 relative (the halves' losses differ) and g by ~|g|; a sum left undivided doubles
    # both: orders of magnitude above both tolerances.
    n = 4 * 11
    assert la == pytest.approx(lb, rel=1e-5)
    tol_g = 2 * n * U32 * max(abs(la), abs(lb)) / 1e-3
    assert len(sa.grads) == len(sb.grads) == 6
    for ga, gb in zip(sa.grads, sb.grads):
        assert ga == pytest.approx(gb, rel=0, abs=tol_g)
    # The weights then differ by Σ_t lr·Δg_t·z plus each run's rounding (drift_tolerance, from
    # the observed Δg_t): ≤ 1e-5 here, observed ≤ 1.3e-6, while the six steps move them by
    # ~8e-3 (a factor-2 error in the update would show as ~4e-3).
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        tol = drift_tolerance(p, q, sa.grads, sb.grads, lr=1e-3, eps=1e-3, z_bound=sb.z_bound)
        assert float((p - q).abs().max()) <= tol, (name, tol)


def test_peft_lora_only_adapter_changes(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ZOTrainer(model=model, args=zo_args(tmp_path), train_dataset=lm_dataset()).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    base = [n for n in before if "lora_" not in n]
    assert all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in base)


def test_checkpoint_resume_reproduces_uninterrupted_run(tmp_path):
    ds = lm_dataset()
    full = tiny_model()
    ZOTrainer(model=full, args=zo_args(tmp_path / "a"), train_dataset=ds).train()

    first = tiny_model()
    ZOTrainer(model=first, args=zo_args(tmp_path / "b", max_steps=6, save_strategy="steps",
                                        save_steps=3), train_dataset=ds).train()
    ckpt = tmp_path / "b" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "model.safetensors").exists()
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert state["state"]["zo"]["step"] == 3  # the ZO state is in the checkpoint

    resumed = tiny_model(seed=123)  # different init: everything must come from the checkpoint
    ZOTrainer(model=resumed, args=zo_args(tmp_path / "b", max_steps=6),
              train_dataset=ds).train(resume_from_checkpoint=str(ckpt))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def _real_reason():
    from zoengine.models import default_model_available

    return default_model_available()


@pytest.mark.slow
@pytest.mark.skipif(_real_reason() is not None, reason=str(_real_reason()))
def test_smollm2_few_steps_lora(tmp_path):
    """SmolLM2-135M + LoRA through ZOTrainer for 2 steps on short Macbeth blocks."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    from zoengine.models import load_default_model
    from zoengine.tasks import lm_blocks, shakespeare

    model, tok = load_default_model()
    blocks = lm_blocks(tok, shakespeare().splits["train"]["text"][0], 16)[:8].tolist()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    tr = ZOTrainer(model=model, args=zo_args(tmp_path, max_steps=2, per_device_train_batch_size=2,
                                             learning_rate=1e-3, zo_eps=1e-2),
                   train_dataset=Dataset.from_dict({"input_ids": blocks, "labels": blocks}))
    out = tr.train()
    assert 0 < out.training_loss < 20
    assert any(not torch.equal(lora_before[n], p) for n, p in model.named_parameters()
               if n in lora_before)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_resume_without_optimizer_state_is_refused(tmp_path):
    """A checkpoint without optimizer.pt would restart the ZO step counter at 0 (and reuse the
    noise of the first steps): resuming from it stops at the first step with a clear error."""
    ds = lm_dataset()
    ZOTrainer(model=tiny_model(), args=zo_args(tmp_path, save_strategy="steps", save_steps=3),
              train_dataset=ds).train()
    ckpt = tmp_path / "checkpoint-3"
    (ckpt / "optimizer.pt").unlink()
    tr = ZOTrainer(model=tiny_model(), args=zo_args(tmp_path), train_dataset=ds)
    with pytest.raises(RuntimeError, match="optimizer.pt"):
        tr.train(resume_from_checkpoint=str(ckpt))
    assert _zo_of(tr).step_count == 0  # no ZO step was taken
    assert tr.state.global_step == 3


def _zo_of(tr):
    return tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer


def test_journal_resume_replays_without_forward_passes(tmp_path):
    """zo_journal=True: a run resumed from checkpoint-3 whose journal reaches step 6 replays
    steps 3-5 from the journal (no forward pass) and ends where an uninterrupted run ends."""
    ds = lm_dataset()
    full = tiny_model()
    ZOTrainer(model=full, args=zo_args(tmp_path / "a"), train_dataset=ds).train()

    first = tiny_model()
    ZOTrainer(model=first, args=zo_args(tmp_path / "b", save_strategy="steps", save_steps=3,
                                        zo_journal=True), train_dataset=ds).train()
    from zoengine.journal import read_records

    _, records, _ = read_records(tmp_path / "b" / "zo_journal.zoj")
    assert [r.step for r in records] == list(range(6))

    resumed = tiny_model(seed=123)
    calls = []
    resumed.register_forward_hook(lambda *a: calls.append(1))
    ZOTrainer(model=resumed, args=zo_args(tmp_path / "b", zo_journal=True),
              train_dataset=ds).train(resume_from_checkpoint=str(tmp_path / "b" /
                                                               "checkpoint-3"))
    assert calls == []  # steps 3, 4, 5 came from the journal
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    _, records, _ = read_records(tmp_path / "b" / "zo_journal.zoj")
    assert [r.step for r in records] == list(range(6))  # replayed steps were not re-appended
