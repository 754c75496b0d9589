"""Recovering a pruned model from the command line (issue 15): masked LoRA and `zoengine merge`,
distillation (`--objective kd | kd+lm`), `--lora-scaling rslora`, `zoengine prune --structure`.
Tiny models from configs; the real-model numbers are benchmarks/bench_pruned.py's."""

import json
import os

import pytest
import torch
from test_cli import make_tiny_model, tiny_args

from zoengine.cli import main
from zoengine.sparsity import nm_ok

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("recovery")
    txt = d / "t.txt"
    txt.write_text("\n\n".join(f"the movie is good {i}. i love this day and the night."
                               for i in range(200)))
    return {"model": make_tiny_model(str(d / "m")), "task": str(txt)}


def _train(lm, out, *extra):
    return main(["train", "--model", lm["model"], "--task", lm["task"], "--steps", "3",
                 "--batch-size", "2", "--block-size", "8", "--output-dir", str(out),
                 "--no-progress", *extra])


def test_lora_on_a_pruned_model_merges_with_the_exact_zeros(lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zoengine.run.mask_files import read_masks
    from zoengine.sparsity.lora import mask_lora

    run = tmp_path / "run"
    assert _train(lm, run, "--lora", "--prune", "magnitude:2:4", "--lora-targets",
                  "q_proj,v_proj,up_proj", "--lr", "0.05", "--eps", "0.05") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sparsity_after"]["sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert (run / "keep_masks.safetensors").exists()
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    masks = read_masks(str(run / "keep_masks.safetensors"))
    params = dict(merged.named_parameters())
    for name, keep in masks.items():
        w = params[name].detach()
        assert bool((w[~keep] == 0).all()), name  # every pruned zero is exactly zero
        assert nm_ok(w, 2, 4), name
    # the adapter model (pruned base + masked adapter) computes what the merged model does
    base = AutoModelForCausalLM.from_pretrained(lm["model"])
    with torch.no_grad():
        bp = dict(base.named_parameters())
        for name, keep in masks.items():
            bp[name][~keep] = 0.0
    adapter = PeftModel.from_pretrained(base, run / "adapter").eval()
    mask_lora(adapter, masks)
    ids = torch.randint(0, merged.config.vocab_size, (2, 8),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    # fp32: the merge adds the delta into W before the matmul (one rounding of W + sΔ per
    # weight), the adapter adds x·Δᵀ after: ~K·eps·|logits| apart, K = 64
    assert torch.allclose(a, b, rtol=0, atol=64 * 1.2e-7 * float(a.abs().max()) + 1e-6)


def test_rslora_scaling_reaches_the_adapter(lm, tmp_path):
    assert _train(lm, tmp_path / "r", "--lora", "--lora-scaling", "rslora") == 0
    cfg = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True


def test_objective_kd_builds_the_teacher_cache_before_pruning(lm, tmp_path):
    from zoengine.tasks import TeacherCache

    run = tmp_path / "kd"
    assert _train(lm, run, "--train", "full", "--prune", "magnitude", "--objective", "kd+lm",
                  "--kd-weight", "0.7", "--kd-top-k", "8", "--kd-blocks", "12") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    tc = metrics["teacher_cache"]
    assert tc["blocks"] == 12 and tc["top_k"] == 8
    assert tc["disk_bytes"] == sum(f.stat().st_size for f in (run / "teacher_cache").iterdir())
    cache = TeacherCache.open(str(run / "teacher_cache"))
    # the dense model's logits: the student starts pruned, so its KD loss is > 0
    from transformers import AutoModelForCausalLM

    from zoengine.tasks import kd_loss

    dense = AutoModelForCausalLM.from_pretrained(lm["model"]).eval()
    b = cache.batch([0, 1])
    with torch.no_grad():
        assert float(kd_loss(dense(input_ids=b.input_ids).logits[:, :-1], b)) < 1e-5


@pytest.mark.parametrize("extra, flag", [
    (["--objective", "distil"], "--objective"),
    (["--objective", "kd+lm", "--kd-weight", "2"], "--kd-weight"),
    (["--lora-scaling", "rora"], "--lora-scaling"),
])
def test_recovery_flags_are_checked(lm, tmp_path, capsys, extra, flag):
    rc = _train(lm, tmp_path / "bad", *extra)
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and "Traceback" not in err


def test_objective_kd_needs_an_lm_task(tiny, tmp_path, capsys):
    rc = main(tiny_args(tiny, tmp_path / "o", "--train", "full", "--objective", "kd",
                        "--steps", "2"))
    assert rc == 2 and "--objective" in capsys.readouterr().err


def test_prune_structure_writes_a_smaller_model_that_trains(lm, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "st"
    assert main(["prune", "--model", lm["model"], "--output-dir", str(out), "--structure",
                 "channels", "--sparsity", "0.25", "--calib-task", lm["task"],
                 "--calib-blocks", "4"]) == 0
    small = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(lm["model"])
    assert small.config.intermediate_size == dense.config.intermediate_size * 3 // 4
    assert small.model.layers[0].mlp.up_proj.weight.shape[0] == small.config.intermediate_size
    assert os.path.exists(out / "manifest.json")
    assert main(["train", "--model", str(out), "--task", lm["task"], "--train", "full",
                 "--steps", "2", "--batch-size", "2", "--block-size", "8", "--output-dir",
                 str(tmp_path / "rec"), "--no-progress"]) == 0


def test_lora_with_keep_zeros_on_an_already_pruned_model(lm, tmp_path):
    """`zoengine prune` then `train --lora --keep-zeros`: the zeros the model holds become the
    masks (by name), the report and the merge keep them."""
    from transformers import AutoModelForCausalLM

    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", lm["model"], "--output-dir", str(pruned), "--method",
                 "magnitude", "--pattern", "2:4"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--model", str(pruned), "--task", lm["task"], "--lora",
                 "--keep-zeros", "--steps", "2", "--batch-size", "2", "--block-size", "8",
                 "--output-dir", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sparsity_after"]["sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    before = dict(AutoModelForCausalLM.from_pretrained(pruned).named_parameters())
    for n, p in merged.named_parameters():
        if "proj" in n:
            assert bool((p[before[n] == 0] == 0).all()) and nm_ok(p.detach(), 2, 4), n
