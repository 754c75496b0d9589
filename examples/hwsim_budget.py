"""Price MeZO vs PeZO random-number hardware for three model sizes on FPGA and a 45 nm ASIC.

    python examples/hwsim_budget.py            # tables
    python examples/hwsim_budget.py --json     # machine-readable
    python examples/hwsim_budget.py --plot out # + reuse-curve PNGs (needs matplotlib)

Sizes are rounded parameter counts ("-sized" workloads, full-parameter ZO): OPT-1.3B (1.3e9),
a 7B model (7e9) and SmolLM2-135M (135e6). MeZO: Gaussian CLT-4 from an LFSR, no reuse,
4 uses per step (seed regeneration, MeZO Alg. 1). PeZO: uniform LFSR with on-the-fly reuse
R = 16 (16 generators for 256 lanes). Both: W = 8 bits, 256 lanes at 200 MHz.
"""

from __future__ import annotations

import argparse
import json
import os

from zoengine.hwsim import Workload, estimate
from zoengine.hwsim.report import format_table, has_matplotlib, plot_reuse_curve

SIZES = {"OPT-1.3B": 1.3e9, "7B": 7e9, "SmolLM2-135M": 135e6}
PLATFORMS = ("fpga-xc7", "asic-45nm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", default=None, help="folder for reuse-curve PNGs")
    args = ap.parse_args()
    results = []
    for platform in PLATFORMS:
        budgets, labels = [], []
        for name, d in SIZES.items():
            for method in ("mezo", "pezo"):
                b = estimate(Workload.from_model(d, method=method), platform)
                budgets.append(b)
                labels.append(f"{name} {method}")
                results.append({"model": name, "method": method, "platform": platform,
                                "lut": b.lut, "ff": b.ff, "ge": b.ge, "e_step_j": b.e_step_j,
                                "p_dyn_w": b.p_dyn_w, "t_step_s": b.t_step_s})
        if not args.json:
            print(f"\n== {platform} ==")
            print(format_table(budgets, labels))
            for i in range(0, len(budgets), 2):
                m, p = budgets[i], budgets[i + 1]
                print(f"  {labels[i].split()[0]:14s} PeZO vs MeZO: energy/step "
                      f"{p.e_step_j / m.e_step_j - 1:+.1%}, logic "
                      f"{(p.lut or p.ge) / (m.lut or m.ge) - 1:+.1%}")
        if args.plot and has_matplotlib():
            os.makedirs(args.plot, exist_ok=True)
            path = os.path.join(args.plot, f"reuse_{platform}.png")
            plot_reuse_curve(Workload.from_model(1.3e9, method="pezo"), platform, path)
            print(f"wrote {path}")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
