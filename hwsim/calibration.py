"""How close the model comes to PeZO's published deltas (arXiv:2504.20314 abstract):
-48.6 % LUT and -12.7 % FF "for random number generation", power saved "at maximum 86 %".

PeZO's hardware section (part, baseline Gaussian design, widths, clock, instance counts) was
not available to the dossier (research/hwsim.md §1.2), so we do not fit anything: we price a
fixed set of plausible baseline/PeZO pairs with the unmodified coefficients and report each
pair's deltas and which pair comes closest.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoengine.hwsim.estimate import estimate
from zoengine.hwsim.workload import Workload

__all__ = ["PEZO_PUBLISHED", "Comparison", "pezo_comparison"]

PEZO_PUBLISHED = {"lut": -0.486, "ff": -0.127, "power_max": -0.86,
                  "source": "Tan et al., PeZO, arXiv:2504.20314 (abstract), ICCAD 2025"}


@dataclass
class Comparison:
    name: str
    baseline: str
    candidate: str
    d_lut: float
    d_ff: float
    d_power: float
    d_energy: float
    base_lut: float
    base_ff: float
    cand_lut: float
    cand_ff: float
    distance: float  # |dLUT - (-48.6 %)| + |dFF - (-12.7 %)|

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _pairs(d: int, lanes: int, r: int):
    one = dict(d=d, lanes=1, q=1, uses=4)
    arr = dict(d=d, lanes=lanes, q=1, uses=4)
    clt8 = Workload(**one, bits=8, dist="normal", method="clt", clt_k=4, label="CLT-4 8b")
    yield ("1 generator: uniform LFSR 8b vs CLT-4 8b", clt8,
           Workload(**one, bits=8, dist="uniform", label="LFSR uniform 8b"))
    yield ("1 generator: uniform 8b + separate scale (DSP) vs CLT-4 8b", clt8,
           Workload(**one, bits=8, dist="uniform", scale="separate", label="uscale 8b"))
    yield ("1 generator: uniform LFSR 8b vs ICDF 2^8 x 8b",
           Workload(**one, bits=8, dist="normal", method="icdf", icdf_bits=8, label="ICDF m8 8b"),
           Workload(**one, bits=8, dist="uniform", label="LFSR uniform 8b"))
    yield ("1 generator: uniform LFSR 16b vs ICDF 2^10 x 16b (BRAM)",
           Workload(**one, bits=16, dist="normal", method="icdf", icdf_bits=10,
                    label="ICDF m10 16b"),
           Workload(**one, bits=16, dist="uniform", label="LFSR uniform 16b"))
    yield ("1 generator: uniform LFSR 16b vs CLT-4 16b",
           Workload(**one, bits=16, dist="normal", method="clt", clt_k=4, label="CLT-4 16b"),
           Workload(**one, bits=16, dist="uniform", label="LFSR uniform 16b"))
    yield ("1 generator: uniform LFSR 8b vs CLT-12 8b",
           Workload(**one, bits=8, dist="normal", method="clt", clt_k=12, label="CLT-12 8b"),
           Workload(**one, bits=8, dist="uniform", label="LFSR uniform 8b"))
    yield ("1 generator: uniform taus88 8b vs CLT-4 (taus88 source) 8b",
           Workload(**one, bits=8, dist="normal", method="clt", clt_k=4, source="taus88",
                    label="CLT-4 taus88"),
           Workload(**one, bits=8, dist="uniform", source="taus88", label="taus88 uniform"))
    gauss = Workload(**arr, bits=8, dist="normal", method="clt", clt_k=4,
                     label=f"CLT-4 8b x {lanes} lanes")
    yield (f"{lanes} lanes: uniform, no reuse vs CLT-4, no reuse", gauss,
           Workload(**arr, bits=8, dist="uniform", label="uniform no reuse"))
    yield (f"{lanes} lanes: uniform on-the-fly R={r} vs CLT-4, no reuse", gauss,
           Workload(**arr, bits=8, dist="uniform", reuse="on-the-fly", reuse_factor=r,
                    label=f"uniform otf R={r}"))
    yield (f"{lanes} lanes: uniform on-the-fly R={r} vs CLT-4 on-the-fly R={r}",
           Workload(**arr, bits=8, dist="normal", method="clt", reuse="on-the-fly",
                    reuse_factor=r, label=f"CLT-4 otf R={r}"),
           Workload(**arr, bits=8, dist="uniform", reuse="on-the-fly", reuse_factor=r,
                    label=f"uniform otf R={r}"))
    yield (f"{lanes} lanes: uniform 16b on-the-fly R={r} vs ICDF 2^10 x 16b, no reuse",
           Workload(**arr, bits=16, dist="normal", method="icdf", icdf_bits=10,
                    label="ICDF m10 16b"),
           Workload(**arr, bits=16, dist="uniform", reuse="on-the-fly", reuse_factor=r,
                    label=f"uniform 16b otf R={r}"))


def pezo_comparison(platform: str = "fpga-xc7", *, d: int = 1_300_000_000, lanes: int = 256,
                    reuse_factor: int = 16) -> list[Comparison]:
    """Price each baseline/PeZO-like pair; sorted by distance to (-48.6 % LUT, -12.7 % FF)."""
    out = []
    for name, b, c in _pairs(d, lanes, reuse_factor):
        eb, ec = estimate(b, platform), estimate(c, platform)
        if eb.kind == "asic":  # no LUT/FF on an ASIC: compare GE and DFF-free logic
            bl, bf, cl, cf = eb.ge, eb.ge, ec.ge, ec.ge
        else:
            bl, bf, cl, cf = eb.lut, eb.ff, ec.lut, ec.ff
        dl = cl / bl - 1 if bl else 0.0
        df = cf / bf - 1 if bf else 0.0
        out.append(Comparison(name, b.label, c.label, dl, df, ec.p_dyn_w / eb.p_dyn_w - 1,
                              ec.e_step_j / eb.e_step_j - 1, bl, bf, cl, cf,
                              abs(dl - PEZO_PUBLISHED["lut"]) + abs(df - PEZO_PUBLISHED["ff"])))
    return sorted(out, key=lambda x: x.distance)
