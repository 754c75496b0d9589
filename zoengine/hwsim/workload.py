"""What a ZO training step asks of the random-number hardware.

N_use = d * q * uses numbers are consumed per step (dossier research/hwsim.md §7.1): d parameters
perturbed, q directions (SPSA samples), each z consumed ``uses`` times per direction
(4 for MeZO's seed regeneration, Alg. 1 of arXiv:2305.17333: +eps, -2eps, restore, update;
3 for zoengine's fused restore+update; 2 for a virtual perturbation).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

from zoengine.hwsim.costs import COST_SOURCES

__all__ = ["DISTS", "METHODS", "POOL_READS", "PRESETS", "REUSE", "Workload"]

DISTS = ("normal", "uniform", "rademacher")
METHODS = ("clt", "icdf", "boxmuller")  # Gaussian transforms
REUSE = ("none", "on-the-fly", "pool")
POOL_READS = ("any", "aligned")

# Presets for from_model: PeZO's on-the-fly default R = 16 follows the dossier worked example §7.4.
PRESETS = {
    "mezo": dict(dist="normal", method="clt", reuse="none", uses=4.0),
    "zoengine-mezo": dict(dist="normal", method="clt", reuse="none", uses=3.0),
    "pezo": dict(dist="uniform", reuse="on-the-fly", uses=4.0, reuse_factor=16),
    "pezo-pool": dict(dist="uniform", reuse="pool", uses=4.0, pool_size=65536, refresh_every=None),
}


def _err(field_: str, value, allowed: str) -> ValueError:
    return ValueError(f"Workload.{field_}={value!r}: {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _as_count(name: str, v):
    """Accept ints and integral floats such as 125e6."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return v


def _trainable_count(param_groups) -> int:
    """Trainable entries of an optimizer's ``param_groups``; masked groups (``group["masks"]``)
    count only their unmasked entries."""
    d = 0
    for g in param_groups:
        masks = g.get("masks") or [None] * len(g["params"])
        if len(masks) != len(g["params"]):
            raise ValueError(f"opt.param_groups: {len(masks)} masks for "
                             f"{len(g['params'])} params; must match")
        for p, m in zip(g["params"], masks, strict=True):
            if not getattr(p, "requires_grad", True):
                continue
            d += int(m.sum()) if m is not None else int(p.numel())
    return d


def _spec_fields(spec: str) -> dict:
    """Workload fields of a ``hw:<spec>``: source, bits, dist (and Gaussian method) and reuse."""
    from zoengine.hwsim.specs import parse_spec  # noqa: PLC0415
    sp = parse_spec(spec)
    kw: dict = dict(source=sp.source, bits=sp.bits)
    if sp.dist in ("uniform", "rademacher"):
        kw["dist"] = sp.dist
    else:
        kw["dist"] = "normal"
        kind = "clt" if sp.dist.startswith("clt") else \
            "icdf" if sp.dist.startswith("icdf") else "boxmuller"
        kw["method"] = kind
        if kind == "clt":
            kw["clt_k"] = int(sp.dist[3:])
        if kind == "icdf":
            kw["icdf_bits"] = int(sp.dist[4:])
    if sp.reuse == "otf":
        kw.update(reuse="on-the-fly", lanes=sp.lanes, reuse_factor=sp.lanes // sp.n_generators)
    elif sp.reuse == "pool":
        kw.update(reuse="pool", pool_size=sp.pool_size)
    return kw


def _noise_fields(opt, overrides: dict) -> dict:
    """dist and reuse fields from an optimizer's ``noise`` (``pool``, ``rotate``, ``hw:<spec>``,
    as on ``zoengine.optim.ZO``) or else its ``dist``."""
    dist = getattr(opt, "dist", "normal")
    noise = getattr(opt, "noise", None)  # zoengine.optim.ZO: PeZO's pool / rotating lanes
    if isinstance(noise, str) and noise.startswith("hw:"):  # ZO keeps hw specs in .noise
        dist = noise
    if noise == "pool":
        return dict(dist="uniform", reuse="pool", pool_size=int(opt.pool_size))
    if noise == "rotate":
        n = int(opt.lanes)  # generator lanes n; the datapath keeps L (default 256) lanes
        lanes = overrides.get("lanes", 256)
        lanes = lanes if lanes % n == 0 else n * max(1, lanes // n)
        return dict(dist="uniform", reuse="on-the-fly", lanes=lanes, reuse_factor=lanes // n)
    if isinstance(dist, str) and dist.startswith("hw:"):
        return _spec_fields(dist)
    if dist in DISTS:
        return {"dist": dist}
    raise ValueError(f"opt.dist={dist!r}: must be one of {DISTS} or 'hw:<spec>'")


@dataclass(frozen=True)
class Workload:
    """A ZO workload as the RNG hardware sees it. All fields are validated on creation.

    Attributes:
        d: parameters perturbed per step (after sparsity / LoRA), >= 1.
        q: perturbation directions per step (SPSA samples), >= 1.
        uses: times each z is consumed per direction (4 MeZO, 3 zoengine, 2 virtual), >= 1.
        bits: W, bits per number, 1..32.
        dist: ``normal`` | ``uniform`` | ``rademacher``.
        method: Gaussian transform for ``normal``: ``clt`` | ``icdf`` | ``boxmuller``.
        clt_k: CLT terms (2..64); icdf_bits: ICDF ROM address bits m (2..16).
        source: uniform source, one of ``COST_SOURCES``.
        scale: ``folded`` (0 extra hardware) or ``separate`` (a run-time scale multiply per
            generator, PeZO's adaptive scaling).
        reuse: ``none`` | ``on-the-fly`` | ``pool``.
        reuse_factor: on-the-fly R: n = lanes / R distinct numbers per clock (1..lanes).
        pool_size: P numbers in the pool (``pool``), >= 1.
        refresh_every: pool refresh period in steps (``None`` = generated once per run).
        pool_reads: ``any`` (reads start at any pointer -- PeZO's leftover shift, zoengine's
            per-step pointer: one BRAM bank per lane and a rotator) or ``aligned`` (reads
            start at multiples of L: wide rows, pointer only; the dossier's §7.4 example).
        lanes: L numbers consumed per clock by the perturb/update datapath, >= 1.
        clock_hz: f, > 0 and <= 5e9.
        target_step_s: optional RNG time budget per step (> 0); the estimate reports the lanes
            needed to meet it.
        register_lanes: add W*L output flip-flops.
        double_buffer: pool read and refill overlap (x2 pool memory, no refill stall).
        n_gen_per_step: numbers generated per step as counted by an optimizer's
            ``rng_budget()`` (whole Philox blocks, whole adaptive windows); ``None``: N_use / R.
        label: free text shown in reports.
    """

    d: int
    q: int = 1
    uses: float = 4.0
    bits: int = 8
    dist: str = "normal"
    method: str = "clt"
    clt_k: int = 4
    icdf_bits: int = 10
    source: str = "lfsr"
    scale: str = "folded"
    reuse: str = "none"
    reuse_factor: int = 1
    pool_size: int | None = None
    refresh_every: int | None = None
    pool_reads: str = "any"
    lanes: int = 256
    clock_hz: float = 200e6
    target_step_s: float | None = None
    register_lanes: bool = False
    double_buffer: bool = False
    n_gen_per_step: float | None = None
    label: str = ""

    def __post_init__(self):
        object.__setattr__(self, "d", _as_count("d", self.d))
        if isinstance(self.pool_size, float):
            object.__setattr__(self, "pool_size", _as_count("pool_size", self.pool_size))
        for name, lo, hi in (("d", 1, 1 << 50), ("q", 1, 1 << 20), ("bits", 1, 32),
                             ("clt_k", 2, 64), ("icdf_bits", 2, 16), ("lanes", 1, 1 << 24)):
            v = getattr(self, name)
            if not _is_int(v) or not lo <= v <= hi:
                raise _err(name, v, f"must be an int in [{lo}, {hi}]")
        if not isinstance(self.uses, numbers.Real) or isinstance(self.uses, bool) \
                or not 1 <= self.uses <= 64:
            raise _err("uses", self.uses, "must be a number in [1, 64] "
                       "(4 MeZO, 3 zoengine fused, 2 virtual perturbation)")
        if self.dist not in DISTS:
            raise _err("dist", self.dist, f"must be one of {DISTS}")
        if self.method not in METHODS:
            raise _err("method", self.method, f"must be one of {METHODS}")
        if self.source not in COST_SOURCES:
            raise _err("source", self.source, f"unknown generator; must be one of {COST_SOURCES}")
        if self.scale not in ("folded", "separate"):
            raise _err("scale", self.scale, "must be 'folded' or 'separate'")
        if self.reuse not in REUSE:
            raise _err("reuse", self.reuse, f"must be one of {REUSE}")
        if self.pool_reads not in POOL_READS:
            raise _err("pool_reads", self.pool_reads, f"must be one of {POOL_READS}")
        if not isinstance(self.clock_hz, numbers.Real) or isinstance(self.clock_hz, bool) \
                or not 0 < self.clock_hz <= 5e9:
            raise _err("clock_hz", self.clock_hz, "must be a number in (0, 5e9]")
        if self.target_step_s is not None and (not isinstance(self.target_step_s, numbers.Real)
                                               or not self.target_step_s > 0):
            raise _err("target_step_s", self.target_step_s, "must be a number > 0 or None")
        if self.dist == "normal" and self.method == "icdf" and self.bits < 5:
            raise _err("bits", self.bits, "ICDF needs W in [5, 32]")
        g = self.n_gen_per_step
        if g is not None and (not isinstance(g, numbers.Real) or isinstance(g, bool)
                              or not g >= 0):
            raise _err("n_gen_per_step", g, "must be a number >= 0 or None")
        if self.reuse == "on-the-fly":
            r = self.reuse_factor
            if not _is_int(r) or not 1 <= r <= self.lanes:
                raise _err("reuse_factor", r, f"must be an int in [1, lanes={self.lanes}] "
                           "(n = lanes / R generators feed the lanes)")
            if self.lanes % r:
                raise _err("reuse_factor", r, f"must divide lanes={self.lanes} "
                           "(inconsistent lanes: n = lanes / R must be whole)")
        elif self.reuse_factor != 1:
            raise _err("reuse_factor", self.reuse_factor, "is only used with reuse='on-the-fly'; "
                       "must be 1 otherwise")
        if self.reuse == "pool":
            p = self.pool_size
            if not _is_int(p) or not 1 <= p <= 1 << 40:
                raise _err("pool_size", p, "must be an int in [1, 2**40] with reuse='pool'")
            k = self.refresh_every
            if k is not None and (not _is_int(k) or k < 1):
                raise _err("refresh_every", k, "must be an int >= 1 (steps) or None (once per run)")
        elif self.pool_size is not None or self.refresh_every is not None:
            raise _err("pool_size" if self.pool_size is not None else "refresh_every",
                       self.pool_size if self.pool_size is not None else self.refresh_every,
                       "must be None unless reuse='pool'")

    # ---- derived quantities (dossier §7.1) ------------------------------------------------
    @property
    def n_use(self) -> float:
        """Numbers consumed per step: d * q * uses."""
        return self.d * self.q * self.uses

    @property
    def n_gen(self) -> float:
        """Numbers generated per step (amortised; 0 for a pool generated once per run)."""
        if self.n_gen_per_step is not None:
            return float(self.n_gen_per_step)
        if self.reuse == "none":
            return self.n_use
        if self.reuse == "on-the-fly":
            return self.n_use / self.reuse_factor
        return 0.0 if self.refresh_every is None else self.pool_size / self.refresh_every

    @property
    def n_read(self) -> float:
        """Pool reads per step (every use is a read with reuse='pool')."""
        return self.n_use if self.reuse == "pool" else 0.0

    @property
    def transform(self) -> str:
        return self.method if self.dist == "normal" else self.dist

    def replace(self, **kw) -> Workload:
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, method: str = "mezo", **overrides) -> Workload:
        """From a parameter count (``125e6`` or ``125_000_000``) or any object with
        ``.parameters()`` (trainable tensors counted via ``.numel()`` and ``.requires_grad``).

        method: a preset, one of ``PRESETS`` (``mezo``, ``zoengine-mezo``, ``pezo``,
        ``pezo-pool``); ``overrides`` set any other field.
        """
        if method not in PRESETS:
            raise ValueError(f"method={method!r}: must be one of {tuple(PRESETS)}")
        if hasattr(model, "parameters"):
            d = sum(int(p.numel()) for p in model.parameters()
                    if getattr(p, "requires_grad", True))
        else:
            d = _as_count("model", model)
            if not _is_int(d) or d < 1:
                raise ValueError(f"model={model!r}: must be a positive parameter count or an "
                                 f"object with .parameters()")
        kw = dict(PRESETS[method])
        kw["label"] = method
        kw.update(overrides)
        return cls(d=d, **kw)

    @classmethod
    def from_budget(cls, budget: dict, **overrides) -> Workload:
        """From an optimizer's ``rng_budget()`` dict (or ``hwsim.budget.rng_budget``).

        d, q and uses give N_use = ``numbers_used_per_step`` exactly; N_gen is
        ``numbers_generated_per_step``. noise ``normal``/``uniform``/``rademacher``: fresh
        numbers, no reuse; ``pool``: a pool of ``pool_size`` generated once per run, read from
        any pointer (the stride-advanced pointer); ``rotate``: ``lanes`` generators whose
        numbers are each used once (coordinate i of block c from lane (i + c) mod n), so the
        datapath takes L = lanes numbers a clock with R = 1.
        """
        d, q = int(budget["d"]), int(budget["n_samples"])
        if d < 1:
            raise ValueError("budget['d']: no trainable parameters; must be >= 1")
        noise = budget["noise"]
        kw: dict = dict(q=q, uses=budget["stream_passes_per_step"] / q,
                        n_gen_per_step=float(budget["numbers_generated_per_step"]),
                        label=f"{budget.get('method', 'ZO')} {noise}")
        if noise in DISTS:
            kw["dist"] = noise
        elif noise == "lowrank":  # normal factors U, V (and full-rank normals on 1-D tensors)
            kw["dist"] = "normal"
        elif noise == "pool":
            kw.update(dist="uniform", reuse="pool", pool_size=int(budget["pool_size"]),
                      pool_reads="any")
        elif noise == "rotate":
            kw.update(dist="uniform", reuse="on-the-fly", lanes=int(budget["lanes"]),
                      reuse_factor=1)
        elif isinstance(noise, str) and noise.startswith("hw:"):
            kw.update(_spec_fields(noise))
            kw["n_gen_per_step"] = None  # the spec's reuse decides N_gen
        else:
            raise ValueError(f"budget['noise']={noise!r}: must be one of {DISTS}, 'pool', "
                             f"'rotate', 'lowrank' or 'hw:<spec>'")
        kw.update(overrides)
        return cls(d=d, **kw)

    @classmethod
    def from_optimizer(cls, opt, **overrides) -> Workload:
        """From a zoengine optimizer: its ``rng_budget()`` when it has one (``from_budget``),
        else duck-typed ``param_groups``, ``n_samples``, ``dist`` / ``noise``.

        Without a budget, zoengine's MeZO step is taken to generate z 3 times for its last
        sample (+eps, -2eps, fused restore+update) and 4 times for the others, i.e. 4q - 1
        passes a step: ``uses = (4q - 1) / q``. Masked groups (``group["masks"]``) count only
        the unmasked entries. A ``dist`` of ``"hw:<spec>"`` sets source, bits, dist and reuse.
        """
        budget = opt.rng_budget() if callable(getattr(opt, "rng_budget", None)) else None
        noise = getattr(opt, "noise", None)
        if budget and "stream_passes_per_step" in budget and budget.get("noise") == noise:
            return cls.from_budget(budget, **overrides)
        d = int(budget["d"]) if budget else _trainable_count(opt.param_groups)
        if d < 1:
            raise ValueError("opt: no trainable parameters (requires_grad=True) in param_groups")
        q = int(getattr(opt, "n_samples", 1))
        kw: dict = dict(q=q, uses=(4 * q - 1) / q, label=type(opt).__name__)
        kw.update(_noise_fields(opt, overrides))
        kw.update(overrides)
        return cls(d=d, **kw)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
