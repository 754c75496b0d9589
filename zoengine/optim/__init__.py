"""Zeroth-order optimizers in torch.optim form."""

from zoengine.optim.base import ZOOptimizer
from zoengine.optim.functional import NonFiniteLossError, StepResult, ZOGroup, mezo_step
from zoengine.optim.mezo import MeZO
from zoengine.optim.registry import available_methods, create, register_method

__all__ = ["MeZO", "NonFiniteLossError", "StepResult", "ZOGroup", "ZOOptimizer",
           "available_methods", "create", "mezo_step", "register_method"]
