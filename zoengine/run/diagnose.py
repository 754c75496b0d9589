"""``zoengine diagnose bias``: how far the two-point estimate is from the gradient, per ε.

Along K random directions u (the noise contract's, drawn by the optimizers' kernels: ``seed``,
step 0, sample k, each tensor's name key) the central difference

    FD(ε, u) = (L(θ + εu) − L(θ − εu)) / (2ε)

is compared with ∇L·u from one backward pass at θ. Its relative bias

    b(ε, u) = |FD(ε, u) − ∇L·u| / ‖∇L‖

is the ε²·D³L[u, u, u]/6 term KerZOO's kernel cancels in expectation (order 3; order 5 also
the ε⁴ term), the higher odd terms, and the rounding of the two losses (~ulp(L)/ε, which
grows as ε shrinks). ‖∇L‖ is the scale of ∇L·u itself: E[(∇L·u)²] = ‖∇L‖² for unit-variance u. θ is restored from an exact copy after every
evaluation, so the model is left bit for bit as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from zoengine.kernels.dispatch import get_ops, resolve_backend
from zoengine.kernels.keys import tensor_keys
from zoengine.noise import DISTRIBUTIONS

SUMMARY_COLUMNS = ("eps", "directions", "rel_bias_mean", "rel_bias_sd", "rel_bias_max",
                   "grad_norm")


def _check(eps_list, directions, dist) -> list[float]:
    eps = list(eps_list) if isinstance(eps_list, (list, tuple)) else None
    if not eps or not all(isinstance(e, (int, float)) and not isinstance(e, bool)
                          and math.isfinite(e) and e > 0 for e in eps):
        raise ValueError(f"eps_list={eps_list!r}: must be a non-empty list of finite numbers > 0")
    if not isinstance(directions, int) or isinstance(directions, bool) or directions < 1:
        raise ValueError(f"directions={directions!r}: must be an int >= 1")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist={dist!r}: must be one of {DISTRIBUTIONS}")
    return [float(e) for e in eps]


def _gradient(loss_fn: Callable, params: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.enable_grad():
        loss = loss_fn()
        return list(torch.autograd.grad(loss, params, allow_unused=True))


@torch.no_grad()
def _central_difference(loss_fn, params, theta0, us, eps: float) -> float:
    """(L(θ + εu) − L(θ − εu))/(2ε) in float64 from the two losses; θ copied back exactly."""
    losses = []
    for sign in (1.0, -1.0):
        for p, t, u in zip(params, theta0, us):
            p.copy_(t + (sign * eps) * u)
        losses.append(float(loss_fn()))
    for p, t in zip(params, theta0):
        p.copy_(t)
    return (losses[0] - losses[1]) / (2.0 * eps)


def directional_bias(loss_fn: Callable[[], torch.Tensor], named_params: Sequence,
                     eps_list: Sequence[float], *, directions: int = 8, seed: int = 0,
                     dist: str = "normal", progress: bool = False) -> dict:
    """Measure the central difference against ∇L·u (module docstring).

    ``loss_fn()`` returns the loss at the current values of ``named_params`` ((name,
    tensor) pairs, the tensors requiring grad). Returns ``{"grad_norm", "rows", "summary"}``:
    ``rows`` one dict per (ε, direction) with ``eps``, ``direction``, ``fd``, ``grad_dot_u``,
    ``rel_bias``; ``summary`` one dict per ε with ``SUMMARY_COLUMNS`` (sd over directions,
    ddof 1; 0 for one direction). Costs one backward and 2·K·len(eps_list) forwards; holds a
    copy of θ, the gradient and one direction (3× the measured weights).
    """
    eps = _check(eps_list, directions, dist)
    names = [n for n, _ in named_params]
    params = [p for _, p in named_params]
    if not params:
        raise ValueError("named_params: empty; nothing to measure")
    grads = [torch.zeros_like(p) if g is None else g.detach()
             for p, g in zip(params, _gradient(loss_fn, params))]
    grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    theta0 = [p.detach().clone() for p in params]
    keys = tensor_keys(names)
    ops = get_ops(resolve_backend(None, params))  # the optimizers' kernels draw u: fast, same u
    rows = []
    from tqdm.auto import tqdm

    bar = tqdm(total=directions * len(eps), desc="bias", unit="eval pair",
               disable=not progress, dynamic_ncols=True)
    for k in range(directions):
        us = [torch.zeros_like(t) for t in theta0]
        ops.perturb_(us, keys, seed=seed, step=0, sample=k, scale=1.0, dist=dist)  # u = 0 + z
        dot = sum(float((g.double() * u.double()).sum()) for g, u in zip(grads, us))
        for e in eps:
            fd = _central_difference(loss_fn, params, theta0, us, e)
            rows.append({"eps": e, "direction": k, "fd": fd, "grad_dot_u": dot,
                         "rel_bias": abs(fd - dot) / grad_norm if grad_norm > 0 else math.inf})
            bar.update(1)
    bar.close()
    return {"grad_norm": grad_norm, "rows": rows, "summary": summarise(rows, eps, grad_norm)}


def summarise(rows: list[dict], eps: list[float], grad_norm: float) -> list[dict]:
    """Mean, sd (ddof 1) and max of the relative bias over the directions, per ε."""
    out = []
    for e in eps:
        b = [r["rel_bias"] for r in rows if r["eps"] == e]
        mean = sum(b) / len(b)
        sd = math.sqrt(sum((x - mean) ** 2 for x in b) / (len(b) - 1)) if len(b) > 1 else 0.0
        out.append({"eps": e, "directions": len(b), "rel_bias_mean": mean, "rel_bias_sd": sd,
                    "rel_bias_max": max(b), "grad_norm": grad_norm})
    return out


def format_table(summary: list[dict]) -> str:
    """The summary as an aligned text table, one line per ε."""
    head = f"{'eps':>10}  {'directions':>10}  {'rel. bias mean':>14}  {'sd':>10}  {'max':>10}"
    lines = [head]
    for s in summary:
        lines.append(f"{s['eps']:>10.3g}  {s['directions']:>10d}  {s['rel_bias_mean']:>14.4g}  "
                     f"{s['rel_bias_sd']:>10.3g}  {s['rel_bias_max']:>10.3g}")
    return "\n".join(lines)


def write_csv(path: str, summary: list[dict]) -> None:
    """The summary as CSV (``SUMMARY_COLUMNS``; floats with 17 significant digits)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        for s in summary:
            w.writerow([repr(s[c]) if isinstance(s[c], float) else s[c]
                        for c in SUMMARY_COLUMNS])


def task_loss(*, model: str, task: str, batch_size: int, seed: int, dtype: str = "float32",
              max_length: int = 128, block_size: int = 128, template=None,
              options=None, log=print):
    """(loss closure on one training batch of ``task``, the model's named parameters): the
    loss ``zoengine train --train full --seed seed`` optimises, on the batch of its step 0."""
    from zoengine.optim.batches import batch_rng
    from zoengine.run.config import RunConfig
    from zoengine.run.job import resolve
    from zoengine.run.resources import load_model
    from zoengine.run.strategies import make_strategy

    cfg = RunConfig(model=model, task=task, train="full", batch_size=batch_size, seed=seed,
                    max_length=max_length, block_size=block_size, template=template,
                    options=options, eval_limit=1)
    cfg, t = resolve(cfg)
    log(f"loading model {model} ({dtype}) ...")
    net, tok = load_model(model, dtype, log=log)
    net.eval()
    strategy = make_strategy(cfg, t, net, tok, log=log)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    return strategy.batch_closure(batch_rng(seed, 0)), named


def run_bias(*, output: str | None = None, eps_list, directions: int, seed: int,
             dist: str = "normal", progress: bool = True, log=print, **task_kw) -> dict:
    """``zoengine diagnose bias``: load, measure, print the table, write the CSV."""
    loss_fn, named = task_loss(seed=seed, log=log, **task_kw)
    numel = sum(p.numel() for _, p in named)
    log(f"measuring {directions} directions x {len(eps_list)} eps on {numel:,} parameters "
        f"({2 * directions * len(eps_list)} forwards, 1 backward)")
    res = directional_bias(loss_fn, named, eps_list, directions=directions, seed=seed,
                           dist=dist, progress=progress)
    log(f"|grad L| = {res['grad_norm']:.6g}; relative bias |FD - grad L.u| / |grad L|:")
    log(format_table(res["summary"]))
    if output is not None:
        write_csv(output, res["summary"])
        log(f"wrote {output}")
    return res
