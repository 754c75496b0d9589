"""zoengine: zeroth-order, forward-only fine-tuning of large language models.

Imports neither triton nor cupy and never initialises CUDA; GPU paths load on first use.
"""

from zoengine import noise
from zoengine.optim import MeZO, NonFiniteLossError, ZOOptimizer

__version__ = "0.1.0"
__all__ = ["MeZO", "NonFiniteLossError", "ZOOptimizer", "noise", "__version__"]
