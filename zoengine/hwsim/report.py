"""Human tables, JSON and (when matplotlib is importable) PNG plots of hwsim results."""

from __future__ import annotations

import importlib.util
import json
import math

from zoengine.hwsim.estimate import Budget, estimate
from zoengine.hwsim.workload import Workload

__all__ = ["budget_json", "format_budget", "format_table", "has_matplotlib", "plot_pareto",
           "plot_reuse_curve", "reuse_sweep"]


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return f"0 {unit}"
    for f, p in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""), (1e-3, "m"), (1e-6, "u"),
                 (1e-9, "n"), (1e-12, "p"), (1e-15, "f")):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def format_budget(b: Budget, *, provenance: bool = True) -> str:
    """A human-readable summary of one budget."""
    w = b.workload
    gauss = f"{w['method']}" + (f"-{w['clt_k']}" if w["method"] == "clt" else
                                f" 2^{w['icdf_bits']}" if w["method"] == "icdf" else "")
    dist = gauss if w["dist"] == "normal" else w["dist"]
    reuse = w["reuse"] + (f" R={w['reuse_factor']}" if w["reuse"] == "on-the-fly" else
                          f" P={w['pool_size']} refresh={w['refresh_every']}"
                          if w["reuse"] == "pool" else "")
    lines = [
        f"hwsim estimate  [{b.platform}]  {w['label'] or ''}".rstrip(),
        f"  workload     d={w['d']:,} q={w['q']} uses={w['uses']:g}  W={w['bits']} b  "
        f"{dist} from {w['source']}  scale={w['scale']}  reuse={reuse}",
        f"  datapath     L={w['lanes']} lanes @ {_si(w['clock_hz'], 'Hz')}",
        f"  numbers/step use {b.n_use:.4g}  generate {b.n_gen:.4g}  pool reads {b.n_read:.4g}",
        f"  generators   {b.n_generators} units x {b.samples_per_clock_per_unit:g} samples/clk "
        f"= {_si(b.samples_per_s, 'S/s')}",
    ]
    if b.kind == "fpga":
        bram = f"{b.bram18:g}"
        if b.bram18_capacity or b.bram18_bandwidth:
            bram += f" (capacity {b.bram18_capacity:g}, bandwidth {b.bram18_bandwidth:g})"
        lines.append(f"  resources    LUT {b.lut:,.0f}  FF {b.ff:,.0f}  DSP {b.dsp:g}  "
                     f"BRAM18 {bram}")
        if b.utilisation:
            lines.append("  utilisation  " + "  ".join(f"{k} {v:.2%}"
                                                      for k, v in b.utilisation.items()))
    else:
        lines.append(f"  resources    {b.ge:,.0f} GE = {b.area_um2:,.0f} um^2"
                     + (f"  (+ {b.sram_bits:.4g}-bit SRAM)" if b.sram_bits else ""))
    lines += [
        f"  energy/step  {_si(b.e_step_j, 'J')}  = gen {_si(b.e_gen_j, 'J')} + pool reads "
        f"{_si(b.e_read_j, 'J')} + distribution {_si(b.e_dist_j, 'J')}",
        f"  per number   gen {_si(b.e_gen_per_sample_j, 'J')}  read "
        f"{_si(b.e_read_per_number_j, 'J')}  dist {_si(b.e_dist_per_number_j, 'J')}",
        f"  power        dynamic {_si(b.p_dyn_w, 'W')}  static {_si(b.p_static_w, 'W')}",
        f"  time/step    {_si(b.t_step_s, 's')}  (RNG-bound {_si(b.t_rng_step_s, 's')}, "
        f"lane-bound {_si(b.t_lanes_step_s, 's')}, refill {_si(b.t_refill_step_s, 's')})",
    ]
    if b.lanes_for_target is not None:
        lines.append(f"  target       {'met' if b.meets_target else 'MISSED'}; lanes needed "
                     f"{b.lanes_for_target}")
    if b.interpolated:
        lines.append("  interpolated " + "\n               ".join(b.interpolated))
    for n in b.notes:
        lines.append(f"  note         {n}")
    if provenance:
        lines.append("  provenance")
        for c in b.provenance:
            lines.append(f"    [{c.tag}] {c.name} = {c.value:g} {c.unit}  -- {c.source}")
    return "\n".join(lines)


def format_table(budgets: list[Budget], labels: list[str] | None = None) -> str:
    """One row per budget: the numbers one compares across configurations."""
    hdr = ("config", "platform", "units", "LUT", "FF", "DSP", "BRAM18", "GE", "E/step",
           "P_dyn", "t/step")
    rows = []
    for i, b in enumerate(budgets):
        lab = labels[i] if labels else (b.workload.get("label") or f"#{i}")
        rows.append((lab, b.platform, f"{b.n_generators}", f"{b.lut:,.0f}", f"{b.ff:,.0f}",
                     f"{b.dsp:g}", f"{b.bram18:g}", f"{b.ge:,.0f}", _si(b.e_step_j, "J"),
                     _si(b.p_dyn_w, "W"), _si(b.t_step_s, "s")))
    widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*hdr), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def budget_json(b: Budget | list[Budget], **kw) -> str:
    data = [x.to_dict() for x in b] if isinstance(b, list) else b.to_dict()
    return json.dumps(data, indent=2, default=str, **kw)


def reuse_sweep(w: Workload, platform: str, factors=None) -> list[tuple[int, Budget]]:
    """Budgets for on-the-fly reuse factors R (divisors of the lanes), R=1 being no reuse."""
    if factors is None:
        factors = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if w.lanes % r == 0]
    out = []
    for r in factors:
        # N_gen follows R here, not an optimizer's count for one configuration
        wr = w.replace(reuse="none", reuse_factor=1, pool_size=None, refresh_every=None,
                       n_gen_per_step=None) \
            if r == 1 else w.replace(reuse="on-the-fly", reuse_factor=r, pool_size=None,
                                     refresh_every=None, n_gen_per_step=None)
        out.append((r, estimate(wr, platform)))
    return out


def plot_reuse_curve(w: Workload, platform: str, path: str) -> str:
    """PNG: energy per step and logic (LUT or GE) vs the on-the-fly reuse factor."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    sweep = reuse_sweep(w, platform)
    rs = [r for r, _ in sweep]
    e = [b.e_step_j * 1e3 for _, b in sweep]
    logic = [(b.lut if b.kind == "fpga" else b.ge) for _, b in sweep]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(rs, e, "o-", label="energy per step (mJ)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("on-the-fly reuse factor R (n = L / R generators)")
    ax.set_ylabel("energy per step (mJ)")
    ax2 = ax.twinx()
    ax2.plot(rs, logic, "s--", color="tab:orange",
             label="LUT" if sweep[0][1].kind == "fpga" else "GE")
    ax2.set_yscale("log")
    ax2.set_ylabel("LUT" if sweep[0][1].kind == "fpga" else "gate equivalents")
    ax.set_title(f"hwsim {platform}: d={w.d:.3g}, W={w.bits}, L={w.lanes}, {w.dist}")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(points: list[dict], path: str) -> str:
    """PNG: energy per step vs training loss, Pareto front highlighted.

    ``points``: dicts with ``label``, ``energy_j`` (per step) and ``loss`` (co-simulation
    results, e.g. from benchmarks/bench_cosim.py).
    """
    for i, p in enumerate(points):
        for k in ("label", "energy_j", "loss"):
            if k not in p:
                raise ValueError(f"points[{i}]: missing key {k!r} (need label, energy_j, loss)")
        if not (math.isfinite(p["energy_j"]) and math.isfinite(p["loss"])):
            raise ValueError(f"points[{i}]: energy_j and loss must be finite")
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    pts = sorted(points, key=lambda p: (p["energy_j"], p["loss"]))
    front, best = [], math.inf
    for p in pts:
        if p["loss"] < best:
            front.append(p)
            best = p["loss"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.scatter([p["energy_j"] * 1e3 for p in pts], [p["loss"] for p in pts], color="gray")
    ax.plot([p["energy_j"] * 1e3 for p in front], [p["loss"] for p in front], "o-",
            color="tab:red", label="Pareto front")
    for p in pts:
        ax.annotate(p["label"], (p["energy_j"] * 1e3, p["loss"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("RNG energy per step (mJ)")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
