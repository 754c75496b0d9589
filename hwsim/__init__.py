"""zoengine.hwsim: price a ZO workload in FPGA/ASIC random-number hardware.

Importable without torch. The cost model itself lands with the hwsim issue.
"""

__all__: list[str] = []
