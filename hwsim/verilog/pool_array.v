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

// One LUT6 per bit (4 data + 2 select); kept so ABC maps each cell alone.
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

// PeZO pre-generated pool, read n numbers a clock from any start pointer.
module top (input clk, input rst, input start, input [15:0] start_ptr,
            input we, input [11:0] wrow, input [127:0] wdata,
            output [127:0] r);
  localparam NG = 16, W = 8, D = 4096;
  reg [11:0] row;
  reg [3:0] off;
  wire [11:0] row1 = (row == D - 1) ? 0 : row + 1;
  always @(posedge clk)
    if (rst) begin row <= 0; off <= 0; end
    else if (start) begin row <= start_ptr[15:4]; off <= start_ptr[3:0]; end
    else row <= row1;
  reg [3:0] off_q;  // rotation of the words arriving from the banks one clock later
  always @(posedge clk) off_q <= off;
  wire [127:0] q;
  genvar b;
  generate for (b = 0; b < NG; b = b + 1) begin : bank
    (* ram_style = "block" *) reg [W-1:0] mem [0:D-1];
    reg [W-1:0] rd;
    wire [11:0] ra = (b < off) ? row1 : row;
    always @(posedge clk) begin
      if (we) mem[wrow] <= wdata[b*W +: W];
      rd <= mem[ra];
    end
    assign q[b*W +: W] = rd;
  end endgenerate
  rotator #(.NG(NG), .W(W), .LG(4)) rot (.c(off_q), .x(q), .r(r));
endmodule
