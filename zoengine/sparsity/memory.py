"""Memory planner: pick batch size, sequence length, dtype and method to fit a budget.

A ZO step is two forward passes under ``no_grad`` plus in-place passes over the weights, so its
peak is inference's peak plus the method's persistent extras:

    peak = runtime + params + activations(one forward with loss) + extras(method)

- runtime: the interpreter with torch and transformers imported (CPU RSS; pass ``runtime=0`` on
  CUDA, where the allocator's peak is what ``peak_memory`` reads). Measured: ~420 MiB.
- activations: under ``no_grad`` a decoder frees each block's tensors before the next, so the
  peak is one block's transients plus the output phase (logits, their fp32 copy and the
  log-softmax of the loss): ``B*T*(c_h*D + c_i*I)*s + B*T*V*(s + 4 [+ 4 if s < 4])``.
  The constants are fitted to measured RSS (tests/test_memory_plan.py on a tiny Llama,
  benchmarks/bench_pruned.py on SmolLM2-135M).
- extras: whatever the method's class holds beyond the weights, asked of the class through
  the method registry (``cls.memory_extras``): DiZO's anchors (a copy of the projected
  tensors), PeZO's pool (4 bytes/number), masks as bits (1/8 byte per masked weight, plus one
  tensor's 3 bytes/weight while unpacked), the kernels' chunk buffers (a few MiB).

``plan`` refuses with ``MemoryBudgetError`` naming the budget and the smallest candidate.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from zoengine.optim import available_methods
from zoengine.optim.base import KERNEL_SCRATCH as KERNEL_SCRATCH  # re-exported
from zoengine.optim.registry import method_spec
from zoengine.sparsity.weights import count_parameters, meta_model, prunable_numel

RUNTIME_CPU = 420 * 2**20  # python + torch + transformers RSS (measured: 415-440 MiB, torch 2.13)
C_HIDDEN, C_INTER = 8.0, 3.0  # live (B,T,D) and (B,T,I) tensors at a block's peak
SLACK = 1.10  # allocator rounding and fragmentation (fit: tests/test_memory_plan.py)
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
BACKPROP = ("adam", "adam8bit", "lora-adam")  # first-order baselines (backprop_bytes)
BASELINES = ("inference", *BACKPROP)  # priced here; every other method is a registered class
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}


class MemoryBudgetError(ValueError):
    """No candidate configuration fits ``budget``; ``smallest`` is the cheapest candidate."""

    flag = "--max-memory"  # zoengine's CLI maps a ValueError with .flag to a usage error

    def __init__(self, message: str, budget: int, smallest: Plan):
        super().__init__(message)
        self.budget, self.smallest = budget, smallest


def parse_size(size) -> int:
    """``"2GiB"`` -> 2147483648. Binary: K/M/G/T, KiB/MiB/GiB/TiB; decimal: KB/MB/GB/TB; an int
    is bytes."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"max_memory={size!r}: give a size such as '2GiB', '1.5G', '800MiB', "
                         "'4GB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_size(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class ModelShape:
    """What the planner needs to know about a decoder LM.

    ``params`` is exact for a model and for any config transformers can build: ``of`` builds
    the model on the ``meta`` device (no memory, no initialisation) and counts its parameters,
    a tied embedding once; a dict without ``model_type`` gets a LLaMA-shaped formula
    (``source`` says which)."""

    params: int
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    kv_dim: int
    largest_tensor: int
    masked: int = 0  # weights under a sparsity mask
    largest_masked: int = 0  # the largest masked tensor (unpacked one at a time)
    source: str = "formula"  # "model", "meta" (built from the config) or "formula"

    @classmethod
    def of(cls, model_or_config, masked: int | None = None) -> ModelShape:
        """The shape of a model, or of a transformers config (or dict) before loading.

        ``masked`` defaults to every prunable weight (``sparsity.prunable_weights``: the
        Linear, Conv1D and expert tensors of the decoder blocks)."""
        cfg = getattr(model_or_config, "config", model_or_config)
        get = (cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d))
        d, i, v = get("hidden_size"), get("intermediate_size"), get("vocab_size")
        if d is None or v is None:
            raise ValueError("plan() needs a transformers model or config with hidden_size and "
                             "vocab_size")
        i = i or 4 * d
        n_layers = get("num_hidden_layers", 1)
        heads = get("num_attention_heads", 1)
        kv = (get("head_dim") or d // heads) * (get("num_key_value_heads") or heads)
        if isinstance(model_or_config, torch.nn.Module):
            model, source = model_or_config, "model"
        else:
            model, source = meta_model(cfg), "meta"
        if model is not None:
            params, largest = count_parameters(model)
            m_all, m_largest = prunable_numel(model)
            if masked is None:
                masked = m_all
            return cls(params, d, i, v, n_layers, kv, largest, masked, m_largest, source)
        block = 2 * d * d + 2 * d * kv + 3 * d * i + 2 * d
        tied = get("tie_word_embeddings", True)
        params = n_layers * block + v * d * (1 if tied else 2) + d
        largest = max(v * d, d * i)
        if masked is None:  # default: every Linear weight of the blocks is masked
            masked = n_layers * (2 * d * d + 2 * d * kv + 3 * d * i)
        return cls(params, d, i, v, n_layers, kv, largest, masked, max(d * i, d * d))


@dataclass
class Plan:
    """A configuration and its predicted peak (bytes), with the breakdown."""

    method: str
    batch_size: int
    seq_len: int
    dtype: str
    predicted: int
    breakdown: dict = field(default_factory=dict)
    budget: int | None = None

    @property
    def fits(self) -> bool:
        return self.budget is None or self.predicted <= self.budget

    def describe(self) -> str:
        return (f"{self.method}, batch {self.batch_size}, seq {self.seq_len}, {self.dtype}")

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {fmt_size(v)}" for k, v in self.breakdown.items() if v)
        budget = f" of max_memory {fmt_size(self.budget)}" if self.budget else ""
        return f"plan: {self.describe()}: predicted peak {fmt_size(self.predicted)}{budget} " \
               f"({parts})"


def activation_bytes(shape: ModelShape, batch: int, seq: int, dtype: str,
                     with_loss: bool = True) -> int:
    """Peak activations of one inference forward (with the LM loss) under ``no_grad``."""
    s = DTYPES[dtype]
    tokens = batch * seq
    block = tokens * (C_HIDDEN * shape.hidden + C_INTER * shape.intermediate) * s
    out_bytes = s + (4 if with_loss else 0) + (4 if s < 4 and with_loss else 0)
    head = tokens * (shape.vocab * out_bytes + 2 * shape.hidden * s)
    # the sum, not the max: with glibc's malloc a block's freed transients are not all returned
    # before the logits are allocated (measured: the max under-predicts by up to 25 %)
    return int(SLACK * (block + head))


def lora_numel(shape: ModelShape, r: int = 8) -> int:
    """Adapter parameters of LoRA rank ``r`` on q_proj and v_proj (PEFT's default targets)."""
    return shape.layers * r * (2 * shape.hidden + shape.hidden + shape.kv_dim)


def backprop_bytes(shape: ModelShape, batch: int, seq: int, dtype: str, method: str) -> int:
    """A first-order baseline, for comparison: the weights, and for the trained tensors a
    gradient and the optimizer's states, plus every block's stored activations
    (~(16 D + 5 I) per token per block: a rough model that bench_scale.py checks per size).

    - ``adam``: torch.optim.Adam on every weight; its two moments in the weights' dtype
    - ``adam8bit``: bitsandbytes' Adam8bit: two 1-byte moments (block absmax: +1/256)
    - ``lora-adam``: frozen weights, LoRA r=8 on q_proj/v_proj trained by Adam in fp32
    """
    s = DTYPES[dtype]
    tokens = batch * seq
    stored = shape.layers * tokens * (16 * shape.hidden + 5 * shape.intermediate) * s
    trained, state = {"adam": (shape.params, 2 * s), "adam8bit": (shape.params, 2.03),
                      "lora-adam": (lora_numel(shape), 8)}[method]
    return int(shape.params * s + trained * (s + state) + stored
               + 2 * activation_bytes(shape, batch, seq, dtype))


def zo_methods() -> tuple[str, ...]:
    """The registered ZO methods (``zoengine.optim.available_methods()``)."""
    return available_methods()


def methods() -> tuple[str, ...]:
    """Every name ``predict``/``plan`` accept: the registered methods and the baselines."""
    return zo_methods() + BASELINES


def __getattr__(name: str):
    if name == "ZO_METHODS":  # computed: a method registered later is included
        return zo_methods()
    if name == "METHODS":
        return methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def extras_bytes(shape: ModelShape, method: str, dtype: str, *, pool_size: int = 1 << 16,
                 masks: bool = False) -> dict:
    """The method's persistent extras, from its class (``memory_extras``) with the keyword
    arguments its registered name fixes; baselines have none."""
    if method in BASELINES:
        return {"kernels": 0}
    spec = method_spec(method)
    # projected tensors of an anchor-keeping method: k_proj and v_proj (DiZO authors' choice)
    projected = shape.layers * 2 * shape.hidden * shape.kv_dim
    return spec.cls.memory_extras(
        trainable_numel=shape.params, dtype_bytes=DTYPES[dtype], projected_numel=projected,
        masked_numel=shape.masked if masks else 0,
        largest_masked=shape.largest_masked if masks else 0,
        largest_numel=shape.largest_tensor, **{"pool_size": pool_size, **spec.fixed})


def predict(model_or_config, method: str = "mezo", batch_size: int = 16, seq_len: int = 128,
            dtype: str = "float32", *, runtime: int | None = None, masks: bool = False,
            masked: int | None = None, pool_size: int = 1 << 16) -> Plan:
    """The predicted peak of one configuration (no budget check)."""
    if method not in methods():
        raise ValueError(f"method={method!r}: must be one of {methods()}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {tuple(DTYPES)}")
    shape = model_or_config if isinstance(model_or_config, ModelShape) else \
        ModelShape.of(model_or_config, masked)
    s = DTYPES[dtype]
    rt = RUNTIME_CPU if runtime is None else runtime
    if method in BACKPROP:
        bd = {"runtime": rt, "params_grads_states_activations":
              backprop_bytes(shape, batch_size, seq_len, dtype, method)}
    else:
        bd = {"runtime": rt, "params": shape.params * s,
              "activations": activation_bytes(shape, batch_size, seq_len, dtype)}
        bd.update(extras_bytes(shape, method, dtype, pool_size=pool_size, masks=masks))
    return Plan(method, batch_size, seq_len, dtype, int(sum(bd.values())), bd)


def _halvings(start: int, low: int) -> list[int]:
    out = [start]
    while out[-1] // 2 >= low:
        out.append(out[-1] // 2)
    return out


def plan(model_or_config, max_memory="2GiB", method="mezo", *, batch_size: int = 16,
         seq_len: int = 128, batch_sizes=None, seq_lens=None, dtypes=("float32", "bfloat16"),
         runtime: int | None = None, masks: bool = False, masked: int | None = None,
         pool_size: int = 1 << 16) -> Plan:
    """The first configuration that fits ``max_memory``, else ``MemoryBudgetError``.

    Order of preference: ``method`` (a name or a list, first preferred), then ``dtypes`` in
    order, then sequence length (``seq_lens``, default ``seq_len`` halved down to 32), then
    batch size (``batch_sizes``, default ``batch_size`` halved down to 1): the batch shrinks
    first, because that changes only the gradient noise, not the task.
    """
    budget = parse_size(max_memory)
    methods = [method] if isinstance(method, str) else list(method)
    shape = ModelShape.of(model_or_config, masked) if not isinstance(model_or_config,
                                                                     ModelShape) else model_or_config
    bss = list(batch_sizes) if batch_sizes else _halvings(batch_size, 1)
    sls = list(seq_lens) if seq_lens else _halvings(seq_len, min(32, seq_len))
    smallest = None
    for m in methods:
        for dt in dtypes:
            for sl in sls:
                for bs in bss:
                    p = predict(shape, m, bs, sl, dt, runtime=runtime, masks=masks,
                                pool_size=pool_size)
                    p.budget = budget
                    if p.predicted <= budget:
                        return p
                    if smallest is None or p.predicted < smallest.predicted:
                        smallest = p
    raise MemoryBudgetError(
        f"max_memory={max_memory} ({fmt_size(budget)}): no configuration fits. The smallest "
        f"candidate ({smallest.describe()}) needs {fmt_size(smallest.predicted)}: "
        + ", ".join(f"{k} {fmt_size(v)}" for k, v in smallest.breakdown.items() if v)
        + f". Give max_memory={fmt_size(smallest.predicted).replace(' ', '')} or more, or use a "
        "smaller (e.g. structurally pruned) model",
        budget, smallest)


# ---- measurement -----------------------------------------------------------------------------

def reset_peak() -> None:
    """Start a new peak window: CUDA's allocator peak, and Linux's VmHWM (via clear_refs)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory() -> int:
    """Bytes: CUDA's allocator peak when CUDA is used, else the process's peak RSS (VmHWM since
    the last ``reset_peak``, else ru_maxrss)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_runtime(model) -> int | None:
    """This process's resident memory minus the model's tensors: the real ``runtime`` term of a
    plan made in the process that will train (it counts whatever else is loaded: datasets,
    tokenizer, caches). None where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
    seen, tensors = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors += t.numel() * t.element_size()
    return max(0, rss - tensors)


# ---- for zoengine train ----------------------------------------------------------------------

def plan_for_run(model, max_memory, *, method: str, batch_size: int, seq_len: int,
                 masks=None, dtypes=("float32", "bfloat16"), log=print) -> Plan:
    """Plan for ``zoengine train`` and print it; ``MemoryBudgetError`` (a ValueError) if nothing
    fits. Call after the model is loaded (and pruned); apply ``plan.batch_size``,
    ``plan.seq_len`` (max_length / block_size) and ``plan.dtype`` before building the
    optimizer, then call ``reset_peak()`` and, after training, ``report_peak(plan)``."""
    masked = None
    if isinstance(masks, dict):
        masked = sum(m.numel() for m in masks.values())
    elif masks == "zeros":
        masked = None
    name = method if method in methods() else "mezo"
    # the runtime term measured in this process, never below the bare-interpreter constant
    rt = max(RUNTIME_CPU, resident_runtime(model) or 0) if not torch.cuda.is_available() else None
    p = plan(model, max_memory, name, batch_size=batch_size, seq_len=seq_len,
             masks=masks is not None, masked=masked if masks is not None else 0, runtime=rt,
             dtypes=tuple(dtypes))
    log(str(p))
    return p


def report_peak(p: Plan | None = None, log=print) -> dict:
    """Print and return the measured peak (and the prediction, when a plan is given)."""
    peak = peak_memory()
    out = {"measured_peak_bytes": peak}
    msg = f"peak memory: {fmt_size(peak)} measured"
    if p is not None:
        out.update(predicted_peak_bytes=p.predicted, budget_bytes=p.budget)
        msg += f", {fmt_size(p.predicted)} predicted"
        if p.budget:
            msg += f", budget {fmt_size(p.budget)}" + (" (EXCEEDED)" if peak > p.budget else "")
    log(msg)
    return out
