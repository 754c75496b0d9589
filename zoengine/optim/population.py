"""One forward, 2n perturbations: the batched evaluation of ``step_batched`` (docs/lowrank.md).

The closure's batch holds G = 2n copies of the step's batch, grouped by perturbation along the
first dimension: rows [j·N/G, (j+1)·N/G) of every tensor whose first dimension is the batch's
(N rows) see θ + c_j·z_{k_j}, with group j = 2k (+ε r_k z_k) or 2k + 1 (−ε r_k z_k). Inside the
forward of a model attached virtually (optim/virtual.py):

- an exact ``nn.Linear`` with low-rank noise computes x·Wᵀ once for all rows and adds each
  group's rank-r term c_j·(x_j·V_s)·U_{k_j}ᵀ to its rows (V is shared by the step's samples,
  so x·V_s is one product for every group); GPT-2's ``Conv1D`` likewise, with c_j·(x_j·U)·V_sᵀ;
- an embedding looks up each group's rows of its own θ + c_j·z;
- every other module that owns a displaced tensor (norms, biases of other modules, Conv1D,
  ``nn.Linear`` subclasses, expert tensors, full-rank noise) runs once per group on that
  group's rows with that group's perturbed copy, and its outputs are concatenated.

While a module runs on one group (``active`` set), everything it calls is evaluated as in a
one-group forward, so nested modules need no rule of their own. A module whose output does not
keep the rows grouped (its first dimension is not the group's), or a read that cannot be split by
group, raises ``BatchedEvaluationError`` instead of mixing groups.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from zoengine.optim.lowrank_noise import is_conv1d, lowrank_reads, term


class BatchedEvaluationError(ValueError):
    """A batched evaluation cannot keep its groups apart on this model; ``opt.step`` (one
    forward per perturbation) still works."""


@dataclass
class Population:
    """The G groups of one batched forward: ``scales[id(tensor)][j]`` is {sample: c} of group
    j; ``active``: the group a module is running on now (None: all of them)."""

    groups: int
    scales: dict[int, list[dict[int, float]]]
    active: int | None = None
    batch: tuple | None = None  # (N rows, T positions) as the forward's first grouped call saw

    @contextmanager
    def one(self, j: int):
        """Group j alone while inside: what a module running on its rows sees."""
        self.active = j
        try:
            yield
        finally:
            self.active = None

    def scales_now(self, i: int) -> dict[int, float]:
        if self.active is None:
            raise BatchedEvaluationError(
                "a displaced tensor was read outside a module forward that can split the "
                "batch by perturbation group (e.g. an embedding with max_norm, or a module "
                "reading another module's weight); use opt.step(closure) for this model")
        return self.scales[i][self.active]


def population_of(virtual, groups, radii: list[float]) -> Population:
    """The groups of a step whose ZOGroups are ``groups`` and whose samples have radii
    ``radii``: group 2k is +r_k·ε, group 2k + 1 is −r_k·ε (the exact values the one-group
    walk leaves in ``displaced``: r·ε + (−2r)·ε = −(r·ε) in floating point)."""
    scales = {}
    for g in groups:
        for p in g.params:
            if id(p) in virtual.displaced:
                scales[id(p)] = [{k: sign * (r * g.eps)}
                                 for k, r in enumerate(radii) for sign in (1.0, -1.0)]
    return Population(2 * len(radii), scales)


@contextmanager
def grouped(virtual, population: Population):
    """Evaluate forwards of ``virtual``'s model with ``population``'s groups: every hooked
    module owning a displaced tensor runs per group (an exact Linear's own override decides)."""
    overrides = []
    for module, pairs in virtual.hooked:
        own = vars(module).get("forward")
        if getattr(own, "func", None) == virtual._linear_forward:
            continue  # an exact nn.Linear: its override handles the groups (grouped_linear)
        mine = tuple(pa for pa in pairs if id(pa[0]._parameters[pa[1]]) in population.scales)
        if mine:
            module.forward = functools.partial(grouped_forward, virtual, module, mine,
                                               module.forward)
            overrides.append((module, own))
    virtual.population = population
    try:
        yield population
    finally:
        virtual.population = None
        for module, own in overrides:  # back to the instance's own forward, if it had one
            if own is None:
                vars(module).pop("forward", None)
            else:
                module.forward = own


def _leading_rows(name: str, pop: Population, args, kwargs) -> int:
    """The first dimension of the first tensor argument, checked against the batch's layout:
    the first grouped call defines it (N rows, T positions: the embedding's ids (N, T)); later
    calls may see N rows, N·T flattened tokens, or 1 (a row broadcast over the batch, e.g.
    GPT-2's position ids). Anything else (Llama4's experts see E·N·T rows, expert-major) would
    split the wrong rows: refused."""
    x = next((t for t in (*args, *kwargs.values())
              if isinstance(t, torch.Tensor) and t.dim() >= 1), None)
    if x is None:
        raise BatchedEvaluationError(f"{name} received no tensor argument to split by "
                                     "perturbation group")
    n = x.shape[0]
    if pop.batch is None:
        if n % pop.groups:
            raise BatchedEvaluationError(
                f"{name} received {n} rows, not a multiple of the {pop.groups} perturbation "
                f"groups: the closure must repeat its batch {pop.groups} times along the "
                "first dimension (zoengine.optim.tile_batch)")
        pop.batch = (n, x.shape[1] if x.dim() >= 2 else None)
        return n
    rows, positions = pop.batch
    if n == 1 or n == rows or (positions is not None and n == rows * positions):
        return n
    raise BatchedEvaluationError(
        f"{name} received a first dimension of {n}, which is neither the batch's {rows} rows"
        + (f" nor its {rows * positions} tokens" if positions else "") + " nor 1: its input "
        "is not laid out by batch row, so its perturbation groups cannot be told apart; use "
        "opt.step(closure) for this model")


def _chunk(x, n: int, j: int, size: int):
    if n > 1 and isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == n:
        return x[j * size:(j + 1) * size]
    return x


def _concat(name: str, outs: list, size: int, expand: int):
    """The groups' outputs along the first dimension; a group's one broadcast row (``expand``
    > 0) becomes its ``expand`` rows of the batch, which is what that row meant."""
    first = outs[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        if first.dim() == 0 or first.shape[0] != size:
            raise BatchedEvaluationError(
                f"{name} returned shape {tuple(first.shape)} for a group of "
                f"{size} rows: its output does not keep the rows grouped, so its groups cannot "
                "be evaluated in one forward; use opt.step(closure) for this model")
        if expand:
            outs = [o.expand(expand, *o.shape[1:]) for o in outs]
        return torch.cat(outs, dim=0)
    if isinstance(first, tuple | list):
        return type(first)(_concat(name, [o[i] for o in outs], size, expand)
                           for i in range(len(first)))
    raise BatchedEvaluationError(f"{name} returned a "
                                 f"{type(first).__name__}; a batched evaluation concatenates "
                                 "tensors (or tuples of them) only")


def _sizes(pop: Population, n: int) -> tuple[int, int]:
    """(rows of a group in this call, rows to expand each group's output to: 0, or the
    batch's rows per group when the call saw one broadcast row)."""
    if n == 1:
        return 1, pop.batch[0] // pop.groups
    return n // pop.groups, 0


def grouped_forward(virtual, module, pairs, forward, *args, **kwargs):
    """``module``'s forward, once per group on that group's rows, with that group's perturbed
    copies of its displaced tensors swapped in (the pre-hook swaps nothing in this mode)."""
    pop = virtual.population
    if pop is None or pop.active is not None:  # nested in a group's run: the hooks did it
        return forward(*args, **kwargs)
    n = _leading_rows(type(module).__name__, pop, args, kwargs)
    (size, expand), outs = _sizes(pop, n), []
    for j in range(pop.groups):
        swapped = [(o, a, o._parameters[a]) for o, a in pairs]
        with pop.one(j):
            try:
                for o, a, p in swapped:
                    o._parameters[a] = virtual.perturbed(p)
                outs.append(forward(*(_chunk(x, n, j, size) for x in args),
                                    **{k: _chunk(x, n, j, size) for k, x in kwargs.items()}))
            finally:
                for o, a, p in swapped:
                    o._parameters[a] = p
    return _concat(type(module).__name__, outs, size, expand)


def grouped_linear(virtual, module, original, x):
    """An exact ``nn.Linear`` or ``Conv1D`` in a batched forward. Low-rank noise on an
    unmasked weight: the product with W (+ b) for all rows at once, then each group's rank-r
    term added to its rows (each row's arithmetic is the one-group forward's; a Linear's x·V_s
    is one product for every group, V being the step's; a displaced bias is added per group
    after the product instead of inside it). Otherwise per group."""
    pop = virtual.population
    w, b = module._parameters["weight"], module._parameters.get("bias")
    pairs = tuple((module, a) for a in ("weight", "bias")
                  if id(module._parameters.get(a)) in pop.scales)
    n = _leading_rows(type(module).__name__, pop, (x,), {}) if pairs else 0
    if id(w) not in pop.scales or n == 1 or not lowrank_reads(virtual, module):
        return grouped_forward(virtual, module, pairs, original, x) if pairs else original(x)
    size = n // pop.groups
    ops, seed, step, _ = virtual.context
    key = virtual.displaced[id(w)].key
    bias_moves = b is not None and id(b) in pop.scales
    conv = is_conv1d(module)
    out = original(x) if not bias_moves else (x @ w if conv else F.linear(x, w))
    xv = None if conv else x @ ops.uv(w, key, seed=seed, step=step, sample=0)[1].to(x.dtype)
    virtual.consumed.add(id(w))
    with virtual.inside():
        for j in range(pop.groups):
            rows = slice(j * size, (j + 1) * size)
            for k, c in pop.scales[id(w)][j].items():
                if conv:  # x·U differs per sample: the one-group term on these rows
                    t = term(ops, module, x[rows], w, key, seed=seed, step=step, sample=k,
                             scale=c)
                else:
                    u = ops.uv(w, key, seed=seed, step=step, sample=k)[0]
                    t = (xv[rows] * c) @ u.to(x.dtype).T
                out[rows] += t.to(out.dtype)
            if bias_moves:
                with pop.one(j):
                    out[rows] += virtual.perturbed(b)
    return out


def grouped_embedding(virtual, p, a: dict, rows_of) -> torch.Tensor:
    """``F.embedding`` arguments ``a`` in a batched forward: each group's ids looked up in its
    own θ + c_j·z (``rows_of(a)``: the one-group lookup, run with that group active)."""
    pop = virtual.population
    ids = a["input"]
    n = _leading_rows("an embedding", pop, (ids,), {})
    (size, expand), outs = _sizes(pop, n), []
    for j in range(pop.groups):
        with pop.one(j):
            outs.append(rows_of({**a, "input": _chunk(ids, n, j, size)}))
    return _concat("an embedding", outs, size, expand)
