"""The report of bench_scale.py: its table, a log-log plot, the planner's error per size, and
the largest model each method fine-tunes on this machine.

    python benchmarks/bench_scale.py --report [--budget-gib 22]

"Fits" means a peak at most ``--budget-gib`` (default 22: this 24 GiB machine shows 23.4 GiB
to processes, and the kernel, page cache and services keep ~1.4 GiB). The largest model per
method comes from the measured rows (the largest size measured under the budget) and from the
planner along the family (135M ... 7B measured shapes, 8B, 13B and 30B priced only): the
largest family member predicted to fit, and the parameter count where the predicted peak meets
the budget (linear between the two family members around it; peak is ~linear in parameters).
"""

from __future__ import annotations

import csv
from pathlib import Path

import _common as C
import bench_scale as B

GIB = 2**30
METHOD_ORDER = ("inference", *B.ZO, "lora-adam", "adam8bit", "adam")
FAMILY = (*B.SIZES, *B.PLANNED_ONLY)


def latest_rows(path: Path) -> list[dict]:
    """The newest row per (size, dtype, method), in family and method order."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    last = {(r["size"], r["dtype"], r["method"]): r for r in rows}
    order = {s: i for i, s in enumerate(FAMILY)}
    return sorted(last.values(), key=lambda r: (order.get(r["size"], 99), r["dtype"] != "float32",
                                                METHOD_ORDER.index(r["method"])
                                                if r["method"] in METHOD_ORDER else 99))


def family_params() -> dict[str, int]:
    from zoengine.sparsity.memory import ModelShape

    return {s: ModelShape.of(B.llama_config(s)).params for s in FAMILY}


def largest(method: str, dtype: str, rows: list[dict], budget: float, batch: int,
            seq: int) -> dict:
    """Largest measured size under ``budget`` and the planner's bound for (method, dtype)."""
    params = family_params()
    measured = [r for r in rows if r["method"] == method and r["dtype"] == dtype
                and r.get("peak_gib") and float(r["peak_gib"]) * GIB <= budget]
    pred = [(params[s], B.predicted_bytes(s, method, dtype, batch, seq)) for s in FAMILY]
    fit = [p for p in pred if p[1] <= budget]
    bound = None
    if fit and len(fit) < len(pred):
        (n0, b0), (n1, b1) = fit[-1], pred[len(fit)]
        bound = n0 + (budget - b0) * (n1 - n0) / (b1 - b0)
    elif fit:
        bound = float("inf")
    return {"method": method, "dtype": dtype,
            "measured": measured[-1]["size"] if measured else "none",
            "measured_peak_gib": float(measured[-1]["peak_gib"]) if measured else None,
            "planned": FAMILY[len(fit) - 1] if fit else "none",
            "bound_params": bound}


def plot(rows: list[dict], path: Path, budget: float, batch: int, seq: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = family_params()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"inference": "k", "mezo": "tab:blue", "dizo": "tab:cyan", "lora-adam": "tab:green",
              "adam": "tab:red", "adam8bit": "tab:orange"}
    for (method, dtype), color in [((m, d), c) for m, c in colors.items()
                                   for d in ("float32", "bfloat16")]:
        ls = "-" if dtype == "float32" else "--"
        label = f"{method} {'fp32' if dtype == 'float32' else 'bf16'}"
        got = [(params[r["size"]], float(r["peak_gib"])) for r in rows
               if r["method"] == method and r["dtype"] == dtype and r.get("peak_gib")]
        pred = [(params[s], B.predicted_bytes(s, method, dtype, batch, seq) / GIB)
                for s in FAMILY]
        ax1.plot(*zip(*pred), color=color, linestyle=ls, alpha=0.35, linewidth=1)
        if got:
            ax1.plot(*zip(*got), color=color, linestyle=ls, marker="o", label=label)
        ratio = [(params[r["size"]], float(r["step_over_two_forwards"])) for r in rows
                 if r["method"] == method and r["dtype"] == dtype and method != "inference"
                 and r.get("step_over_two_forwards")]
        if ratio:
            ax2.plot(*zip(*ratio), color=color, linestyle=ls, marker="o", label=label)
    ax1.axhline(budget / GIB, color="gray", linestyle=":")
    ax1.text(params["135m"], budget / GIB * 1.08, f"this machine ({budget / GIB:.0f} GiB usable)")
    ax1.set(xscale="log", yscale="log", xlabel="parameters", ylabel="peak memory (GiB)",
            title=f"peak RSS, batch {batch} x {seq} tokens (dots: measured, faint: planner)")
    ax2.set(xscale="log", yscale="log", xlabel="parameters",
            ylabel="step time / two forwards", title="step cost in forwards (1 thread)")
    from matplotlib.ticker import FormatStrFormatter

    ax2.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax2.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


COMPACT = [("inference", "float32"), ("mezo", "float32"), ("mezo", "bfloat16"),
           ("dizo", "float32"), ("lora-adam", "float32"), ("adam8bit", "float32"),
           ("adam", "float32"), ("adam", "bfloat16")]


def compact_table(rows: list[dict]) -> str:
    """One line per size: peak GiB per (method, dtype) ("-" not run, "> 21" did not fit, with
    the prediction), MeZO's planner error and step cost (README's table)."""
    by = {(r["size"], r["method"], r["dtype"]): r for r in rows}
    params = family_params()
    out = []
    for size in B.SIZES:
        line = {"size": size, "params": f"{params[size] / 1e9:.2f}B"}
        for m, d in COMPACT:
            r = by.get((size, m, d))
            if r is None:
                cell = "–"
            elif r.get("peak_gib"):
                cell = f"{float(r['peak_gib']):.2f}"
            else:
                cell = f"no fit ({float(r['predicted_gib']):.0f})"
            line[f"{m}/{d}"] = cell
        mezo = next((r for d in ("float32", "bfloat16") if (r := by.get((size, "mezo", d)))
                     and r.get("peak_gib")), {})
        line["err"] = f"{float(mezo['planner_error']):+.1%}" if mezo.get("planner_error") else ""
        line["ratio"] = mezo.get("step_over_two_forwards", "")
        out.append(line)
    short = {"float32": "fp32", "bfloat16": "bf16"}
    return C.markdown_table(out, [("size", "size"), ("params", "params")]
                            + [(f"{m}/{d}", f"{m} {short[d]}") for m, d in COMPACT]
                            + [("err", "planner error (MeZO)"),
                               ("ratio", "MeZO step ÷ 2 fwd")])


def _bound(b) -> str:
    if b is None:
        return "none"
    return "beyond 30B" if b == float("inf") else f"~{b / 1e9:.1f}B"


def report(path: Path, budget_gib: float = 22.0) -> int:
    rows = latest_rows(path)
    batch, seq = int(rows[0]["batch"]), int(rows[0]["seq"])
    budget = budget_gib * GIB
    params = family_params()
    for r in rows:
        r["params_b"] = params[r["size"]] / 1e9
    print(C.markdown_table(rows, [
        ("size", "size"), ("params_b", "params (B)"), ("dtype", "dtype"), ("method", "method"),
        ("peak_gib", "peak GiB"), ("predicted_gib", "planner GiB"),
        ("planner_error", "planner error"), ("step_over_two_forwards", "step / 2 fwd"),
        ("status", "status")]))
    print("\npeak GiB (planner's prediction where it did not fit):\n")
    print(compact_table(rows))
    plot(rows, C.RESULTS / "bench_scale.png", budget, batch, seq)
    print(f"\nwrote {C.RESULTS / 'bench_scale.png'}\n")
    out = [largest(m, d, rows, budget, batch, seq) for m in ("mezo", "dizo", "lora-adam",
                                                              "adam8bit", "adam")
           for d in ("float32", "bfloat16")]
    for o in out:
        o["bound"] = _bound(o["bound_params"])
    print(C.markdown_table(out, [("method", "method"), ("dtype", "dtype"),
                                 ("measured", "largest measured"),
                                 ("measured_peak_gib", "its peak GiB"),
                                 ("planned", "largest planned"),
                                 ("bound", "planner's bound")]))
    return 0
