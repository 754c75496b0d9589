"""Target technologies: FPGA families and ASIC nodes with their provenance-tagged energy, area
and capacity constants. (The per-cycle energy of a generator unit on a platform is in
``costs.py``: it needs both, and this module imports nothing but the catalogue.)"""

from __future__ import annotations

from dataclasses import dataclass, field

from zoengine.hwsim.catalogue import DOSSIER, Coef

__all__ = ["PLATFORMS", "Platform", "get_platform"]

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
    "rot_lut_rule": Coef("rotation network n*W*ceil(ceil(log2 n)/2) LUT6 (one 4:1 mux per LUT6, "
                         "radix-4 levels)", 1.0, "LUT per output bit and radix-4 level", "S",
                         "zoengine/hwsim/data/synth_rotate_pool.json (Yosys 0.70, n = 4..256, W = 8, 16)"),
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

