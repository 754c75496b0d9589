"""Shared test set-up: 1 thread (CI has 2 contended cores), deterministic seeds, and the same
process-wide state at the start of every test, whatever ran before it (docs/testing.md)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton)

torch.set_num_threads(1)

# Without a GPU, Triton kernels run under the interpreter. The variable must be set before
# triton.language is first imported (torch.optim imports it through torch._dynamo): a
# @triton.jit function created earlier stays compiled-only and cannot run on the CPU. The
# flip side: nothing in this process can compile for a GPU (tests/test_triton_ops.py compiles
# in a subprocess).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_THREADS = torch.get_num_threads()
_DTYPE = torch.get_default_dtype()


@pytest.fixture(autouse=True)
def _same_start_state():
    """Each test starts from the same process state and puts back what it changed.

    In-process runs of the CLI (`zoengine train/eval`) set torch's thread count; a test may set
    environment variables (ZOENGINE_BACKEND, CC, ZOENGINE_CACHE_DIR, TRITON_INTERPRET...) or
    change directory without monkeypatch. Any of these would make a later test's outcome depend
    on the order. (Warning filters are already restored by pytest around each test.)
    """
    env = dict(os.environ)
    cwd = os.getcwd()
    torch.set_num_threads(_THREADS)
    torch.set_default_dtype(_DTYPE)
    torch.set_grad_enabled(True)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield
    for k in set(os.environ) - set(env):
        del os.environ[k]
    for k, v in env.items():
        if os.environ.get(k) != v:
            os.environ[k] = v
    if os.getcwd() != cwd:
        os.chdir(cwd)
    torch.set_num_threads(_THREADS)
    torch.set_default_dtype(_DTYPE)
    torch.set_grad_enabled(True)
