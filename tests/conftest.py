"""Shared test set-up: 1 thread (CI has 2 contended cores), deterministic torch seed."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton)

torch.set_num_threads(1)

# Without a GPU, Triton kernels run under the interpreter. The variable must be set before
# triton.language is first imported (torch.optim imports it through torch._dynamo): a
# @triton.jit function created earlier stays compiled-only and cannot run on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield
