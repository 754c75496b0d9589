"""Price a whole fine-tune from an optimizer's ``rng_budget()``: per step and per run.

    rows = compare_methods("smollm2-135m", "fpga-xc7", steps=20_000)
    print(format_runs(rows))

MeZO (fresh Gaussians: hwsim's CLT-4 from a leaping LFSR, one generator per lane), PeZO pool
(a pool of N uniform numbers generated once, read from any pointer through L banks and a
rotator) and PeZO rotate (``lanes`` uniform LFSR lanes, each number used once, rotated), all
on a datapath of L lanes of W bits at the workload clock. The numbers per step come from
``hwsim.budget.rng_budget`` -- the optimizer's own counting (tests/test_hwsim_budget.py) -- or
from a dumped ``rng_budget()`` dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zoengine.hwsim.budget import MODELS, model_numels, model_shapes, rng_budget
from zoengine.hwsim.estimate import Budget, estimate
from zoengine.hwsim.workload import Workload

__all__ = ["METHODS", "RunCost", "compare_methods", "format_runs", "price_run"]

# name -> ZO options of the optimizer (zoengine's MeZO, PeZO(reuse="pool"), PeZO(reuse="rotate"))
METHODS = {
    "MeZO": dict(noise="normal"),
    "PeZO pool": dict(noise="pool", pool_size=1 << 16, scaling="adaptive"),
    "PeZO rotate": dict(noise="rotate", scaling="adaptive"),
    "MeZO low-rank": dict(noise="lowrank", rank=2, resample_every=50),
}
_TAG_ORDER = "MPSE?"


@dataclass
class RunCost:
    """One configuration: the step budget and the totals of a ``steps``-step run."""

    name: str
    rng: dict  # the optimizer's rng_budget()
    budget: Budget
    steps: int
    e_once_j: float  # pool fill, once per run
    t_once_s: float
    e_run_j: float
    t_run_s: float
    tags: str  # provenance tags of every coefficient used, strongest first
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "rng_budget": self.rng, "steps": self.steps,
                "e_once_j": self.e_once_j, "t_once_s": self.t_once_s, "e_run_j": self.e_run_j,
                "t_run_s": self.t_run_s, "provenance_tags": self.tags,
                "budget": self.budget.to_dict()}


def price_run(name: str, rng: dict, platform: str = "fpga-xc7", steps: int = 20_000,
              **overrides) -> RunCost:
    """Price ``steps`` steps of an optimizer whose ``rng_budget()`` is ``rng``."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an int >= 1")
    w = Workload.from_budget(rng, **{"label": name, **overrides})
    b = estimate(w, platform)
    once = float(rng.get("numbers_generated_once") or 0)
    e_once = once * b.e_gen_per_sample_j
    t_once = once / b.samples_per_s if once else 0.0
    tags = "".join(t for t in _TAG_ORDER if any(c.tag == t for c in b.provenance))
    return RunCost(name, rng, b, steps, e_once, t_once, steps * b.e_step_j + e_once,
                   steps * b.t_step_s + t_once, tags, list(b.notes))


def compare_methods(model: str, platform: str = "fpga-xc7", *, steps: int = 20_000,
                    lanes: int = 256, bits: int = 8, clock_hz: float = 200e6,
                    n_samples: int = 1) -> list[RunCost]:
    """MeZO vs PeZO pool vs PeZO rotate vs low-rank MeZO (LOZO, r = 2, ν = 50) on ``model`` (a name of ``hwsim.budget.MODELS``), every
    design streaming ``lanes`` numbers a clock (the rotate optimizer gets ``lanes`` lanes)."""
    numels = model_numels(model)
    out = []
    for name, opts in METHODS.items():
        extra = {"lanes": lanes} if opts["noise"] == "rotate" else {}
        if opts["noise"] == "lowrank":
            extra["shapes"] = model_shapes(model)
        rng = rng_budget(numels, n_samples=n_samples, method=name, **opts, **extra)
        kw = dict(bits=bits, clock_hz=clock_hz)
        if opts["noise"] != "rotate":
            kw["lanes"] = lanes
        out.append(price_run(name, rng, platform, steps, **kw))
    return out


def _si(x: float, unit: str) -> str:
    for f, p in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""), (1e-3, "m"), (1e-6, "u"),
                 (1e-9, "n"), (1e-12, "p")):
        if abs(x) >= f:
            return f"{x / f:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def _time(s: float) -> str:
    return f"{s / 3600:.3g} h" if s >= 3600 else _si(s, "s")


def format_runs(rows: list[RunCost], model: str | None = None) -> str:
    """A markdown table: per step and per run, with the provenance tags of each row."""
    b0 = rows[0].budget
    w0 = b0.workload
    head = (f"{model} ({MODELS[model]['source']}), " if model in MODELS else "") + \
        f"{b0.platform}, L = {w0['lanes']} lanes of W = {w0['bits']} b at " \
        f"{w0['clock_hz'] / 1e6:g} MHz, {rows[0].steps:,} steps"
    lines = [head, "",
             "| method | N_use / step | N_gen / step | sw Philox blocks / step | generators | "
             "resources | E / step | t / step | E / run | t / run | provenance |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = r.budget
        res = (f"{b.lut:,.0f} LUT, {b.ff:,.0f} FF, {b.bram18:g} BRAM18" if b.kind == "fpga"
               else f"{b.ge:,.0f} GE = {b.area_um2 / 1e6:.3g} mm^2"
               + (f" + {b.sram_bits / 8192:g} KiB SRAM" if b.sram_bits else ""))
        lines.append(
            f"| {r.name} | {b.n_use:.4g} | {b.n_gen:.4g} | "
            f"{r.rng['philox_blocks_per_step']:.4g} | {b.n_generators} | {res} | "
            f"{_si(b.e_step_j, 'J')} | {_si(b.t_step_s, 's')} | {_si(r.e_run_j, 'J')} | "
            f"{_time(r.t_run_s)} | {' '.join(f'[{t}]' for t in r.tags)} |")
    return "\n".join(lines)
