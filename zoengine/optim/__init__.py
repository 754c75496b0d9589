"""Zeroth-order optimizers in torch.optim form."""

from zoengine.optim.base import ZOOptimizer
from zoengine.optim.batched import group_losses, tile_batch
from zoengine.optim.dizo import DiZO
from zoengine.optim.functional import NonFiniteLossError, StepResult, ZOGroup, mezo_step, zo_step
from zoengine.optim.fzoo import FZOO
from zoengine.optim.hizoo import HiZOO
from zoengine.optim.mezo import MeZO
from zoengine.optim.population import BatchedEvaluationError
from zoengine.optim.presets import KerZOO, PeZO
from zoengine.optim.registry import available_methods, create, method_name, register_method
from zoengine.optim.sparse_mezo import SparseMeZO
from zoengine.optim.zo import ZO

__all__ = ["ZO", "BatchedEvaluationError", "DiZO", "FZOO", "HiZOO", "KerZOO", "MeZO",
           "NonFiniteLossError", "PeZO", "SparseMeZO", "StepResult", "ZOGroup", "ZOOptimizer",
           "available_methods", "create", "group_losses", "method_name", "mezo_step",
           "register_method", "tile_batch", "zo_step"]
