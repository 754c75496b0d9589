"""zoengine.loading: a model folder loads with one copy of the weights, values equal to
transformers' own loader, in any dtype; the CLI's --dtype and the plan made before loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from zoengine import loading
from zoengine.run.config import RunConfig
from zoengine.run.job import load_dtype
from zoengine.run.resources import load_model


def _save(folder, *, tied=True, dtype=torch.bfloat16, shard="40KB", hidden=32, layers=2):
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(folder, max_shard_size=shard)
    return str(folder)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_equal_transformers_loader(tmp_path, tied, dtype):
    folder = _save(tmp_path / "m", tied=tied)
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()  # several shards
    got = loading.load_pretrained(folder, dtype, log=pytest.fail)  # no fallback taken
    want = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    assert not got.training
    w = want.state_dict()
    for name, t in got.state_dict().items():
        assert t.dtype == w[name].dtype and torch.equal(t, w[name]), name
    if tied:
        assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    ids = torch.arange(12).view(1, 12)
    assert torch.equal(got(ids).logits, want(ids).logits)


def test_single_file_and_checkpoint_facts(tmp_path):
    folder = _save(tmp_path / "m", shard="10GB", dtype=torch.float32)
    tensors = loading.checkpoint_tensors(folder)
    assert loading.checkpoint_dtype(tensors) == torch.float32
    model = loading.load_pretrained(folder, torch.bfloat16, log=pytest.fail)
    stored = sum(p.numel() for p in model.parameters()) * 4
    assert loading.checkpoint_bytes(folder) == stored


def test_conversion_goes_through_a_bounded_buffer(tmp_path, monkeypatch):
    """Chunks smaller than a tensor still give the same values (the 64 MiB buffer, shrunk)."""
    folder = _save(tmp_path / "m")
    monkeypatch.setattr(loading, "CHUNK_BYTES", 100)  # 50 bf16 numbers per read
    got = loading.load_pretrained(folder, torch.float32, log=pytest.fail)
    want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    assert all(torch.equal(t, want[n]) for n, t in got.state_dict().items())


def test_renamed_keys_fall_back_to_transformers(tmp_path):
    folder = tmp_path / "m"
    _save(folder, shard="10GB")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    notes = []
    model = loading.load_pretrained(str(folder), torch.float32, log=notes.append)
    assert notes and "from_pretrained" in notes[0] and "model.extra.weight" in notes[0]
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_truncated_file_and_wrong_shape_are_refused(tmp_path):
    folder = tmp_path / "m"
    _save(folder, shard="10GB", dtype=torch.float32)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-64])
    with pytest.raises(EOFError, match="ends inside a tensor"):
        loading.load_pretrained(str(folder), torch.float32)
    path.write_bytes(data)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ValueError, match="stored shape"):
        loading.load_pretrained(str(folder), torch.float32)


_PEAK = textwrap.dedent("""
    import sys, torch
    import transformers.models.llama.modeling_llama  # imported before the window opens
    from zoengine.loading import load_pretrained
    load_pretrained(sys.argv[2], torch.float32)  # warm: lazy imports, allocator arenas
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    base = hwm()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model = load_pretrained(sys.argv[1], torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print((hwm() - base) / size)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_is_one_copy_of_the_model(tmp_path):
    """bf16 shards loaded as fp32 (the case where transformers' loader measured 1.6x): the
    process's peak grows by <= 1.1x the loaded model (32M parameters, 128 MiB in fp32)."""
    big = _save(tmp_path / "big", hidden=512, layers=8, shard="20MB")
    small = _save(tmp_path / "small")
    out = subprocess.run([sys.executable, "-c", _PEAK, big, small], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ratio = float(out.stdout.split()[-1])
    assert 0.9 < ratio <= 1.1, ratio


# ---- the run: --dtype, and --max-memory planning before the weights are read ----------------

def _config_only_folder(tmp_path, **over):
    cfg = LlamaConfig(vocab_size=49152, hidden_size=3072, intermediate_size=8192,
                      num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                      tie_word_embeddings=True, **over)  # ~3.2B parameters: no weights written
    cfg.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("budget, want", [("40GiB", "float32"), ("10GiB", "bfloat16")])
def test_plan_before_loading_picks_the_load_dtype(tmp_path, budget, want):
    cfg = RunConfig(model=_config_only_folder(tmp_path), max_memory=budget, train="full")
    assert load_dtype(cfg, SimpleNamespace(kind="lm")) == want


def test_dtype_without_budget_is_the_flag(tmp_path):
    cfg = RunConfig(model=_config_only_folder(tmp_path), dtype="bfloat16")
    assert load_dtype(cfg, SimpleNamespace(kind="lm")) == "bfloat16"
    assert load_dtype(RunConfig(model=cfg.model), SimpleNamespace(kind="lm")) == "float32"


def test_train_in_bfloat16_from_the_cli(tiny, tmp_path):
    from zoengine.cli import main

    out = tmp_path / "run"
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(f"the movie is good {i}. i love this day." for i in range(40)))
    assert main(["train", "--model", tiny["model"], "--task", str(txt), "--train", "full",
                 "--dtype", "bfloat16", "--steps", "2", "--batch-size", "2", "--block-size",
                 "8", "--eval-limit", "1", "--output-dir", str(out), "--no-progress"]) == 0
    assert json.loads((out / "run.json").read_text())["dtype"] == "bfloat16"
    after = json.loads((out / "metrics.json").read_text())["after"]
    assert after["test"]["blocks"] == after["dev"]["blocks"] == 1  # --eval-limit: LM blocks
    stored = loading.checkpoint_tensors(str(out / "model"))  # the trained weights, as trained
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    model, _ = load_model(str(out / "model"), "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_dtype_exits_2(tiny, tmp_path, capsys):
    from zoengine.cli import main

    assert main(["train", "--model", tiny["model"], "--task", tiny["task"], "--dtype", "int8",
                 "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--dtype" in capsys.readouterr().err
