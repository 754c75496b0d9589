"""zoengine.hwsim: price a ZO workload in FPGA/ASIC random-number hardware.

Importable without torch (numpy only; cupy is used only when ``cupy.cuda.is_available()``).

    >>> from zoengine.hwsim import Workload, estimate
    >>> b = estimate(Workload.from_model(125e6, method="pezo"), "asic-45nm")
    >>> round(b.e_step_j * 1e3, 3)  # mJ per step  # doctest: +SKIP

Co-simulation: ``zoengine.hwsim.generators.hw_noise(spec, numel, seed=, step=, key=, sample=)``
returns the float32 numbers a hardware generator would produce (``noise="hw:<spec>"``).
"""

from zoengine.hwsim.catalogue import CATALOGUE, Coef
from zoengine.hwsim.costs import generator_cost
from zoengine.hwsim.estimate import Budget, estimate, unit_cost
from zoengine.hwsim.generators import hw_noise, stream
from zoengine.hwsim.platforms import PLATFORMS, get_platform
from zoengine.hwsim.specs import parse_spec
from zoengine.hwsim.stats import check_stream
from zoengine.hwsim.workload import PRESETS, Workload

__all__ = ["CATALOGUE", "PLATFORMS", "PRESETS", "Budget", "Coef", "Workload", "check_stream",
           "estimate", "generator_cost", "get_platform", "hw_noise", "parse_spec", "stream",
           "unit_cost"]
