"""What a run stands on: the model it loads and the CPU threads it uses.

Both are needed by ``train``, ``eval``, ``prune`` and ``merge``; they live here, apart from the
job, so those commands import this module and not each other (the first waves had
job -> loop -> strategies -> recovery -> job, a cycle behind lazy imports).
"""

from __future__ import annotations

import os

import torch

from zoengine.run.config import DEFAULT_MODEL
from zoengine.tasks import TaskError


def log(msg: str) -> None:
    """Print one line of a run's log at once (the loop and tests read it as it comes)."""
    print(msg, flush=True)


def load_model(spec: str, dtype: str | torch.dtype = torch.float32, *, log=log):
    """(model, tokenizer): the embedded default or a local Hugging Face model folder, in
    ``dtype``. A folder loads through ``zoengine.loading`` (peak ~ one copy of the model)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if spec == DEFAULT_MODEL:
        from zoengine.models import default_model_available, load_default_model

        reason = default_model_available()
        if reason:
            raise TaskError("--model", f"the default model cannot load: {reason}")
        return load_default_model(dtype)
    if not os.path.isdir(spec) or not os.path.exists(os.path.join(spec, "config.json")):
        raise TaskError("--model", f"{spec!r} is neither {DEFAULT_MODEL!r} nor a local Hugging "
                                   "Face model folder (with config.json)")
    from transformers import AutoTokenizer

    from zoengine.loading import load_pretrained

    tok = _load_tokenizer(AutoTokenizer, spec)
    model = load_pretrained(spec, dtype, log=log)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model, tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer_config.json")


def _load_tokenizer(auto, spec: str):
    """The folder's tokenizer, or a ``--model`` error that says what is missing (transformers
    says "install sentencepiece" for a folder that holds no tokenizer at all)."""
    present = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(spec, f))]
    if not present:
        raise TaskError("--model", f"{spec!r} holds no tokenizer (none of "
                                   f"{', '.join(TOKENIZER_FILES)}): copy the base model's "
                                   "tokenizer files into it (tokenizer.save_pretrained)")
    try:
        return auto.from_pretrained(spec)
    except Exception as exc:  # noqa: BLE001 - transformers raises bare Exception/ValueError/OSError
        raise TaskError("--model", f"the tokenizer in {spec!r} ({', '.join(present)}) cannot "
                                   f"load: {type(exc).__name__}: {exc}") from None


def auto_threads() -> int:
    """torch's thread count, lowered to the cores other processes leave free.

    On a 2-core machine with one busy neighbour, 2 threads made a forward 2.5x slower than
    1 thread (spinning threads wait on a descheduled peer), so a busy machine gets fewer.
    """
    n = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        return n
    free = int((os.cpu_count() or n) - busy + 0.5)
    return max(1, min(n, free))
