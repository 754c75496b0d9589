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

// CLT (Irwin-Hall) Gaussian: sum of K uniform W-bit words from one leaping LFSR.
module top (input clk, input rst, output reg [9:0] q);
  localparam K = 4, W = 8;
  wire [K*W-1:0] u;
  lfsr_leap #(.N(64), .W(K*W)) g (.clk(clk), .rst(rst), .q(u));
  integer i;
  reg [9:0] acc;
  always @* begin acc = 0; for (i = 0; i < K; i = i + 1) acc = acc + u[i*W +: W]; end
  always @(posedge clk) q <= acc;   // offset and scale folded downstream
endmodule
