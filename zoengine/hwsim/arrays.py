"""Structural cost model of the lane arrays (rotator, on-the-fly array, banked pool) and its
check against the synthesized table ``zoengine/hwsim/data/synth_rotate_pool.json``.

What Yosys builds (``synth_xilinx -family xc7``, see ``rtl_arrays``), per n lanes of W bits with
lg = ceil(log2 n):

* rotator: lg rotation stages of n*W 2:1 muxes (n*W*lg mux2, the ASIC count). The emitted RTL
  pairs the stages into radix-4 levels, one 4:1 mux per output bit and level, and a 4:1 mux is
  one LUT6 (4 data + 2 select inputs):  LUT = n*W*ceil(lg/2)  (a last 2:1 level is a LUT3).
* on-the-fly array: n LFSR generators (``costs.generator_cost``) + rotator + an lg-bit rotation
  counter (lg FF, one LUT beside the carry chain).
* banked pool (PeZO's pre-generation with the leftover shift: reads start at any pointer):
  number p lives in bank p mod n at row p div n; with ab = ceil(log2(P/n)) row bits,
  bank b > 0 reads row or row + 1 (ab 2:1 muxes, one LUT3 each); the select ``b < off`` fits
  in those LUTs while lg + 2 <= 6 inputs and costs one more LUT per bank beyond that; the
  pointer (row, offset, and the offset delayed to the bank outputs) is ab + 2*lg FF and about
  ab + lg LUT (load muxes next to the carry chain); BRAM18 = n * ceil((P/n) / depth(W)) with
  the RAMB18 aspect ratios 16Kx1 ... 2Kx9, 1Kx18, 512x36 (Xilinx UG473) -- one port per bank.

No coefficient is fitted: every term is a count of cells of the netlist, so the leave-one-out
error equals the plain error (``validate`` computes both anyway).
"""

from __future__ import annotations

import math

__all__ = ["bram18_depth", "format_validation", "otf_array_cost", "pool_array_cost",
           "pool_banked_bram18", "rotator_cost", "validate"]


def _lg(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def rotator_cost(n: int, bits: int) -> dict:
    """LUT6 (radix-4 levels), mux2 (for the ASIC GE) and levels of an n-way W-bit rotator."""
    lg = _lg(n)
    return {"lut": n * bits * math.ceil(lg / 2), "mux2": n * bits * lg, "stages": lg}


def otf_array_cost(n: int, bits: int) -> dict:
    """The emitted ``otf_array``: n LFSR-64 leap-W generators, the rotator and its counter."""
    from zoengine.hwsim.costs import generator_cost  # noqa: PLC0415

    u = generator_cost("lfsr", "uniform", bits)
    rot = rotator_cost(n, bits)
    lg = _lg(n)
    return {"lut": n * u.lut + rot["lut"] + 1, "ff": n * u.ff + lg, "dsp": 0, "bram18": 0}


def bram18_depth(bits: int) -> int:
    """Words of one RAMB18 at port width W (UG473 aspect ratios; 9/18/36 include parity)."""
    for width, depth in ((1, 16384), (2, 8192), (4, 4096), (9, 2048), (18, 1024), (36, 512)):
        if bits <= width:
            return depth
    raise ValueError(f"bits={bits}: must be <= 36 for one RAMB18 port")


def pool_banked_bram18(n: int, bits: int, pool: int) -> int:
    """BRAM18 of n banks holding a pool of ``pool`` numbers, one port per bank."""
    rows = max(2, math.ceil(pool / n))
    return n * math.ceil(rows / bram18_depth(bits))


def pool_array_cost(n: int, bits: int, pool: int) -> dict:
    """The emitted ``pool_array``: rotator + per-bank row select + pointer, and its BRAM18."""
    lg = _lg(n)
    ab = max(1, math.ceil(math.log2(max(2, math.ceil(pool / n)))))
    rot = rotator_cost(n, bits)
    select = (n - 1) * ab + (n if lg + 2 > 6 else 0)
    return {"lut": rot["lut"] + select + ab + lg, "ff": ab + 2 * lg,
            "bram18": pool_banked_bram18(n, bits, pool), "select_lut": select,
            "pointer_bits": ab + lg}


def _model(p: dict, pool: int) -> dict | None:
    if p["design"] == "otf_array":
        return otf_array_cost(p["n"], p["bits"])
    if p["design"] == "pool_array":
        return pool_array_cost(p["n"], p["bits"], p["pool"] or pool)
    return None  # otf_shiftx: ABC9's own packing of the same mux2 network; not modelled


def _shiftx_loo(points: list[dict]) -> list[dict]:
    """For the record: a one-constant fit (LUT = LFSR + rho * n*W*lg mux2) to the unstructured
    rotator, and its leave-one-out error -- what a fitted rule would do on that RTL."""
    pts = [p for p in points if p["design"] == "otf_shiftx"]
    out = []
    for i, p in enumerate(pts):
        rest = [q for j, q in enumerate(pts) if j != i]
        rho = sum((q["lut"] - q["n"] * q["bits"]) / rotator_cost(q["n"], q["bits"])["mux2"]
                  for q in rest) / max(1, len(rest))
        pred = p["n"] * p["bits"] + rho * rotator_cost(p["n"], p["bits"])["mux2"]
        out.append({"bits": p["bits"], "n": p["n"], "lut": p["lut"], "loo_pred": pred,
                    "loo_err": pred / p["lut"] - 1, "rho_all": (p["lut"] - p["n"] * p["bits"])
                    / rotator_cost(p["n"], p["bits"])["mux2"]})
    return out


def validate(table: dict) -> dict:
    """Model vs Yosys for every cached point: rows with LUT/FF/BRAM18 errors, the worst LUT
    error, and the leave-one-out errors (equal, since nothing is fitted)."""
    rows = []
    for p in table["points"]:
        m = _model(p, table.get("pool_size", 65536))
        if m is None:
            continue
        err = {k: (m[k] / p[k] - 1) if p[k] else (0.0 if m[k] == 0 else math.inf)
               for k in ("lut", "ff", "bram18")}
        rows.append({"design": p["design"], "bits": p["bits"], "n": p["n"],
                     "yosys": {k: p[k] for k in ("lut", "ff", "bram18")},
                     "model": {k: m[k] for k in ("lut", "ff", "bram18")},
                     "err": err, "loo_err": dict(err)})
    worst = max(rows, key=lambda r: abs(r["err"]["lut"])) if rows else None
    return {"yosys": table.get("yosys"), "rows": rows, "fitted_constants": 0,
            "max_abs_lut_err": abs(worst["err"]["lut"]) if worst else None,
            "worst": worst, "shiftx": _shiftx_loo(table["points"])}


def format_validation(table: dict) -> str:
    """Markdown table of model vs Yosys (the one in docs/hwsim.md)."""
    v = validate(table)
    lines = [f"Yosys: {v['yosys']}", "",
             "| design | W | n | Yosys LUT / FF / BRAM18 | model LUT / FF / BRAM18 | LUT err | "
             "FF err |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in v["rows"]:
        y, m = r["yosys"], r["model"]
        lines.append(f"| {r['design']} | {r['bits']} | {r['n']} | {y['lut']} / {y['ff']} / "
                     f"{y['bram18']:g} | {m['lut']:g} / {m['ff']:g} / {m['bram18']:g} | "
                     f"{r['err']['lut']:+.1%} | {r['err']['ff']:+.1%} |")
    lines += ["", f"max |LUT error| {v['max_abs_lut_err']:.2%} (fitted constants: 0, so the "
              f"leave-one-out error is the same)", "",
              "| otf_shiftx W | n | Yosys LUT | LUT per mux2 (rho) | one-constant LOO pred | "
              "LOO err |", "| --- | --- | --- | --- | --- | --- |"]
    for s in v["shiftx"]:
        lines.append(f"| {s['bits']} | {s['n']} | {s['lut']} | {s['rho_all']:.3f} | "
                     f"{s['loo_pred']:.0f} | {s['loo_err']:+.1%} |")
    return "\n".join(lines)
