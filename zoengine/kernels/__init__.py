"""zoengine.kernels: the in-place ops of a ZO step, with interchangeable backends.

Every public op exists in ``reference.py`` (pure PyTorch, the oracle) and in the faster
backends with the same signature; ``dispatch.resolve_backend`` picks one.
"""

from zoengine.kernels.dispatch import BACKENDS, get_ops, resolve_backend
from zoengine.kernels.reference import perturb_, restore_update_

__all__ = ["BACKENDS", "get_ops", "perturb_", "resolve_backend", "restore_update_"]
