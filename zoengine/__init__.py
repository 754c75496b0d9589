"""zoengine: zeroth-order, forward-only fine-tuning of large language models.

Importing zoengine is cheap and side-effect free: it imports neither triton nor cupy, never
initialises CUDA, and loads torch only when a name that needs it is first used (so
``zoengine.hwsim`` works without torch).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "MeZO": "zoengine.optim",
    "KerZOO": "zoengine.optim",
    "DiZO": "zoengine.optim",
    "PeZO": "zoengine.optim",
    "FZOO": "zoengine.optim",
    "HiZOO": "zoengine.optim",
    "SparseMeZO": "zoengine.optim",
    "ZO": "zoengine.optim",
    "ZOOptimizer": "zoengine.optim",
    "NonFiniteLossError": "zoengine.optim",
    "create": "zoengine.optim",
    "available_methods": "zoengine.optim",
}
# lazy submodules: ``zoengine.journal.replay`` works after a bare ``import zoengine``
_SUBMODULES = ("noise", "optim", "journal", "models", "kernels", "hwsim", "sparsity", "tasks",
               "run")
__all__ = sorted(_LAZY) + ["__version__", *_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"zoengine.{name}")
    else:
        raise AttributeError(f"module 'zoengine' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
