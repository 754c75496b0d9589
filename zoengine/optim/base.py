"""ZOOptimizer: the torch.optim contract for zeroth-order methods.

Hyper-parameters live in ``param_groups`` (so LR schedulers work) and are validated at every
step; the run-wide state (master seed, step counter, last projected gradients) lives in
``self.state["zo"]``, which ``state_dict()`` carries together with the run configuration
(``_run_config()``: n_samples, noise, estimator, ...), so a resumed run regenerates the same z
and a checkpoint of a differently configured optimizer is refused instead of loaded silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from zoengine.kernels.dispatch import BACKENDS, get_ops, resolve_backend
from zoengine.kernels.keys import tensor_keys
from zoengine.kernels.philox import DISTRIBUTIONS
from zoengine.optim.arguments import check_choice, check_float, check_int, check_saved_zo
from zoengine.optim.batches import BatchSource, check_batch_source
from zoengine.optim.exchange import ScalarExchange
from zoengine.optim.functional import ZOGroup
from zoengine.optim.journaling import Journaling
from zoengine.optim.masks import LazyMask, pack_mask

NONFINITE_MODES = ("raise", "skip")
KERNEL_SCRATCH = 4 * 2**20  # the kernels' chunk buffers: a 64 Ki-element chunk x ~6 fp32 temps
_HYPER = (("lr", False), ("eps", True), ("weight_decay", False))  # (name, strictly > 0)
_ABSENT = object()


def _zo_group(run: list, hyper: dict, mask=None) -> ZOGroup:
    """A ZOGroup of (tensor, key, shard offset) triples."""
    offsets = [o for _, _, o in run]
    return ZOGroup(params=[p for p, _, _ in run], keys=[k for _, k, _ in run],
                   masks=None if mask is None else mask,
                   offsets=offsets if any(offsets) else None, **hyper)


class ZOOptimizer(Journaling, torch.optim.Optimizer):
    """Base class: parameter keys, backend choice, closure contract, run state and config."""

    _exchange: ScalarExchange | None = None  # set_distributed
    _masks_spec: str | None = None  # None, "zeros" or "dict": the journal header says which

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
        self.state["zo"] = {"seed": seed, "step": 0, "projected_grads": [],
                            "projected_grads_per_group": [], "skipped_steps": 0}
        self._key_cache: tuple[tuple, list[list[int]]] | None = None
        self._set_masks(masks)

    # ---- parameter groups -------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim`` semantics, plus: finite lr >= 0, eps > 0, weight_decay >= 0; one
        name per tensor in ``param_names``; each tensor once; real (not complex) tensors."""
        where = f"param_groups[{len(self.param_groups)}]"
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, set):
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            param_group["params"] = params
            self._check_new_tensors(where, params, param_group.get("param_names"))
        for name, strict in _HYPER:
            if name in param_group:
                check_float(f"{where}[{name!r}]", param_group[name], low=0.0, strict=strict)
        offsets = param_group.get("shard_offsets")
        if offsets is not None and (len(offsets) != len(param_group.get("params", ())) or any(
                not isinstance(o, int) or isinstance(o, bool) or o < 0 for o in offsets)):
            raise ValueError(f"{where}['shard_offsets']={offsets!r}: must hold one int >= 0 "
                             "per tensor (its first element's index in the full tensor)")
        super().add_param_group(param_group)

    def _check_new_tensors(self, where: str, params: list, names) -> None:
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        if names is not None and len(names) != len(tensors):
            raise ValueError(f"{where}['param_names'] has {len(names)} names for "
                             f"{len(tensors)} tensors: must name every tensor, in order")
        if names is None and tensors and all(isinstance(p, tuple) for p in params):
            names = [p[0] for p in params]  # named_parameters(): torch names them later
        if names is not None:
            self._check_new_names(where, list(names))
        seen = {id(p): f"param_groups[{i}]" for i, g in enumerate(self.param_groups)
                for p in g["params"]}
        for j, p in enumerate(tensors):
            if not isinstance(p, torch.Tensor):
                continue  # torch.optim raises its TypeError
            label = f"{where}['params'][{j}]"
            if id(p) in seen:
                raise ValueError(f"{label} is the same tensor as one in {seen[id(p)]}: each "
                                 "tensor may appear once (it would be perturbed twice)")
            seen[id(p)] = f"{where} (position {j})"
            if p.is_complex():
                raise ValueError(f"{label} has dtype {p.dtype}: must be a real floating-point "
                                 "tensor (ZO noise is real; freeze it or split real/imag)")

    def _check_new_names(self, where: str, names: list) -> None:
        """Each parameter name a non-empty str, once across all groups (a journal, masks and
        DiZO's selection find tensors by name)."""
        taken = {n for g in self.param_groups for n in g.get("param_names", ())}
        for j, n in enumerate(names):
            if not isinstance(n, str) or not n:
                raise ValueError(f"{where}['param_names'][{j}]={n!r}: must be a non-empty str")
            if n in taken:
                raise ValueError(f"{where}['param_names'][{j}]={n!r}: the name appears twice; "
                                 "each tensor needs its own name (journals, masks and DiZO "
                                 "select tensors by name)")
            taken.add(n)

    def _check_group_values(self) -> None:
        """Every group's lr/eps/weight_decay, checked before a step touches the weights (a
        scheduler or a user can set any value in ``param_groups``)."""
        for i, g in enumerate(self.param_groups):
            for name, strict in _HYPER:
                check_float(f"param_groups[{i}][{name!r}]", g.get(name, 0.0), low=0.0,
                            strict=strict)

    # ---- sparsity masks ---------------------------------------------------------------
    def _set_masks(self, masks) -> None:
        """Store a keep-mask per masked tensor as bits in ``self.state[p]["mask_bits"]`` (uint8,
        1/32 of fp32 weights; in state_dict). Masked elements get no perturbation, no update, no
        weight decay: a pruned zero stays exactly zero. ``masks="zeros"`` derives them from the
        weights that are exactly zero now; a dict maps parameters (or their names) to bool
        tensors (``torch.nn.utils.prune``'s float 0/1 ``weight_mask`` works too)."""
        if masks is None:
            return
        self._masks_spec = masks if isinstance(masks, str) else "dict"
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
        by_name = {n: p for g in self.param_groups
                   for n, p in zip(g.get("param_names", []), g["params"])}
        by_id = {id(p): p for p in params}
        for k, m in masks.items():
            label = repr(k) if isinstance(k, str) else "<tensor>"
            p = by_name.get(k) if isinstance(k, str) else by_id.get(id(k))
            if p is None:
                raise ValueError(f"masks[{label}]: not among the optimizer's parameters")
            if not isinstance(m, torch.Tensor):
                raise ValueError(f"masks[{label}]={type(m).__name__}: must be a bool (or 0/1) "
                                 f"tensor of the parameter's shape {tuple(p.shape)}")
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"masks[{label}] has shape {tuple(m.shape)}; the parameter "
                                 f"has {tuple(p.shape)}")
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
        """Trainable tensors per group (``requires_grad=False`` ones are frozen and skipped),
        after checking every group's lr/eps/weight_decay.

        A masked tensor gets a group of its own whose mask is unpacked from bits only when a
        kernel reads it, so at most one tensor's bool mask exists at a time (order, and hence
        every z, is unchanged: z depends on the tensor key, not on grouping)."""
        self._check_group_values()
        out = []
        for index, (group, keys) in enumerate(zip(self.param_groups, self._group_keys())):
            hyper = dict(lr=float(group["lr"]), eps=float(group["eps"]),
                         weight_decay=float(group.get("weight_decay", 0.0)), index=index)
            offs = group.get("shard_offsets") or [0] * len(group["params"])
            run: list = []
            for p, k, o in zip(group["params"], keys, offs):
                if not p.requires_grad:
                    continue
                bits = self._mask_bits(p)
                if bits is None:
                    run.append((p, k, o))
                    continue
                if run:
                    out.append(_zo_group(run, hyper))
                    run = []
                out.append(_zo_group([(p, k, o)], hyper, LazyMask(bits, p.shape)))
            if run:
                out.append(_zo_group(run, hyper))
        return out

    def ops_for(self, groups: list[ZOGroup]):
        tensors = [p for g in groups for p in g.params]
        chosen = resolve_backend(self.backend, tensors)
        if chosen != "reference" and any(g.offsets for g in groups):
            if self.backend not in (None, "auto"):
                raise RuntimeError(f"backend={self.backend!r} cannot run sharded tensors "
                                   "(shard_offsets): only the 'reference' backend generates "
                                   "z from an element offset; use backend=None or 'reference'")
            chosen = "reference"  # auto: the only backend with offsets
        return get_ops(chosen)

    # ---- engine features: attached after construction -----------------------------------
    def set_distributed(self, spec) -> None:
        """Train data-parallel over ``torch.distributed`` (docs/distributed.md): ``spec`` is
        None (one process), True or ``"losses"`` (every rank evaluates every sample on its own
        data; the loss scalars are all-reduced), ``"samples"`` (each rank evaluates n / world
        of a step's samples) or a :class:`~zoengine.optim.exchange.ScalarExchange`. Checks that
        every rank has the same seed, n_samples and step (else the replicas would drift
        apart). Replaces the constructor's deprecated ``distributed=``."""
        ex = ScalarExchange.resolve(spec)
        if ex is not None and ex.mode != "losses" and self.journaling:  # no journal holds a step
            raise ValueError(f"set_distributed({ex.mode!r}) with an open journal: not supported "
                             "yet (each rank evaluates other samples); use 'losses'")
        self._exchange = ex
        if ex is None:
            return
        if ex.mode == "samples" and self.n_samples % ex.world:
            raise ValueError(f"set_distributed('samples') with n_samples={self.n_samples} on "
                             f"{ex.world} ranks: n_samples must be a multiple of the world size")
        ex.check_same({"seed": self.state["zo"]["seed"], "n_samples": self.n_samples,
                       "step": self.state["zo"]["step"]})

    @property
    def distributed(self) -> str | None:
        """The data-parallel mode ("losses", "samples") or None."""
        ex = getattr(self, "_exchange", None)
        return None if ex is None else ex.mode

    def set_batch_source(self, source: BatchSource | None, *,
                         replace: bool = True) -> BatchSource | None:
        """The declared hook through which a front end hands the optimizer fresh batches.

        ``source(step, k)`` returns a loss closure bound to a fresh batch: the ``k``-th batch
        (k = 0, 1, ...) the method asks for after ``step`` optimizer steps. A front end
        (``zoengine.run.loop``, ``ZOTrainer``, ``zoengine.journal``) calls this on every
        optimizer, unconditionally; a method that draws no batches of its own (ZO, MeZO,
        KerZOO, PeZO) ignores it. DiZO's γ search draws its batches from it
        (``zoengine.optim.batches`` has the seeding every front end uses). ``None`` removes
        the source. ``replace=False`` keeps a source the optimizer already has (the user's
        own, e.g. DiZO's ``projection_closure``): front ends pass False so user data wins.
        Returns the source in force before the call (None here), so a caller can restore it.
        """
        check_batch_source(source)
        return None

    def extra_evaluations(self) -> int:
        """Loss evaluations a step may make beyond its 2n two-point ones (0; DiZO: its
        search's): what a journal record must hold room for."""
        return 0

    def projected_count(self) -> int:
        """Tensors whose projection length γ a step may record (0; DiZO: its projected set)."""
        return 0

    def projection_summary(self) -> dict | None:
        """The projections so far, for run reports (None: this method does not project)."""
        return None

    @property
    def batch_source(self) -> BatchSource | None:
        """The source in force (``set_batch_source``); None: this method draws no batches."""
        return None

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

    # ---- hyper-parameters: what rebuilds this optimizer ----------------------------------
    def hyperparameters(self) -> dict:
        """The keyword arguments of this class's constructor that built it (JSON-able; masks
        and the engine features left out): ``zoengine.optim.create(method_name(type(opt)),
        params, **opt.hyperparameters())`` builds the same optimizer, which is how a journal
        replay rebuilds it. lr, eps and weight_decay are the defaults (``self.defaults``), not
        a scheduler's current values. Subclasses extend it in their own constructor's terms."""
        d = self.defaults
        return {"lr": d["lr"], "eps": d["eps"], "weight_decay": d["weight_decay"],
                "seed": self.state["zo"]["seed"], "n_samples": self.n_samples,
                "backend": self.backend, "nonfinite": self.nonfinite}

    # ---- run configuration: travels with the state --------------------------------------
    def _run_config(self) -> dict:
        """The options that shape the trajectory but live on the instance, not in
        ``param_groups``: saved by ``state_dict()`` (``state["zo"]["config"]``) and compared
        by ``load_state_dict()``. Subclasses extend it: ``{**super()._run_config(), ...}``."""
        return {"n_samples": self.n_samples, "dist": self.dist,
                "backend": self.backend or "auto"}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        zo = dict(sd["state"]["zo"])
        zo["config"] = {"class": type(self).__name__, **self._run_config()}
        sd["state"] = {**sd["state"], "zo": zo}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim`` semantics, after checking the saved run configuration against this
        optimizer's: a mismatch raises ``ValueError`` listing every differing option with both
        values; a state_dict without one (older zoengine) loads with a warning."""
        saved = state_dict.get("state", {}).get("zo") if isinstance(state_dict, dict) else None
        if not isinstance(saved, dict):
            raise ValueError("state_dict has no state['zo'] (seed, step, ...): it was not saved "
                             "by a zoengine optimizer")
        saved = dict(saved)
        self._check_config(saved.pop("config", None))
        self._check_saved(saved)
        missing = {k: v for k, v in self.state["zo"].items() if k not in saved}
        if missing and "step" in saved:
            saved = {**missing, **saved}  # keys newer than the checkpoint keep their defaults
        state_dict = {**state_dict, "state": {**state_dict["state"], "zo": saved}}
        super().load_state_dict(state_dict)

    def _check_saved(self, saved: dict) -> None:
        """Refuse a saved run state out of range (a negative step, a seed >= 2^64, ...)
        before any of it is loaded. Subclasses extend it (PeZO's pool)."""
        check_saved_zo(saved)

    def _check_config(self, saved: dict | None) -> None:
        mine = self._run_config()
        if saved is None:
            warnings.warn(f"state_dict has no run configuration (saved by an older zoengine): "
                          f"its {', '.join(mine)} cannot be checked against this "
                          f"{type(self).__name__}'s; loading it as is", UserWarning,
                          stacklevel=3)
            return
        keys = [k for k in dict.fromkeys([*mine, *saved]) if k != "class"]
        bad = [k for k in keys if saved.get(k, _ABSENT) != mine.get(k, _ABSENT)]
        show = lambda cfg, k: repr(cfg[k]) if k in cfg else "(not set)"  # noqa: E731
        if bad:
            diff = "; ".join(f"{k}: saved {show(saved, k)}, this optimizer {show(mine, k)}"
                             for k in bad)
            raise ValueError(
                f"state_dict: saved by {saved.get('class', '?')} with a different run "
                f"configuration than this {type(self).__name__} ({diff}); construct the "
                "optimizer with the saved options to resume from it")

    # ---- accounting ---------------------------------------------------------------------
    @classmethod
    def memory_extras(cls, *, trainable_numel: int = 0, dtype_bytes: int = 4,
                      masked_numel: int = 0, largest_masked: int = 0, **options) -> dict:
        """Persistent bytes beyond the weights, for the memory planner: the kernels' chunk
        buffers, and the mask bits (1/8 byte per masked weight, plus one tensor's 3 bytes per
        weight while unpacked). Subclasses add theirs."""
        out = {"kernels": KERNEL_SCRATCH}
        if masked_numel:
            out["masks"] = (masked_numel + 7) // 8 + 3 * largest_masked
        return out
