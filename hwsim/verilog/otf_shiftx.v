// Fibonacci XNOR LFSR (taps from Xilinx XAPP052), advanced W bit-steps per clock.
module lfsr_leap #(parameter N = 64, parameter W = 8) (input clk, input rst, output [W-1:0] q);
  reg [N-1:0] s;
  function [N-1:0] step1(input [N-1:0] x);
    reg fb;
    begin
      case (N)
      32: fb = ~(x[31] ^ x[21] ^ x[1] ^ x[0]);
      64: fb = ~(x[63] ^ x[62] ^ x[60] ^ x[59]);
      128: fb = ~(x[127] ^ x[125] ^ x[100] ^ x[98]);
      default: fb = ~(x[N-1] ^ x[N-2]);
      endcase
      step1 = {x[N-2:0], fb};
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
  always @(posedge clk) if (rst) s <= {N{1'b0}}; else s <= stepw(s);
  assign q = s[W-1:0];
endmodule

// On-the-fly reuse with a part-select rotator: Yosys builds n*W*ceil(log2 n) 2:1 muxes
// ($shiftx), which ABC9 then packs into LUTs with its own heuristics.
module top (input clk, input rst, output [127:0] r);
  wire [127:0] x;
  genvar j;
  generate for (j = 0; j < 16; j = j + 1) begin : gen
    lfsr_leap #(.N(64), .W(8)) g (.clk(clk), .rst(rst), .q(x[j*8 +: 8]));
  end endgenerate
  reg [3:0] c;
  always @(posedge clk) if (rst || c == 15) c <= 0; else c <= c + 1;
  wire [255:0] xx = {x, x};
  assign r = xx[c*8 +: 128];
endmodule
