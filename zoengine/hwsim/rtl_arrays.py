"""Verilog for the lane arrays of PeZO's two reuse strategies (used by ``rtl.emit``).

    otf_array    n LFSR generators feeding n lanes through a rotator (on-the-fly reuse: the
                 generator at lane 0 moves to the end every clock).
    pool_array   an n-bank pool read n numbers a clock from any start pointer (PeZO's
                 pre-generation with the leftover numbers shifted to the next perturbation):
                 per-bank row select and the same rotator by ``pointer mod n``.
    otf_shiftx   the first on-the-fly RTL, a ``{x, x}[c*W +: n*W]`` part-select; kept so the
                 synthesized table can show what ABC9 does with an unstructured rotator.

The rotator is a radix-4 logarithmic rotator: level k rotates by ``c[2k+1:2k] * 4^k`` words
with one 4:1 mux per output bit (one LUT6: 4 data + 2 select inputs), and a last 2:1 level when
``log2 n`` is odd. Its mux cells carry ``keep_hierarchy`` so that ABC maps each of them alone
and cannot re-pack the network; ``arrays`` counts exactly these cells.
"""

from __future__ import annotations

import math

__all__ = ["log2_lanes", "otf_array", "otf_shiftx", "pool_array", "rotator_modules"]


def log2_lanes(n: int) -> int:
    """Select bits of an n-way rotation: ceil(log2 n), at least 1."""
    if not 2 <= n <= 1024:
        raise ValueError(f"n={n}: must be in 2..1024")
    return max(1, math.ceil(math.log2(n)))


def rotator_modules() -> str:
    """The kept 4:1 and 2:1 word-mux cells and the radix-4 rotator built from them."""
    return """// One LUT6 per bit (4 data + 2 select); kept so ABC maps each cell alone.
(* keep_hierarchy *)
module rot_mux4 #(parameter W = 8) (input [1:0] s, input [W-1:0] a, b, c, d, output [W-1:0] y);
  assign y = s[1] ? (s[0] ? d : c) : (s[0] ? b : a);
endmodule

(* keep_hierarchy *)
module rot_mux2 #(parameter W = 8) (input s, input [W-1:0] a, b, output [W-1:0] y);
  assign y = s ? b : a;
endmodule

// r[j] = x[(j + c) mod NG] (words of W bits): radix-4 levels, then one radix-2 level if LG odd.
module rotator #(parameter NG = 16, parameter W = 8, parameter LG = 4)
  (input [LG-1:0] c, input [NG*W-1:0] x, output [NG*W-1:0] r);
  localparam NL = LG / 2, ODD = LG % 2;
  wire [(NL+ODD+1)*NG*W-1:0] s;
  assign s[NG*W-1:0] = x;
  genvar k, j;
  generate
    for (k = 0; k < NL; k = k + 1) begin : lev
      for (j = 0; j < NG; j = j + 1) begin : m
        rot_mux4 #(.W(W)) u (.s(c[2*k+1:2*k]),
          .a(s[k*NG*W + ((j            ) % NG)*W +: W]),
          .b(s[k*NG*W + ((j +   (1 << (2*k))) % NG)*W +: W]),
          .c(s[k*NG*W + ((j + 2*(1 << (2*k))) % NG)*W +: W]),
          .d(s[k*NG*W + ((j + 3*(1 << (2*k))) % NG)*W +: W]),
          .y(s[(k+1)*NG*W + j*W +: W]));
      end
    end
    if (ODD) begin : last
      for (j = 0; j < NG; j = j + 1) begin : m
        rot_mux2 #(.W(W)) u (.s(c[LG-1]),
          .a(s[NL*NG*W + (j % NG)*W +: W]),
          .b(s[NL*NG*W + ((j + (1 << (LG-1))) % NG)*W +: W]),
          .y(s[(NL+1)*NG*W + j*W +: W]));
      end
    end
  endgenerate
  assign r = s[(NL+ODD)*NG*W +: NG*W];
endmodule
"""


def _generators(n: int, bits: int) -> str:
    return f"""  wire [{n * bits - 1}:0] x;
  genvar j;
  generate for (j = 0; j < {n}; j = j + 1) begin : gen
    lfsr_leap #(.N(64), .W({bits})) g (.clk(clk), .rst(rst), .q(x[j*{bits} +: {bits}]));
  end endgenerate
"""


def otf_array(bits: int, n: int) -> str:
    """n leaping LFSRs, a rotation counter and the radix-4 rotator."""
    lg = log2_lanes(n)
    return f"""// PeZO on-the-fly reuse: n generators, rotated by one position every clock.
// Lane j of the datapath reads word j of r; r[j] = x[(j + c) mod n].
module top (input clk, input rst, output [{n * bits - 1}:0] r);
{_generators(n, bits)}  reg [{lg - 1}:0] c;
  always @(posedge clk) if (rst || c == {n - 1}) c <= 0; else c <= c + 1;
  rotator #(.NG({n}), .W({bits}), .LG({lg})) rot (.c(c), .x(x), .r(r));
endmodule
"""


def otf_shiftx(bits: int, n: int) -> str:
    """The unstructured part-select rotator (what ``otf_array`` emitted before issue 18)."""
    lg = log2_lanes(n)
    return f"""// On-the-fly reuse with a part-select rotator: Yosys builds n*W*ceil(log2 n) 2:1 muxes
// ($shiftx), which ABC9 then packs into LUTs with its own heuristics.
module top (input clk, input rst, output [{n * bits - 1}:0] r);
{_generators(n, bits)}  reg [{lg - 1}:0] c;
  always @(posedge clk) if (rst || c == {n - 1}) c <= 0; else c <= c + 1;
  wire [{2 * n * bits - 1}:0] xx = {{x, x}};
  assign r = xx[c*{bits} +: {n * bits}];
endmodule
"""


def pool_depth(n: int, pool: int) -> int:
    """Rows of each of the n banks of a pool of ``pool`` numbers (pool rounded up to n rows)."""
    return max(2, math.ceil(pool / n))


def pool_array(bits: int, n: int, pool: int) -> str:
    """n BRAM banks (number p lives in bank p mod n, row p div n), a pointer that advances n
    numbers a clock and can be reloaded (PeZO's leftover shift), per-bank row select and the
    rotator by ``pointer mod n``. The refill (write) port is an input: the generator filling the
    pool is priced separately."""
    lg = log2_lanes(n)
    depth = pool_depth(n, pool)
    ab = max(1, math.ceil(math.log2(depth)))
    return f"""// PeZO pre-generated pool, read n numbers a clock from any start pointer.
module top (input clk, input rst, input start, input [{ab + lg - 1}:0] start_ptr,
            input we, input [{ab - 1}:0] wrow, input [{n * bits - 1}:0] wdata,
            output [{n * bits - 1}:0] r);
  localparam NG = {n}, W = {bits}, D = {depth};
  reg [{ab - 1}:0] row;
  reg [{lg - 1}:0] off;
  wire [{ab - 1}:0] row1 = (row == D - 1) ? 0 : row + 1;
  always @(posedge clk)
    if (rst) begin row <= 0; off <= 0; end
    else if (start) begin row <= start_ptr[{ab + lg - 1}:{lg}]; off <= start_ptr[{lg - 1}:0]; end
    else row <= row1;
  reg [{lg - 1}:0] off_q;  // rotation of the words arriving from the banks one clock later
  always @(posedge clk) off_q <= off;
  wire [{n * bits - 1}:0] q;
  genvar b;
  generate for (b = 0; b < NG; b = b + 1) begin : bank
    (* ram_style = "block" *) reg [W-1:0] mem [0:D-1];
    reg [W-1:0] rd;
    wire [{ab - 1}:0] ra = (b < off) ? row1 : row;
    always @(posedge clk) begin
      if (we) mem[wrow] <= wdata[b*W +: W];
      rd <= mem[ra];
    end
    assign q[b*W +: W] = rd;
  end endgenerate
  rotator #(.NG(NG), .W(W), .LG({lg})) rot (.c(off_q), .x(q), .r(r));
endmodule
"""
