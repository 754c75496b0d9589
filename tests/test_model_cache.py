"""The default model's converted copy in the cache (zoengine/models.py): the GGUF file is read
once per dtype, a later load gives the very same weights and tokenizer, and a damaged copy is
converted again, never used. The GGUF reader is replaced by a tiny LLaMA (the cache does not
depend on where the model came from); the real conversion runs in the real-model tests."""

import pytest
import torch
from helpers import tiny_llama

from zoengine import models

torch.set_num_threads(1)


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    from test_cli import make_tiny_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_model(str(tmp_path / "tok")))
    calls = []

    def convert(dtype):
        calls.append(dtype)
        return tiny_llama().to(dtype), tok

    monkeypatch.setattr(models, "default_model_available", lambda: None)
    monkeypatch.setattr(models, "_from_gguf", convert)
    monkeypatch.setattr(models, "_gguf_folder", lambda: str(tmp_path))
    (tmp_path / models._GGUF_FILE).write_bytes(b"GGUF stand-in")
    monkeypatch.setenv("ZOENGINE_CACHE_DIR", str(tmp_path / "cache"))
    return calls


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_converted_once_then_loaded_from_the_cache(fake_gguf, dtype):
    first, tok1 = models.load_default_model(dtype)
    second, tok2 = models.load_default_model(dtype)
    assert fake_gguf == [dtype]  # converted once
    assert _same(first, second) and second.dtype == dtype
    assert tok1("good movie")["input_ids"] == tok2("good movie")["input_ids"]
    models.load_default_model(torch.float32 if dtype != torch.float32 else torch.bfloat16)
    assert len(fake_gguf) == 2  # another dtype: its own conversion


def test_a_damaged_copy_is_converted_again(fake_gguf):
    first, _ = models.load_default_model()
    folder = models._converted_folder(torch.float32)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the last tensor's bytes
    weights.write_bytes(bytes(data))
    again, _ = models.load_default_model()
    assert len(fake_gguf) == 2 and _same(first, again)
    assert models._intact(folder)  # rewritten whole
