"""Which weights a model has: the prunable ones with their storage layout and kind, and exact
parameter counts (a model, or a config built on the ``meta`` device).

Prunable (``prunable_weights``): ``nn.Linear`` weights (out, in), the weights of transformers'
``Conv1D`` (GPT-2: stored (in, out)) and the 3-D expert tensors of mixture-of-experts blocks
(transformers 5: ``gate_up_proj``/``down_proj``/``up_proj`` of shape (experts, out, in), or
(experts, in, out) where the experts module says ``is_transposed``, and Llama4's). Routers,
embeddings, ``lm_head``, norms and biases are never prunable (docs/sparsity.md,
"Architectures: Conv1D and experts").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# the memory layout of each kind of prunable weight; "in" is the dimension N:M groups run along
LAYOUTS = {"linear": "(out, in): nn.Linear",
           "conv1d": "(in, out): transformers' Conv1D (GPT-2, GPT)",
           "experts": "(experts, out, in): transformers' experts modules, F.linear per expert",
           "experts_t": "(experts, in, out): experts modules with is_transposed, Llama4"}
# the kinds of pruned tensor in the report; routers, embeddings, lm_head, norms and biases are
# never pruned (sparsity_report lists them under "not_pruned")
KINDS = ("attention", "mlp", "experts", "other")
# experts modules whose 3-D tensors are stored (experts, in, out) without an is_transposed flag
_TRANSPOSED_EXPERTS = ("Llama4TextExperts",)
_EXPERT_TENSORS = ("gate_up_proj", "up_proj", "gate_proj", "down_proj")


# ---- which weights ----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PrunableWeight:
    """One weight a pruner touches: its parameter name (the key of its mask), its module, the
    attribute holding it, its memory layout (``LAYOUTS``) and its kind (``KINDS``)."""

    name: str
    module_name: str
    module: torch.nn.Module
    attr: str
    layout: str
    kind: str

    @property
    def weight(self) -> torch.Tensor:
        """The parameter itself."""
        return getattr(self.module, self.attr)

    @property
    def in_dim(self) -> int:
        """The input dimension of the stored tensor (N:M groups run along it)."""
        return -1 if self.layout in ("linear", "experts") else -2

    @property
    def in_features(self) -> int:
        """The length of the input dimension."""
        return int(self.weight.shape[self.in_dim])

    @property
    def matrices(self) -> int:
        """How many matrices the tensor holds: its experts, or 1."""
        return int(self.weight.shape[0]) if self.layout.startswith("experts") else 1

    def as_matrices(self, t: torch.Tensor) -> torch.Tensor:
        """A view of ``t`` (the weight's shape) as (matrices, out, in)."""
        if self.layout == "linear":
            return t.unsqueeze(0)
        if self.layout == "conv1d":
            return t.t().unsqueeze(0)
        return t if self.layout == "experts" else t.transpose(1, 2)

    def from_matrices(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of ``as_matrices``: (matrices, out, in) back to the weight's shape
        (contiguous)."""
        if self.layout == "linear":
            return t[0].contiguous()
        if self.layout == "conv1d":
            return t[0].t().contiguous()
        return t.contiguous() if self.layout == "experts" else t.transpose(1, 2).contiguous()


def is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT): a Linear whose weight is stored (in, out)."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and tuple(w.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def experts_layout(module: torch.nn.Module) -> str | None:
    """``"experts"`` or ``"experts_t"`` for a transformers experts module whose layout zoengine
    knows (one with ``is_transposed``, from ``use_experts_implementation``, or Llama4's), else
    None."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return "experts_t" if flag else "experts"
    if type(module).__name__ in _TRANSPOSED_EXPERTS:
        return "experts_t"
    return None


def is_router(name: str, module: torch.nn.Module, parent: torch.nn.Module | None) -> bool:
    """A mixture-of-experts router: a class named ``*Router*``, or a module called ``gate``,
    ``router`` or ``shared_expert_gate`` beside an ``experts`` module. Never pruned: it is
    tiny, and every token passes it (a pruned router reroutes tokens)."""
    if "router" in type(module).__name__.lower():
        return True
    last = name.rsplit(".", 1)[-1]
    return (last in ("gate", "router", "shared_expert_gate", "gating")
            and parent is not None and hasattr(parent, "experts"))


_ATTN = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*(\.|$)", re.IGNORECASE)
_EXPERT_LIST = re.compile(r"(^|\.)experts(\.|$)")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn|moe|block_sparse_moe|shared_experts?|fc1|fc2|"
                  r"fc_in|fc_out|c_fc|dense_h_to_4h|dense_4h_to_h|w1|w2|w3|gate_proj|up_proj|"
                  r"down_proj)(\.|$)", re.IGNORECASE)


def weight_kind(name: str, layout: str = "linear") -> str:
    """The kind of a prunable weight for the report: ``experts`` (3-D expert tensors, or the
    Linear layers of an ``experts`` ModuleList), ``attention``, ``mlp`` (shared experts too),
    or ``other``; by the parameter name."""
    if layout.startswith("experts") or _EXPERT_LIST.search(name):
        return "experts"
    if _ATTN.search(name):
        return "attention"
    return "mlp" if _MLP.search(name) else "other"


def _embedding_params(model: torch.nn.Module) -> tuple[set, set]:
    ids, ptrs = set(), set()
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            ids.add(id(m.weight))
            if m.weight.device.type != "meta":
                ptrs.add(m.weight.data_ptr())
    return ids, ptrs


def _tied_to_embedding(model: torch.nn.Module, w: torch.Tensor, emb=None) -> bool:
    ids, ptrs = emb if emb is not None else _embedding_params(model)
    return id(w) in ids or (w.device.type != "meta" and w.data_ptr() in ptrs)


def _candidates(model: torch.nn.Module) -> list[PrunableWeight]:
    """Every Linear/Conv1D weight and 3-D tensor of the model, routers excluded, with the
    in-a-ModuleList flag decided by the caller."""
    mods = dict(model.named_modules())
    out = []
    for n, m in model.named_modules():
        parent = mods.get(n.rsplit(".", 1)[0] if "." in n else "") if n else None
        if isinstance(m, torch.nn.Linear) or is_conv1d(m):
            if is_router(n, m, parent):
                continue
            layout = "conv1d" if is_conv1d(m) else "linear"
            pname = f"{n}.weight" if n else "weight"
            out.append(PrunableWeight(pname, n, m, "weight", layout, weight_kind(pname, layout)))
            continue
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            continue  # a convolution kernel (Mamba's conv1d), not a matrix: never pruned
        for a, p in m.named_parameters(recurse=False):
            if p.dim() < 3:
                continue
            layout = experts_layout(m)
            pname = f"{n}.{a}" if n else a
            if layout is None or a not in _EXPERT_TENSORS:
                out.append(PrunableWeight(pname, n, m, a, "unknown", "experts"))
            else:
                out.append(PrunableWeight(pname, n, m, a, layout, "experts"))
    return out


def prunable_weights(model: torch.nn.Module, layers="auto") -> list[PrunableWeight]:
    """The weights a pruner touches, as ``PrunableWeight`` (mask key ``"<module>.<param>"``).

    Kinds of weight: ``nn.Linear`` (out, in), transformers' ``Conv1D`` (in, out) and the 3-D
    expert tensors of transformers' experts modules ((experts, out, in), or (experts, in, out):
    ``LAYOUTS``). Routers (``is_router``) are never selected, nor are embeddings, norms,
    ``lm_head``/``embed_out`` or a weight tied to an embedding.

    ``"auto"``: those weights inside an ``nn.ModuleList`` (the decoder blocks of a
    transformers model); a model without a ModuleList gets all of them. A regex selects by
    module or parameter name (``re.search``); a callable ``(module_name, module) -> bool``
    decides itself. A selected 3-D tensor whose layout zoengine does not know is refused
    (``ValueError`` naming it): exclude it with ``layers=``.
    """
    cands = _candidates(model)
    if callable(layers):
        chosen = [w for w in cands if layers(w.module_name, w.module)]
    elif layers != "auto":
        rx = re.compile(layers)
        chosen = [w for w in cands if rx.search(w.module_name) or rx.search(w.name)]
    else:
        in_list = set()
        for ml in (m for m in model.modules() if isinstance(m, torch.nn.ModuleList)):
            in_list |= {id(x) for x in ml.modules()}
        chosen = [w for w in cands if id(w.module) in in_list] or cands
    emb = _embedding_params(model)
    chosen = [w for w in chosen if not w.module_name.endswith(("lm_head", "embed_out"))
              and not _tied_to_embedding(model, w.weight, emb)]
    for w in chosen:
        if w.layout == "unknown":
            raise ValueError(
                f"{w.name} ({type(w.module).__name__}, shape {tuple(w.weight.shape)}) is a 3-D "
                "tensor whose layout zoengine does not know (it knows transformers' experts "
                "modules with is_transposed, and Llama4TextExperts), so it cannot tell its "
                f"input dimension: pass layers= a regex or callable that leaves "
                f"{w.module_name!r} out")
    return chosen


def prunable_layers(model: torch.nn.Module, layers="auto") -> list[tuple[str, torch.nn.Module]]:
    """The modules of the 2-D prunable weights (``nn.Linear`` and ``Conv1D``) as
    ``(name, module)``; ``prunable_weights`` also has the 3-D expert tensors, which live in
    modules with several weights. ``layers`` as in ``prunable_weights``."""
    return [(w.module_name, w.module) for w in prunable_weights(model, layers)
            if w.layout in ("linear", "conv1d")]


def block_of(model: torch.nn.Module, name: str) -> str | None:
    """The name of the ModuleList entry (decoder block) that holds module ``name``."""
    for lname, ml in model.named_modules():
        if isinstance(ml, torch.nn.ModuleList) and name.startswith(lname + "."):
            return lname + "." + name[len(lname) + 1:].split(".")[0]
    return None


# ---- counts ------------------------------------------------------------------------------------

def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(number of parameters, largest tensor) of ``model``, each tensor once: a weight tied to
    another (the same Parameter, or on a real device the same storage) counts once."""
    seen, params, largest = set(), 0, 0
    for p in model.parameters():  # already unique by identity
        if p.device.type != "meta":
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
        params += p.numel()
        largest = max(largest, p.numel())
    return params, largest


def prunable_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(elements of all prunable weights, of the largest one): what a default set of masks
    holds. A model with a 3-D tensor ``prune`` would refuse counts every 2-D+ tensor."""
    try:
        ws = prunable_weights(model)
    except ValueError:  # a 3-D tensor of unknown layout: prune refuses it; plan for all 2-D+
        ws = None
    sizes = ([w.weight.numel() for w in ws] if ws is not None else
             [p.numel() for p in model.parameters() if p.dim() >= 2])
    return sum(sizes), max(sizes, default=0)


def meta_model(config):
    """The causal LM of a transformers config (or a dict with ``model_type``) built on the
    ``meta`` device: exact shapes, no memory, no initialisation (a 70B config builds in well
    under a second once transformers' modeling module is imported). None when transformers cannot build it (no ``model_type``, an
    architecture it does not know, one that needs remote code)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
    except ImportError:
        return None
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    if isinstance(config, dict):
        kind = config.get("model_type")
        if not kind:
            return None
        try:
            config = AutoConfig.for_model(kind, **{k: x for k, x in config.items()
                                                   if k != "model_type"})
        except (ValueError, KeyError):
            return None
    if not isinstance(config, PretrainedConfig):
        return None
    try:
        with torch.device("meta"), no_init_weights():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, ImportError, OSError):
        return None
    model.tie_weights()  # no_init_weights skips the tying; a tied head counts once
    return model
