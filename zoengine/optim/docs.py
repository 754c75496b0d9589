"""Docstring fragments shared by the optimizer classes, written once.

A class docstring names the shared ``Args`` entries it takes with a marker line
``{args: lr eps seed ...}``; :func:`shared_docs` replaces the marker by the fragments, indented
as the marker is. (A marker, not ``str.format``: the docstrings' LaTeX is full of braces.)
"""

from __future__ import annotations

import re
import textwrap

ARGS = {
    "params": """
params: ``model.parameters()``, ``model.named_parameters()`` (names make z independent of
    parameter order; DiZO needs them) or a list of param-group dicts. Tensors with
    ``requires_grad=False`` are frozen: never perturbed, never updated.""",
    "lr": """
lr (float): learning rate η (default 1e-6, MeZO's full-parameter setting).""",
    "eps": """
eps (float): perturbation scale ε (default 1e-3).""",
    "weight_decay": """
weight_decay (float): L2 term λ added to the update, as in MeZO's code (default 0). MeZO's
    large-model code skips biases and norms: put them in a group with ``weight_decay=0``.""",
    "noise": """
noise (str): ``"normal"``, ``"uniform"``, ``"rademacher"`` (fresh numbers from the noise
    contract), ``"pool"`` (PeZO pre-generated pool), ``"rotate"`` (PeZO lanes) or
    ``"hw:<spec>"`` (a bit-accurate hardware generator from ``zoengine.hwsim``, e.g.
    ``"hw:lfsr32-uniform"``: training and hardware cost on the same numbers) or
    ``"lowrank"`` (LOZO: z = U·Vᵀ/√r on every 2-D tensor, normal full-rank z on the others;
    docs/lowrank.md).""",
    "rank": """
rank (int): r of ``noise="lowrank"``, >= 1 (default 1, LOZO's script).""",
    "resample_every": """
resample_every (int): ν of ``noise="lowrank"``: V is redrawn every ν steps, U every step
    (default 100, LOZO's script), >= 1.""",
    "estimator": """
estimator (str): ``"spsa"`` (MeZO) or ``"kernel"`` (KerZOO).""",
    "kernel_order": """
kernel_order (int, optional): 1, 3 or 5 (kernel estimator), or None for r ≡ 1, K ≡ 1
    (exactly SPSA).""",
    "r_range": """
r_range (float): a of r ~ U(-a, a) (kernel estimator; the paper form is 1).""",
    "clip": """
clip (float, optional): clip |g_k| to this value (None: no clipping).""",
    "pool_size": """
pool_size (int): N, numbers in the pool (``noise="pool"``); the pointer advances by the
    smallest stride >= d coprime with N, so N perturbations start at N distinct offsets.""",
    "lanes": """
lanes (int): number of generator lanes (``noise="rotate"``).""",
    "scaling": """
scaling (str): ``"adaptive"`` (1/RMS of the numbers used) or ``"static"`` (√3), for the
    pool and rotate sources.""",
    "dist": """
dist (str): ``"normal"`` (the paper), ``"uniform"`` or ``"rademacher"``, all unit variance.""",
    "seed": """
seed (int): master seed of the noise (default 0); every z is a pure function of (seed,
    step, sample, tensor key, element index).""",
    "n_samples": """
n_samples (int): n of n-SPSA; the n updates are applied from their (seed, g) pairs, so
    memory does not grow with n.""",
    "backend": """
backend (str, optional): ``None``/``"auto"`` (Triton for CUDA tensors, the compiled
    ``"native"`` CPU kernels when they build, else ``"reference"``), ``"reference"``,
    ``"native"`` or ``"triton"``; see docs/backends.md.""",
    "nonfinite": """
nonfinite (str): what a NaN/inf loss does after the weights are restored: ``"raise"``
    (default, ``NonFiniteLossError``) or ``"skip"`` the step.""",
    "masks": """
masks: sparsity masks: ``None``, ``"zeros"`` (keep the weights that are exactly zero now at
    zero) or a dict parameter (or name) -> bool keep-mask. Masked weights are never
    perturbed or updated.""",
    "stochastic_rounding": """
stochastic_rounding (bool): round fp16/bf16 updates stochastically (unbiased), so updates
    below half an ulp are not lost; fp32/fp64 weights are unaffected (default False).""",
    "update": """
update (str): how the estimate ĝ = (1/n)·Σ g_k z_k moves θ: ``"sgd"`` (default, fused with
    the restore pass), ``"momentum"``, ``"sign"``, ``"adam"`` (torch.optim.SGD-momentum,
    sign-SGD and Adam arithmetic on ĝ + λθ; one, zero and two buffers of the trainable size)
    or ``"conservative"`` (three more forwards: keep the best of θ, θ ∓ lr·ĝ); ZO-Bench's
    ZO-SGD, -MMT, -Sign, -Adam, -Cons (docs/methods/updates.md).""",
    "momentum": """
momentum (float): μ of ``update="momentum"``, in [0, 1) (default 0.9).""",
    "betas": """
betas (tuple): Adam's (β1, β2) for ``update="adam"`` (default (0.9, 0.999)).""",
    "adam_eps": """
adam_eps (float): Adam's ε in the denominator (default 1e-8; not the perturbation ε).""",
}

# The engine features: not constructor arguments (docs/reliability.md, docs/virtual.md,
# docs/distributed.md).
ENGINE = """
Engine features attach after construction: ``opt.set_journal(path, fsync="step")`` records
every step for ``zoengine.journal.replay``; ``opt.attach_virtual(model)`` (or
``zoengine.optim.virtual.attach(opt, model)``) perturbs virtually, θ never written during the
evaluations; ``opt.set_distributed(True)`` trains data-parallel over ``torch.distributed``;
``opt.set_batch_source(source)`` hands a method fresh batches (DiZO's search). The constructor
keywords ``journal=``, ``journal_fsync=``, ``distributed=``, ``perturbation=`` and ``model=``
still work for one release, with a ``DeprecationWarning``."""

_MARKER = re.compile(r"^(?P<indent>[ \t]*)\{(?P<kind>args|engine):?(?P<names>[\w ]*)\}[ \t]*$",
                     re.MULTILINE)


def _expand(match: re.Match) -> str:
    indent = match["indent"]
    if match["kind"] == "engine":
        text = ENGINE.strip("\n")
    else:
        text = "\n".join(ARGS[n].strip("\n") for n in match["names"].split())
    return textwrap.indent(text, indent)


def shared_docs(cls: type) -> type:
    """Class decorator: expand the ``{args: ...}`` and ``{engine}`` markers of the docstring."""
    if cls.__doc__:
        cls.__doc__ = _MARKER.sub(_expand, cls.__doc__)
    return cls
