"""Per-generator cost rules: what one generator unit (uniform source(s) plus transform) costs.

A unit is priced from the catalogue rows (``zoengine.hwsim.catalogue``) when one matches exactly,
returned with that row's tag; anything computed from a fitted rule is returned with the rule
named in ``interpolated``. The platform constants live in ``zoengine.hwsim.platforms``; both
modules' public names are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from zoengine.hwsim.catalogue import CATALOGUE, DOSSIER, FF_GE, ROWS, TAGS, CatalogueRow, Coef
from zoengine.hwsim.platforms import PLATFORMS, Platform, get_platform

__all__ = [
    "CATALOGUE",
    "COST_SOURCES",
    "Coef",
    "GenCost",
    "PLATFORMS",
    "Platform",
    "TAGS",
    "CatalogueRow",
    "asic_energy_per_cycle_fj",
    "fpga_energy_per_cycle_fj",
    "generator_cost",
    "get_platform",
]

# uniform sources the cost model knows: method -> bits per clock of one instance
COST_SOURCES = ("lfsr", "lutsr", "taus88", "xorshift32", "xoshiro128ss", "philox", "threefry")
_WORD_SOURCES = {
    "taus88": ("taus88-izumi", 32),
    "xorshift32": ("xorshift32", 32),
    "xoshiro128ss": ("xoshiro128pp", 32),
    "philox": ("philox4x32-10", 128),
    "threefry": ("threefry2x32-20", 64),
}


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
        row = ROWS["lutsr-rule"]
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
    row = ROWS[key]
    base = _row_cost(row)
    if source == "taus88":  # Izumi row is FPGA-only; ASIC GE estimated
        base.ge = 3 * ROWS["xorshift32"].ge + 2 * 32 * 2.0
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
    if key in ROWS:
        row, src = ROWS[key], ROWS[f"lfsr64-leap{w}"]
        ge = (ROWS[f"uscale{w}"].ge or 0) - (src.ge or 0)
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


def _word_cost(source: str, dist: str, bits: int) -> GenCost:
    """``uniform`` (W bits a sample) or ``rademacher`` (1 bit a sample) straight from the source."""
    c, spc = source_cost(source, bits if dist == "uniform" else 1)
    c.spc = spc
    if dist == "rademacher":
        c.notes.append("Rademacher: 1 bit per sample")
    return c


def _clt_cost(source: str, bits: int, k: int) -> GenCost:
    """Irwin-Hall CLT-k: the §5 row for an LFSR source, else the source plus the adder-tree rule."""
    row = next((r for r in CATALOGUE if r.method == "clt" and r.width == bits
                and r.param("k") == k), None)
    if source == "lfsr" and row is not None:
        return _row_cost(row)
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
    return c


def _icdf_row_cost(row: CatalogueRow, bits: int, m: int) -> GenCost:
    """An ICDF catalogue row; the -nobram variants take their GE from the BRAM twin."""
    c = _row_cost(row)
    if row.ge is None:  # -nobram variants: take GE from the BRAM twin (ROM as logic)
        twin = next((r for r in CATALOGUE if r.method == "icdf" and r.width == bits
                     and r.param("m") == m and r.ge is not None), None)
        if twin is not None:
            c.ge, c.dff = twin.ge, twin.dff
    c.bram_reads_per_clock = c.bram18 and 1.0
    return c


def _icdf_cost(source: str, bits: int, m: int, use_bram: bool | None) -> GenCost:
    """ICDF ROM of 2^m x W bits: the §5 row for an LFSR source, else the source plus the ROM rule."""
    rom_bits = (1 << m) * (bits - 1)
    bram = use_bram if use_bram is not None else rom_bits > 4096
    row = next((r for r in CATALOGUE if r.method == "icdf" and r.width == bits
                and r.param("m") == m and r.param("rom") == ("bram" if bram else "lut")), None)
    if source == "lfsr" and row is not None:
        return _icdf_row_cost(row, bits, m)
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
    return c


def _boxmuller_cost(bits: int) -> GenCost:
    """The 16-bit literature Box-Muller design, used as-is (it brings its own uniform source)."""
    row = ROWS["boxmuller-alimohammad2008"]
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
    return c


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
        c = _word_cost(source, dist, bits)
    elif dist == "clt":
        c = _clt_cost(source, bits, clt_k)
    elif dist == "icdf":
        c = _icdf_cost(source, bits, icdf_bits, use_bram)
    elif dist == "boxmuller":
        c = _boxmuller_cost(bits)
    else:
        raise ValueError(f"dist={dist!r}: must be uniform, rademacher, clt, icdf or boxmuller")
    if scale == "separate":
        c = c + _scale_cost(bits, use_dsp).times(c.spc)
    elif scale != "folded":
        raise ValueError(f"scale={scale!r}: must be 'folded' or 'separate'")
    return c


# ---- energy of one generator unit per clock on a platform ---------------------------------
def asic_energy_per_cycle_fj(c: GenCost, p: Platform) -> float:
    """E_cycle = e_GE * GE_logic * (alpha/alpha_ref) + e_FF * N_FF (dossier §6.2, §7.3)."""
    return p.c("e_ge_fj") * c.ge_logic * p.c("alpha_rng") + p.c("e_ff_fj") * c.dff


def fpga_energy_per_cycle_fj(c: GenCost, p: Platform, alpha: float | None = None) -> float:
    """alpha*E_LUT*LUT + E_FF*FF + E_DSP*DSP + E_BRAM*reads (dossier §6.1, §7.3)."""
    a = p.c("alpha_rng") if alpha is None else alpha
    return (a * p.c("e_lut_fj") * c.lut + p.c("e_ff_fj") * c.ff + 1000 * p.c("e_dsp_pj") * c.dsp
            + 1000 * p.c("e_bram_pj") * c.bram_reads_per_clock)
