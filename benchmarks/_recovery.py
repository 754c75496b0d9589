"""The stages of bench_recovery.py, each run in a fresh process: prune, teacher cache, inference
baseline and one recovery row (ZO or Adam; full or masked LoRA; LM or KD+LM). Shared with
bench_recovery_methods.py and bench_recovery_budget.py. Models go to the cache, never to the
repository."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import _common as C

LORA_TARGETS = "q_proj,v_proj,o_proj,up_proj,down_proj"


def work() -> Path:
    return C.cache_dir("bench_recovery")


def model_dir(name: str) -> str:
    return "smollm2-135m" if name == "dense" else str(work() / name)


# ---- workers (fresh processes) -------------------------------------------------------------

def _load(a, name):
    import torch

    from zoengine.run.resources import load_model
    from zoengine.tasks import lm_blocks, shakespeare

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load_model(model_dir(name))
    task = shakespeare(block_size=a.seq)
    blocks = {s: lm_blocks(tok, task.splits[s]["text"][0], a.seq) for s in ("train", "test")}
    return model, tok, blocks


def worker_prune(a, name: str) -> dict:
    from zoengine import sparsity as S
    from zoengine.run.pruning import calibration_blocks

    model, tok, _ = _load(a, "dense")
    t0 = time.perf_counter()
    calib = [calibration_blocks(tok, "shakespeare", 4, 128, seed=0)]
    if name == "channels25":
        rep = S.prune_structured(model, "channels", 0.25, calib=calib, sequential=False)
        res = {"params_after": rep["params_after"], "params_before": rep["params_before"]}
    else:
        S.prune(model, "wanda", 0.5, "2:4" if name == "wanda24" else "unstructured",
                calib=calib, sequential=False)
        res = {}
    res["prune_s"] = time.perf_counter() - t0
    if hasattr(model.config, "quantization_config"):  # the GGUF origin, not a quantized model
        del model.config.quantization_config
    tmp = work() / f".{name}.tmp"
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(work() / name)
    return dict(res, row=f"prune@{name}", model=name)


def worker_teacher(a, _: str) -> dict:
    from zoengine.tasks import build_teacher_cache

    model, _, blocks = _load(a, "dense")
    t0 = time.perf_counter()
    cache = build_teacher_cache(model, blocks["train"][:256], str(work() / "teacher"), k=64,
                                progress=False, overwrite=True)
    return {"row": "teacher", "model": "dense", "build_s": time.perf_counter() - t0,
            "teacher_cache_bytes": cache.disk_bytes}


def worker_infer(a, name: str) -> dict:
    """Test perplexity and inference peak of ``name`` at batch ``a.batch`` x ``a.seq``."""
    from zoengine import sparsity as S
    from zoengine.sparsity import memory
    from zoengine.tasks import lm_eval

    model, _, blocks = _load(a, name)
    memory.reset_peak()  # the load's transient is not the phase we measure
    t0, c0 = time.perf_counter(), time.process_time()
    ev = lm_eval(model, blocks["test"], a.batch)
    res = {"row": f"infer@{name}", "model": name, "ppl_test": ev["perplexity"],
           "loss_test": ev["loss"], "phase_peak_mb": memory.peak_memory() / 2**20,
           "params": sum(p.numel() for p in model.parameters()),
           "eval_s": time.perf_counter() - t0, "eval_cpu_s": time.process_time() - c0}
    if name != "dense":
        res["sparsity"] = S.sparsity_report(model, S.masks_from_zeros(model))["sparsity"]
    return res


def masked_names(model) -> list[str]:
    """The prunable weights holding exact zeros (``masks_from_zeros``'s keys), no mask kept."""
    from zoengine import sparsity as S

    return [f"{n}.weight" for n, mod in S.prunable_layers(model) if bool((mod.weight == 0).any())]


def setup_row(st: dict, model, names: list[str]):
    """(net, trained params, optimizer) for one row. Full rows pass ``masks="zeros"``, as
    ``zoengine train --keep-zeros`` does: the optimizer packs one tensor's mask at a time. A
    dict of bool masks (101 MiB here) freed before training left the peak at 1.10-1.17x
    instead of 1.04-1.07x, through allocator fragmentation (docs/sparsity.md)."""
    import torch

    from zoengine import sparsity as S
    from zoengine.optim import create

    if st["train"] == "full":
        params = list(model.named_parameters())
        return model, params, create("mezo", params, lr=st["lr"], eps=st["eps"], seed=0,
                                     masks="zeros" if names else None)
    if st["train"] == "norms":  # no prunable weight is trained: the zeros need no mask
        from zoengine.sparsity.norms import train_norms_only

        params = train_norms_only(model)
        return model, params, create("mezo", params, lr=st["lr"], eps=st["eps"], seed=0)
    from peft import get_peft_model

    from zoengine.sparsity.lora import lora_config, mask_lora

    masks = S.masks_from_zeros(model) if names else None  # base names: before wrapping
    for p in model.parameters():
        p.requires_grad_(False)
    net = get_peft_model(model, lora_config(8, 16, LORA_TARGETS.split(","),
                                            scaling=st.get("scaling", "lora")))
    if masks:
        mask_lora(net, masks)  # kept as bits inside the layers
    del masks
    net.eval()
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if st["train"] == "adam":
        return net, params, torch.optim.AdamW([p for _, p in params], lr=st["lr"])
    return net, params, create("mezo", params, lr=st["lr"], eps=st["eps"], seed=0)


def train_until(a, st, net, opt, blocks, teacher, curve=None) -> tuple[int, float, float]:
    """Steps until ``a.budget_s`` of training wall clock: (steps, wall s, CPU s). With
    ``a.curve_every`` > 0, the test perplexity every that many training seconds is appended to
    ``curve`` as (train s, steps, ppl); the clock stops while it is measured."""
    import numpy as np
    import torch

    from zoengine.tasks import kd_batch_loss, lm_eval, lm_loss

    train = blocks["train"]
    steps, t0, c0 = 0, time.perf_counter(), time.process_time()
    paused = paused_cpu = 0.0  # time spent on the curve's evaluations, not training
    every = getattr(a, "curve_every", 0) or 0
    while (elapsed := time.perf_counter() - t0 - paused) < a.budget_s:
        if every and curve is not None and elapsed >= every * (len(curve) + 1):
            p0, pc = time.perf_counter(), time.process_time()
            net.eval()
            with torch.no_grad():
                curve.append((round(elapsed, 1), steps,
                              lm_eval(net, blocks["test"], a.batch)["perplexity"]))
            paused += time.perf_counter() - p0
            paused_cpu += time.process_time() - pc
        rng = np.random.RandomState(steps)
        if teacher is not None:
            b = teacher.batch(rng.randint(0, len(teacher), a.batch))
            closure = lambda b=b: kd_batch_loss(net, b, kd_weight=st["kd_weight"])  # noqa: E731
        else:
            b = train[torch.as_tensor(rng.randint(0, len(train), a.batch))]
            closure = lambda b=b: lm_loss(net, b)  # noqa: E731
        if st["train"] == "adam":
            net.train()
            opt.zero_grad(set_to_none=True)
            closure().backward()
            opt.step()
        else:
            with torch.no_grad():
                opt.step(closure)
        steps += 1
    return (steps, time.perf_counter() - t0 - paused, time.process_time() - c0 - paused_cpu)


def worker_train(a, row: str) -> dict:
    """One recovery row: ZO (MeZO) or Adam, full or masked LoRA, LM or KD+LM, until the clock."""
    import gc

    from zoengine import sparsity as S
    from zoengine.sparsity import memory
    from zoengine.tasks import TeacherCache, lm_eval

    name, st = a.row_model, json.loads(a.settings)
    model, _, blocks = _load(a, name)
    names = masked_names(model)  # empty for a model without zeros
    zeros_start = S.sparsity_report(model, names)["zeros"] if names else 0
    net, params, opt = setup_row(st, model, names)
    gc.collect()
    teacher = None
    if st.get("objective", "lm") != "lm":
        teacher = TeacherCache.open(str(work() / "teacher"), blocks["train"][:256])
    memory.reset_peak()
    before = lm_eval(net, blocks["test"], a.batch)
    curve = []
    steps, train_s, train_cpu = train_until(a, st, net, opt, blocks, teacher, curve)
    net.eval()
    after = lm_eval(net, blocks["test"], a.batch)
    peak = memory.peak_memory() / 2**20
    sp = {"sparsity": 0.0, "zeros": 0}
    if names and st["train"] in ("full", "norms"):
        sp = S.sparsity_report(model, names)
    elif names:
        from zoengine.sparsity.lora import merged_sparsity  # what a masked merge writes

        sp = merged_sparsity(net, names)
    return {"row": row, "model": name, "kind": st["train"], "objective": st.get("objective", "lm"),
            "lora_scaling": st.get("scaling", ""), "steps": steps,
            "forwards": steps if st["train"] == "adam" else 2 * steps,
            "backwards": steps if st["train"] == "adam" else 0, "lr": st["lr"], "eps": st["eps"],
            "ppl_before": before["perplexity"], "ppl_after": after["perplexity"],
            "train_s": train_s, "train_cpu_s": train_cpu, "phase_peak_mb": peak,
            "sparsity_after": sp["sparsity"], "zeros_after": sp["zeros"],
            "zeros_start": zeros_start, "sparsity_exact": sp["zeros"] == zeros_start,
            "trainable_params": sum(p.numel() for _, p in params),
            "batch": a.batch, "seq": a.seq, "budget_s": a.budget_s,
            "loadavg_end": os.getloadavg()[0],
            "curve": json.dumps(curve + [(round(train_s, 1), steps, after["perplexity"])])}
