"""Zeroth-order optimizers in torch.optim form."""

from zoengine.optim.base import ZOOptimizer
from zoengine.optim.functional import NonFiniteLossError, StepResult, ZOGroup, mezo_step
from zoengine.optim.mezo import MeZO

__all__ = ["MeZO", "NonFiniteLossError", "StepResult", "ZOGroup", "ZOOptimizer", "mezo_step"]
