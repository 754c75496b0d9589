"""The argument checks of the optimizers: every constructor and attach-call argument is checked
when it is given (a ``ValueError``/``TypeError`` naming the argument, the value and what is
allowed), never at the first ``step()``. tests/test_bad_input.py walks every constructor's
signature with bad values.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from zoengine.optim.deprecations import warn_outside

FSYNC_MODES = ("step", "checkpoint")
_SAMPLED = 1 << 16  # elements of a tensor sampled to estimate the share an ε perturbs


def check_float(name: str, value, *, low: float, strict: bool) -> float:
    """Validate a float hyper-parameter: ``value > low`` (strict) or ``value >= low``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        rel = ">" if strict else ">="
        raise ValueError(f"{name}={value!r}: must be a finite number {rel} {low:g}")
    return value


def check_int(name: str, value, *, low: int, high: int | None = None) -> int:
    if (not isinstance(value, int) or isinstance(value, bool) or value < low
            or (high is not None and value >= high)):
        allowed = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name}={value!r}: must be an int {allowed}")
    return value


def check_choice(name: str, value, choices) -> str:
    try:
        ok = value in choices
    except TypeError:  # an unhashable value
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r}: must be one of {tuple(choices)}")
    return value


def check_journal(path, fsync, meta) -> None:
    """``set_journal(path, fsync=, meta=)``: a file path in an existing folder (not a folder
    itself), fsync ``"step"``, ``"checkpoint"`` or an int k > 0, meta a dict or None."""
    if not isinstance(path, (str, os.PathLike)) or os.fspath(path) in ("", b""):
        raise TypeError(f"journal={path!r}: must be a file path (str or os.PathLike)")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"journal={path!r}: is a folder; must be a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"journal={path!r}: its folder {parent!r} does not exist")
    if not (fsync in FSYNC_MODES or (isinstance(fsync, int) and not isinstance(fsync, bool)
                                     and fsync > 0)):
        raise ValueError(f"journal_fsync={fsync!r}: must be 'step', 'checkpoint' or an int k > 0")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta={type(meta).__name__}: must be a dict of JSON-able fields or None")


def check_eps_floor(where: str, eps: float, params, *, warn: bool = False) -> None:
    """Refuse an ε below the smallest normal number of a trainable tensor's dtype (±ε·z rounds
    away on every weight that is not itself subnormal: the step would never move the weights);
    with ``warn``, warn when ε·|z| is below half an ulp of most of a group's weights (sampled;
    only looked at when ε is below the dtype's machine epsilon)."""
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    for dt in sorted(dtypes, key=str):
        info = torch.finfo(dt)
        if eps < info.tiny:
            raise ValueError(f"{where}={eps!r}: below the smallest normal {dt} ({info.tiny:.3g}): "
                             "θ ± ε·z rounds back to θ, so the weights would never move; must be "
                             f">= {info.tiny:.3g} (in practice 1e-4 .. 1e-2)")
        if warn and eps < info.eps:
            share = _moved_share(eps, [p for p in params if p.dtype == dt], info.eps)
            if share < 0.5:
                warn_outside(f"{where}={eps!r}: ε·z is below half an ulp of {1 - share:.0%} of "
                              f"the {dt} weights (sampled): ±ε·z rounds away on them and they "
                              "never move; raise eps (1e-4 .. 1e-2 in practice)", RuntimeWarning)


def _moved_share(eps: float, params, ulp1: float) -> float:
    """The share of (sampled) weights θ on which ε (|z| = 1) exceeds half an ulp of θ."""
    moved = total = 0
    for p in params:
        flat = p.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        sample = flat[::max(1, flat.numel() // _SAMPLED)].float()
        moved += int((sample.abs() * (ulp1 / 2) < eps).sum())
        total += sample.numel()
    return moved / total if total else 1.0


def check_saved_zo(saved: dict) -> None:
    """The run state of a ``state_dict()``'s ``state['zo']``: step, seed and counters."""
    for name, high in (("step", None), ("seed", 1 << 64), ("skipped_steps", None)):
        if name in saved:
            check_int(f"state_dict['state']['zo'][{name!r}]", saved[name], low=0, high=high)


def check_saved_pool(saved: dict, pool_size: int) -> None:
    """PeZO's pool in a ``state_dict()``: ``pool_size`` finite numbers, a pointer in
    [0, pool_size) and a finite scale > 0."""
    pool = saved.get("pool")
    where = "state_dict['state']['zo']"
    if not (isinstance(pool, torch.Tensor) and pool.dim() == 1 and pool.numel() == pool_size
            and pool.is_floating_point() and bool(torch.isfinite(pool).all())):
        shape = tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__
        raise ValueError(f"{where}['pool']: {shape}: must be {pool_size} finite numbers (this "
                         f"optimizer's pool_size={pool_size})")
    check_int(f"{where}['pool_pointer']", saved.get("pool_pointer"), low=0, high=pool_size)
    check_float(f"{where}['pool_scale']", saved.get("pool_scale"), low=0.0, strict=True)


def check_perturbation_fits(groups, reach_z: float) -> None:
    """Refuse, before touching the weights, an ε whose ±ε·r·z cannot be undone in the
    parameter dtype (``reach_z``: 2·max|r z| of the step's noise). Scans max|θ| only when
    2ε·max|r z| is within 2^-10 of the dtype's largest value (never for sane ε)."""
    for g in groups:
        check_eps_floor(f"param_groups[{g.index}]['eps']", g.eps, g.params)
    for g in groups:
        reach = g.eps * reach_z
        for p in g.params:
            big = torch.finfo(p.dtype).max
            if reach < big * 2.0**-10 or p.numel() == 0:
                continue
            top = float(p.detach().abs().max())
            if math.isfinite(top) and not top + reach < big:
                raise ValueError(
                    f"param_groups[{g.index}]['eps']={g.eps!r}: θ ± ε·z reaches "
                    f"{top + reach:.3g}, beyond the largest {p.dtype} ({big:.3g}), so the "
                    "perturbation could not be undone; the weights were not changed. "
                    "Must keep max|θ| + 2ε·max|z| below it")
