"""ZOOptimizer: the torch.optim contract for zeroth-order methods.

Hyper-parameters live in ``param_groups`` (so LR schedulers work); the run-wide state (master
seed, step counter, last projected gradients) lives in ``self.state["zo"]``, which
``state_dict()`` carries, so a resumed run regenerates the same z.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from zoengine.kernels.dispatch import BACKENDS, get_ops, resolve_backend
from zoengine.kernels.keys import tensor_keys
from zoengine.kernels.philox import DISTRIBUTIONS
from zoengine.optim.functional import ZOGroup
from zoengine.optim.masks import LazyMask, pack_mask

NONFINITE_MODES = ("raise", "skip")


def check_float(name: str, value, *, low: float, strict: bool) -> float:
    """Validate a float hyper-parameter: ``value > low`` (strict) or ``value >= low``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = value == value and value != float("inf") and (value > low if strict else value >= low)
    if not ok:
        rel = ">" if strict else ">="
        raise ValueError(f"{name}={value!r}: must be a finite number {rel} {low}")
    return value


def check_int(name: str, value, *, low: int, high: int | None = None) -> int:
    if (not isinstance(value, int) or isinstance(value, bool) or value < low
            or (high is not None and value >= high)):
        allowed = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name}={value!r}: must be an int {allowed}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: must be one of {tuple(choices)}")
    return value


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: parameter keys, backend choice, closure contract and run state."""

    def __init__(self, params, defaults: dict, *, seed: int, n_samples: int, dist: str,
                 backend: str | None, nonfinite: str, masks=None):
        check_int("seed", seed, low=0, high=1 << 64)
        check_int("n_samples", n_samples, low=1)
        check_choice("dist", dist, DISTRIBUTIONS)
        if backend is not None:
            check_choice("backend", backend, BACKENDS)
        check_choice("nonfinite", nonfinite, NONFINITE_MODES)
        super().__init__(params, defaults)
        self.n_samples = n_samples
        self.dist = dist
        self.backend = backend
        self.nonfinite = nonfinite
        self.state["zo"] = {"seed": seed, "step": 0, "projected_grads": [], "skipped_steps": 0}
        self._key_cache: tuple[tuple, list[list[int]]] | None = None
        self._set_masks(masks)

    # ---- sparsity masks ---------------------------------------------------------------
    def _set_masks(self, masks) -> None:
        """Store a keep-mask per masked tensor as bits in ``self.state[p]["mask_bits"]`` (uint8,
        1/32 of fp32 weights; in state_dict). Masked elements get no perturbation, no update, no
        weight decay: a pruned zero stays exactly zero. ``masks="zeros"`` derives them from the
        weights that are exactly zero now; a dict maps parameters (or their names) to bool
        tensors (``torch.nn.utils.prune``'s float 0/1 ``weight_mask`` works too)."""
        if masks is None:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        if isinstance(masks, str):
            if masks != "zeros":
                raise ValueError(f"masks={masks!r}: must be None, 'zeros' or a dict of "
                                 "parameter (or name) -> bool tensor")
            for p in params:
                if p.requires_grad and bool((p == 0).any()):
                    self.state[p]["mask_bits"] = pack_mask(p.detach() != 0)
            return
        if not isinstance(masks, dict):
            raise ValueError(f"masks={type(masks).__name__}: must be None, 'zeros' or a dict")
        by_name = {}
        for g in self.param_groups:
            for n, p in zip(g.get("param_names", []), g["params"]):
                by_name[n] = p
        by_id = {id(p): p for p in params}
        for k, m in masks.items():
            p = by_name.get(k) if isinstance(k, str) else by_id.get(id(k))
            if p is None:
                raise ValueError(f"masks has an entry for {k if isinstance(k, str) else 'a tensor'}"
                                 " that is not among the optimizer's parameters")
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"masks[{k if isinstance(k, str) else '...'}] has shape "
                                 f"{tuple(m.shape)}; the parameter has {tuple(p.shape)}")
            self.state[p]["mask_bits"] = pack_mask(m.to(device=p.device) != 0)

    def _mask_bits(self, p) -> torch.Tensor | None:
        st = self.state.get(p)
        if not st:
            return None
        if "mask" in st:  # a bool mask from an older state_dict: store it as bits
            st["mask_bits"] = pack_mask(st.pop("mask") != 0)
        bits = st.get("mask_bits")
        if bits is not None and bits.dtype != torch.uint8:
            # Optimizer.load_state_dict casts state tensors to the parameter's float dtype
            # (exact for 0..255): restore the 1-byte storage.
            st["mask_bits"] = bits = bits.to(torch.uint8)
        return bits

    def mask_bytes(self) -> int:
        """Bytes the optimizer holds for sparsity masks (bits: ceil(numel / 8) per tensor)."""
        ps = [p for g in self.param_groups for p in g["params"]]
        return sum(b.numel() for b in (self._mask_bits(p) for p in ps) if b is not None)

    # ---- parameters as the kernels see them -------------------------------------------
    def _group_keys(self) -> list[list[int]]:
        """Stable 32-bit keys per tensor: hashed names when given, else the global position."""
        ident = tuple(tuple(id(p) for p in g["params"]) for g in self.param_groups)
        if self._key_cache is None or self._key_cache[0] != ident:
            named = all("param_names" in g for g in self.param_groups)
            names = ([n for g in self.param_groups for n in g["param_names"]] if named else
                     [f"#{i}" for i in range(sum(len(g["params"]) for g in self.param_groups))])
            flat = tensor_keys(names)
            keys, i = [], 0
            for g in self.param_groups:
                keys.append(flat[i:i + len(g["params"])])
                i += len(g["params"])
            self._key_cache = (ident, keys)
        return self._key_cache[1]

    def zo_groups(self) -> list[ZOGroup]:
        """Trainable tensors per group (``requires_grad=False`` ones are frozen and skipped).

        A masked tensor gets a group of its own whose mask is unpacked from bits only when a
        kernel reads it, so at most one tensor's bool mask exists at a time (order, and hence
        every z, is unchanged: z depends on the tensor key, not on grouping)."""
        out = []
        for group, keys in zip(self.param_groups, self._group_keys()):
            live = [(p, k) for p, k in zip(group["params"], keys) if p.requires_grad]
            hyper = dict(lr=group["lr"], eps=group["eps"],
                         weight_decay=group.get("weight_decay", 0.0))
            run: list = []
            for p, k in live:
                bits = self._mask_bits(p)
                if bits is None:
                    run.append((p, k))
                    continue
                if run:
                    out.append(ZOGroup(params=[q for q, _ in run], keys=[j for _, j in run],
                                       **hyper))
                    run = []
                out.append(ZOGroup(params=[p], keys=[k], masks=LazyMask(bits, p.shape),
                                   **hyper))
            if run:
                out.append(ZOGroup(params=[q for q, _ in run], keys=[j for _, j in run], **hyper))
        return out

    def ops_for(self, groups: list[ZOGroup]):
        tensors = [p for g in groups for p in g.params]
        return get_ops(resolve_backend(self.backend, tensors))

    @staticmethod
    def require_closure(name: str, closure: Callable | None) -> Callable:
        if closure is None or not callable(closure):
            raise TypeError(
                f"{name}.step() needs a closure that returns the loss (got {closure!r}): "
                "zeroth-order methods evaluate the loss at several perturbed points per step, "
                "e.g. opt.step(lambda: model(**batch).loss)")
        return closure

    @property
    def step_count(self) -> int:
        """Steps taken so far (including skipped ones)."""
        return self.state["zo"]["step"]
