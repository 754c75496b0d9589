"""DiZO through the front ends: `zoengine train --method dizo` (head, full, LoRA) and
`ZOTrainer(zo_method="dizo")`: the search gets fresh batches of its own, the training batches
are unchanged, what cannot work is refused before the first step, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import tiny_args
from test_hf import lm_dataset, tiny_model, zo_args

from zoengine.cli import main
from zoengine.hf import SearchBatches, ZOTrainer
from zoengine.run.loop import LOOP_STARTED

DIZO = ["--method", "dizo", "--dizo-interval", "2", "--steps", "4", "--batch-size", "4"]


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


# ---- zoengine train ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, tensors", [("head", 1), ("full", 2 * 2), ("lora", 2 * 2 * 2)])
def test_cli_dizo_projects_in_every_mode(tiny, tmp_path, mode, tensors):
    """head: the option rows; full: k_proj/v_proj of 2 layers; LoRA: A and B of q and v."""
    out = tmp_path / mode
    assert main(tiny_args(tiny, out, "--train", mode, *DIZO)) == 0
    m = _metrics(out)
    assert m["config"]["dizo_interval"] == 2 and len(m["curve"]["loss"]) == 4
    assert m["dizo"]["searches"] == 2 and m["dizo"]["pending"] is False
    assert m["dizo"]["projected_tensors"] == tensors


def test_cli_dizo_keeps_the_training_batches(tiny, tmp_path):
    """Same seed: DiZO's first two steps equal MeZO's (the search draws from its own stream),
    and the projection after step 2 changes the trained weights."""
    from safetensors.torch import load_file

    base = [a for a in DIZO if a not in ("--dizo-interval", "2")]
    runs = {}
    for name, extra in (("mezo", ["--method", "mezo"]), ("dizo", ["--dizo-interval", "2"])):
        out = tmp_path / name
        assert main(tiny_args(tiny, out, "--train", "head", *base, *extra)) == 0
        runs[name] = (_metrics(out)["curve"]["loss"], load_file(out / "head.safetensors"))
    assert runs["mezo"][0][:2] == runs["dizo"][0][:2]
    assert not torch.equal(runs["mezo"][1]["head_rows"], runs["dizo"][1]["head_rows"])


@pytest.mark.parametrize("extra, flag", [
    (["--method", "dizo", "--dizo-interval", "0"], "--dizo-interval"),
    (["--method", "mezo", "--dizo-interval", "5"], "--dizo-interval"),
])
def test_cli_dizo_bad_flags_exit_2(tiny, tmp_path, capsys, extra, flag):
    assert main(tiny_args(tiny, tmp_path / "out", "--steps", "2", *extra)) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_cli_dizo_full_without_attention_names_is_refused_before_training(tiny, tmp_path,
                                                                          capsys):
    """A GPT-2 (attn.c_attn, no k_proj/v_proj) with --train full: exit 2 before any step."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2,
                               n_positions=256)).save_pretrained(folder)
    tok.save_pretrained(folder)
    args = tiny_args(tiny, tmp_path / "out", "--train", "full", *DIZO)
    args[args.index("--model") + 1] = str(folder)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "--train" in captured.err and "k_proj" in captured.err
    assert LOOP_STARTED not in captured.out


# ---- ZOTrainer ---------------------------------------------------------------------------------

class Recording(ZOTrainer):
    """Records the training batches (the only override in these tests)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"].clone())
        return super().training_step(model, inputs, num_items_in_batch)


def _trainer(out, model, cls=ZOTrainer, method="dizo", **kw):
    if method == "dizo":
        kw.setdefault("zo_kwargs", {"interval": 2, "search_iters": 2})
    tr = cls(model=model, args=zo_args(out, zo_method=method, max_steps=4, **kw),
             train_dataset=lm_dataset())
    tr.seen = []
    return tr


def _zo(tr):
    return tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer


def test_trainer_dizo_wires_its_search_and_keeps_the_training_batches(tmp_path):
    dizo = _trainer(tmp_path / "d", tiny_model(), Recording)
    dizo.train()
    opt = _zo(dizo)
    assert isinstance(opt.projection_closure, SearchBatches)
    assert opt.projection_summary()["searches"] == 2
    mezo = _trainer(tmp_path / "m", tiny_model(), Recording, method="mezo")
    mezo.train()
    assert not hasattr(_zo(mezo), "projection_closure")
    assert len(dizo.seen) == len(mezo.seen) == 4
    assert all(torch.equal(a, b) for a, b in zip(dizo.seen, mezo.seen))


def test_trainer_dizo_resume_reproduces_uninterrupted_run(tmp_path):
    full = tiny_model()
    _trainer(tmp_path / "a", full).train()
    _trainer(tmp_path / "b", tiny_model(), save_strategy="steps", save_steps=3).train()
    resumed = tiny_model(seed=123)
    tr = _trainer(tmp_path / "b", resumed)
    tr.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert _zo(tr).projection_summary()["searches"] == 2  # one restored, one after resume
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
