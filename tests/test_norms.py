"""``--train norms`` (zoengine.sparsity.norms): only the normalisation gains are trained, so a
pruned model keeps its zeros (and N:M groups) by construction; the run writes a plain model
folder that loads with transformers, and its journal rebuilds it. Tiny models from configs."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_recovery import lm  # noqa: F401  (the tiny model and text task, module-scoped)
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from zoengine.cli import main
from zoengine.sparsity import nm_ok
from zoengine.sparsity.norms import is_norm, norm_parameters, train_norms_only

torch.set_num_threads(2)


def _llama(layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2))


def test_norm_parameters_of_llama_are_the_rmsnorm_gains():
    model = _llama(layers=3)
    names = [n for n, _ in norm_parameters(model)]
    want = [f"model.layers.{i}.{k}.weight" for i in range(3)
            for k in ("input_layernorm", "post_attention_layernorm")] + ["model.norm.weight"]
    assert names == want
    assert sum(p.numel() for _, p in norm_parameters(model)) == 7 * 32


def test_norm_parameters_take_layernorm_bias_too():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    names = {n for n, _ in norm_parameters(gpt2)}
    assert "transformer.ln_f.bias" in names and "transformer.h.1.ln_2.weight" in names
    assert len(names) == 2 * (2 * 2 + 1)  # ln_1, ln_2 per block and ln_f; weight and bias
    assert is_norm(nn.RMSNorm(4)) and is_norm(nn.LayerNorm(4)) and not is_norm(nn.Linear(2, 2))


def test_a_model_without_norms_is_refused_by_name():
    with pytest.raises(ValueError, match="train='norms'"):
        norm_parameters(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_train_norms_only_freezes_everything_else():
    model = _llama()
    chosen = {n for n, _ in train_norms_only(model)}
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == chosen and len(chosen) == 5


@pytest.fixture(scope="module")
def pruned(lm, tmp_path_factory):  # noqa: F811  (lm: the imported fixture)
    out = tmp_path_factory.mktemp("norms") / "pruned"
    assert main(["prune", "--model", lm["model"], "--output-dir", str(out), "--method",
                 "magnitude", "--pattern", "2:4"]) == 0
    return {"model": str(out), "task": lm["task"]}


def test_train_norms_on_a_pruned_model_keeps_every_zero(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main(["train", "--model", pruned["model"], "--task", pruned["task"], "--train",
                 "norms", "--keep-zeros", "--steps", "4", "--batch-size", "2",
                 "--block-size", "8", "--lr", "0.05", "--eps", "0.01", "--output-dir",
                 str(run), "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainable_params"] == 5 * 32  # 2 layers x 2 gains + the final norm
    assert metrics["sparsity_after"]["sparsity"] == pytest.approx(0.5, abs=1e-12)
    after = dict(AutoModelForCausalLM.from_pretrained(run / "model").named_parameters())
    before = load_file(f"{pruned['model']}/model.safetensors")
    moved = {n for n, p in after.items() if n in before and not torch.equal(p, before[n])}
    assert moved and all("norm" in n for n in moved)  # the gains moved, nothing else did
    for n, p in after.items():
        if "proj" in n:  # the 2:4 zeros, exactly
            assert bool((p[before[n] == 0] == 0).all()) and nm_ok(p.detach(), 2, 4), n
    # the journal of the run rebuilds the same model from the pruned base
    rebuilt = tmp_path / "rebuilt"
    assert main(["apply-journal", pruned["model"], str(run / "journal.zoj"), str(rebuilt)]) == 0
    again = load_file(str(rebuilt / "model" / "model.safetensors"))
    assert all(torch.equal(again[n], after[n]) for n in moved)


def test_train_norms_is_validated_with_the_other_modes(pruned, tmp_path, capsys):
    assert main(["train", "--model", pruned["model"], "--task", pruned["task"], "--train",
                 "norm", "--output-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--train" in err and "norms" in err


@pytest.mark.parametrize("method", ["dizo", "kerzoo"])
def test_train_norms_runs_the_other_methods(pruned, tmp_path, method):
    """DiZO projects every gain under --train norms; KerZOO needs nothing special."""
    extra = ["--dizo-interval", "2"] if method == "dizo" else []
    run = tmp_path / method
    assert main(["train", "--model", pruned["model"], "--task", pruned["task"], "--train",
                 "norms", "--method", method, "--keep-zeros", "--steps", "3", "--batch-size",
                 "2", "--block-size", "8", "--output-dir", str(run), "--no-progress",
                 *extra]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sparsity_after"]["sparsity"] == pytest.approx(0.5, abs=1e-12)
