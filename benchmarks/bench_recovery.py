"""Recover pruned SmolLM2-135M under one wall-clock budget per row (issue 15, reduced budget).

    python benchmarks/bench_recovery.py --budget-s 240 --jobs 2 --threads 1

Stages, each a fresh process (so each peak is its own); models and the teacher cache go to the
cache (``~/.cache/zoengine/bench_recovery``), never to the repository:

  prune      Wanda 50 % unstructured, Wanda 2:4, and structured Wanda 25 % MLP channels (a
             smaller dense model), calibrated as bench_pruned.py does (4 x 128 tokens of the
             Shakespeare *train* split, one calibration pass); saved as model folders
  teacher    the dense model's top-64 logits over the first 256 training blocks (the KD cache
             of ``--objective kd``, built from the dense model, docs/distillation.md)
  infer      per model: held-out test perplexity (Macbeth test split, 64 blocks x ``--seq``
             tokens, ``lm_eval`` at batch ``--batch``: what ``zoengine train`` reports) and the
             inference peak RSS at that batch shape (window reset after loading)
  zo rows    MeZO (``zoengine.optim.create("mezo")``), the same code ``zoengine train`` runs:
             full parameters with the masks from the zeros, or masked LoRA (``mask_lora``, the
             merge keeps the zeros), objective LM or KD+LM; the loop stops when ``--budget-s``
             of wall clock has passed
  adam row   the same masked LoRA with torch.optim.AdamW and backprop, same clock budget

Peak: VmHWM reset after loading and setting up (masks packed to bits, optimizer built), so it
covers before-eval, training and after-eval; ``vs_pruned_inference`` divides it by the pruned
model's ``infer`` peak. The machine is shared: CPU seconds are recorded next to wall seconds.
Rows go to benchmarks/results/bench_recovery.csv; the markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LORA_TARGETS = "q_proj,v_proj,o_proj,up_proj,down_proj"
PRUNED = ("wanda50", "wanda24", "channels25")
FULL = {"train": "full", "lr": 3e-5, "eps": 1e-3}
LORA = {"train": "lora", "lr": 2e-3, "eps": 1e-2, "scaling": "lora"}
KD = {"objective": "kd+lm", "kd_weight": 0.5}
ROWS = {  # name -> (model, settings); "best" rows are resolved from finished rows at run time
    "zo-full-lm@wanda50": ("wanda50", FULL),
    "zo-lora-lm@wanda50": ("wanda50", LORA),
    "zo-lora-kd@wanda50": ("wanda50", dict(LORA, **KD)),
    "zo-rslora-best@wanda50": ("wanda50", "best-lora"),
    "adam-lora-lm@wanda50": ("wanda50", {"train": "adam", "lr": 1e-3, "eps": ""}),
    "zo-best@wanda24": ("wanda24", "best"),
    # the same, fixed (what the "best" rows resolved to on 2026-12-02)
    "zo-rslora-lm@wanda50": ("wanda50", dict(LORA, scaling="rslora")),
    "zo-full-lm@wanda24": ("wanda24", FULL),
    "zo-full-lm@channels25": ("channels25", FULL),
}
DEFAULT_ROWS = ["zo-full-lm@wanda50", "zo-lora-lm@wanda50", "zo-lora-kd@wanda50",
                "zo-rslora-best@wanda50", "adam-lora-lm@wanda50", "zo-best@wanda24",
                "zo-full-lm@channels25"]


def work() -> Path:
    return C.cache_dir("bench_recovery")


def model_dir(name: str) -> str:
    return "smollm2-135m" if name == "dense" else str(work() / name)


# ---- workers (fresh processes) -------------------------------------------------------------

def _load(a, name):
    import torch

    from zoengine.run.job import load_model
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


def worker_train(a, row: str) -> dict:
    """One recovery row: ZO (MeZO) or Adam, full or masked LoRA, LM or KD+LM, until the clock."""
    import gc

    import numpy as np
    import torch

    from zoengine import sparsity as S
    from zoengine.optim.masks import pack_mask, unpack_mask
    from zoengine.sparsity import memory
    from zoengine.tasks import TeacherCache, kd_batch_loss, lm_eval, lm_loss

    name, st = a.row_model, json.loads(a.settings)
    model, _, blocks = _load(a, name)
    masks = S.masks_from_zeros(model)  # empty for the structured (dense) model
    packed = {n: (pack_mask(m), m.shape) for n, m in masks.items()}
    zeros_start = S.sparsity_report(model, masks)["zeros"] if masks else 0
    net = model
    if st["train"] in ("lora", "adam"):
        from peft import get_peft_model

        from zoengine.sparsity.lora import lora_config, mask_lora

        for p in model.parameters():
            p.requires_grad_(False)
        net = get_peft_model(model, lora_config(8, 16, LORA_TARGETS.split(","),
                                                scaling=st.get("scaling", "lora")))
        if masks:
            mask_lora(net, masks)  # kept as bits inside the layers
        net.eval()
        params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    else:
        params = list(model.named_parameters())
    if st["train"] == "adam":
        opt = torch.optim.AdamW([p for _, p in params], lr=st["lr"])
    else:
        from zoengine.optim import create

        opt = create("mezo", params, lr=st["lr"], eps=st["eps"], seed=0,
                     masks=masks if (st["train"] == "full" and masks) else None)
    del masks
    gc.collect()
    teacher = None
    if st.get("objective", "lm") != "lm":
        teacher = TeacherCache.open(str(work() / "teacher"), blocks["train"][:256])
    memory.reset_peak()
    before = lm_eval(net, blocks["test"], a.batch)
    train = blocks["train"]
    steps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < a.budget_s:
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
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    net.eval()
    after = lm_eval(net, blocks["test"], a.batch)
    peak = memory.peak_memory() / 2**20
    sp = {"sparsity": 0.0, "zeros": 0}
    if packed:
        if st["train"] == "full":
            sp = S.sparsity_report(model, {n: unpack_mask(b, sh) for n, (b, sh) in packed.items()})
        else:
            from zoengine.sparsity.lora import merged_sparsity  # what a masked merge writes

            sp = merged_sparsity(net, list(packed))
    return {"row": row, "model": name, "kind": st["train"], "objective": st.get("objective", "lm"),
            "lora_scaling": st.get("scaling", ""), "steps": steps,
            "forwards": steps if st["train"] == "adam" else 2 * steps,
            "backwards": steps if st["train"] == "adam" else 0, "lr": st["lr"], "eps": st["eps"],
            "ppl_before": before["perplexity"], "ppl_after": after["perplexity"],
            "train_s": train_s, "train_cpu_s": train_cpu, "phase_peak_mb": peak,
            "sparsity_after": sp["sparsity"], "zeros_after": sp["zeros"],
            "zeros_start": zeros_start, "sparsity_exact": sp["zeros"] == zeros_start,
            "trainable_params": sum(p.numel() for _, p in params),
            "batch": a.batch, "seq": a.seq, "budget_s": a.budget_s}


# ---- driver ----------------------------------------------------------------------------------

def run_worker(a, stage: str, extra=()) -> dict:
    """``stage`` in a fresh interpreter; its result, with the child's own wall and CPU time."""
    import os
    import subprocess

    log = work() / "logs" / f"{stage.replace(':', '-').replace('@', '-')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, __file__, "--worker", stage, *a.common, *extra],
                             stdout=f, stderr=subprocess.STDOUT, cwd=C.ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("@@BENCH_RESULT@@ "):
            return dict(json.loads(line.split(" ", 1)[1]), proc_wall_s=wall,
                        proc_cpu_s=ru.ru_utime + ru.ru_stime)
    raise RuntimeError(f"worker {stage} failed (status {status}); see {log}")


def plan_items(rows_wanted: list[str]) -> list[tuple[str, list[str]]]:
    """(item, dependencies) in priority order; lanes take the first item that is ready."""
    models = [m for m in PRUNED if any(ROWS[r][0] == m for r in rows_wanted)]
    zo50 = [r for r in ("zo-full-lm@wanda50", "zo-lora-lm@wanda50", "zo-lora-kd@wanda50",
                        "zo-rslora-best@wanda50") if r in rows_wanted]
    deps = {"zo-rslora-best@wanda50": [r for r in ("zo-lora-lm@wanda50", "zo-lora-kd@wanda50")
                                       if r in rows_wanted],
            "zo-best@wanda24": zo50}
    items = [(f"prune:{m}", []) for m in models[:1]] + [("teacher", []), ("infer:dense", [])]
    items += [(f"infer:{m}", [f"prune:{m}"]) for m in models[:1]]
    later = [(f"prune:{m}", []) for m in models[1:]]
    later += [(f"infer:{m}", [f"prune:{m}"]) for m in models[1:]]
    for r in rows_wanted:
        m = ROWS[r][0]
        d = [f"prune:{m}", f"infer:{m}"] + [f"row:{x}" for x in deps.get(r, [])]
        if r.endswith("@wanda50") and "kd" in r or ROWS[r][1] in ("best", "best-lora"):
            d.append("teacher")
        items.append((f"row:{r}", d))
        if r == "adam-lora-lm@wanda50":
            items += later
            later = []
    return items + later


def resolve(row: str, results: dict) -> dict:
    """The settings of a row; "best" rows pick the finished row with the lowest perplexity."""
    st = ROWS[row][1]
    if st == "best-lora":
        cand = [r for r in ("zo-lora-lm@wanda50", "zo-lora-kd@wanda50") if r in results]
        best = min(cand, key=lambda r: results[r]["ppl_after"])
        return dict(ROWS[best][1], scaling="rslora", picked=best)
    if st == "best":
        cand = [r for r in results if r.startswith("zo-") and r.endswith("@wanda50")]
        best = min(cand, key=lambda r: results[r]["ppl_after"])
        return dict(results[best]["settings"], picked=best)
    return dict(st)


def finish(rows: list[dict], base: dict) -> list[dict]:
    dense = base["dense"]["ppl_test"]
    for r in rows:
        b = base[r["model"]]
        r["ppl_dense"], r["ppl_pruned"] = dense, b["ppl_test"]
        gap = b["ppl_test"] - dense
        r["gap_closed"] = (b["ppl_test"] - r["ppl_after"]) / gap if gap > 0 else math.nan
        r["vs_pruned_inference"] = r["phase_peak_mb"] / b["phase_peak_mb"]
        r["infer_peak_mb"] = b["phase_peak_mb"]
        r["sparsity_start"] = b.get("sparsity", 0.0)
    return rows


def table(rows: list[dict]) -> str:
    out = [dict(r, steps_f=f"{r['steps']} / {r['forwards']}",
                ppl=f"{r['ppl_pruned']:.1f} → {r['ppl_after']:.1f}",
                time=f"{r['train_s']:.0f} / {r['train_cpu_s']:.0f}",
                sp=f"{r['sparsity_after']:.4f}") for r in rows]
    cols = [("row", "row"), ("steps_f", "steps / forwards"), ("lr", "lr"), ("eps", "eps"),
            ("ppl", "test ppl pruned → after"), ("gap_closed", "gap closed"),
            ("time", "train wall s / CPU s"), ("phase_peak_mb", "peak MiB"),
            ("vs_pruned_inference", "÷ pruned inference"), ("sp", "sparsity at end")]
    return C.markdown_table(out, cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=240, help="training wall seconds per row")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--jobs", type=int, default=2, help="stages run at once")
    ap.add_argument("--deadline-min", type=float, default=45,
                    help="start no stage after this many minutes (the rest are reported as "
                         "not run)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row-model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.common = ["--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads),
                "--budget-s", str(a.budget_s)]
    if a.worker is not None:
        kind, _, arg = a.worker.partition(":")
        fn = {"prune": worker_prune, "teacher": worker_teacher, "infer": worker_infer,
              "row": worker_train}[kind]
        C.emit_result(dict(fn(a, arg), **C.env_info(a.threads)))
        return 0
    work().mkdir(parents=True, exist_ok=True)
    rows_wanted = [r for r in a.rows.split(",") if r]
    items = plan_items(rows_wanted)
    done = {f"prune:{m}" for m in PRUNED if (work() / m / "config.json").exists()}
    if (work() / "teacher" / "header.json").exists():
        done.add("teacher")
    items = [(i, d) for i, d in items if i not in done]
    results, base, errors, skipped = {}, {}, [], []
    cv, t_start = threading.Condition(), time.perf_counter()

    def take():
        with cv:
            while True:
                if time.perf_counter() - t_start > a.deadline_min * 60:
                    skipped.extend(i for i, _ in items)
                    items.clear()
                if not items:
                    return None
                failed = {e.split(" ")[0] for e in errors}
                for k, (item, deps) in enumerate(items):
                    if any(d in failed or d in skipped for d in deps):
                        skipped.append(item)
                        items.pop(k)
                        break
                    if all(d in done for d in deps):
                        return items.pop(k)[0]
                else:
                    cv.wait(10)

    def lane():
        while (item := take()) is not None:
            t = time.perf_counter()
            try:
                kind, _, arg = item.partition(":")
                if kind == "row":
                    with cv:
                        st = resolve(arg, results)
                    r = run_worker(a, item, ["--row-model", ROWS[arg][0], "--settings",
                                             json.dumps(st)])
                    r["settings"], r["picked"] = st, st.get("picked", "")
                    msg = (f"{r['steps']} steps, ppl {r['ppl_before']:.2f} -> "
                           f"{r['ppl_after']:.2f}, train {r['train_s']:.0f} s / "
                           f"{r['train_cpu_s']:.0f} CPU s, peak {r['phase_peak_mb']:.0f} MiB")
                else:
                    r = run_worker(a, item)
                    msg = (f"ppl {r['ppl_test']:.2f} peak {r['phase_peak_mb']:.0f} MiB"
                           if kind == "infer" else "")
                with cv:
                    if kind == "row":
                        results[arg] = r
                    elif kind == "infer":
                        base[arg] = r
                    done.add(item)
                    cv.notify_all()
                print(f"{item}: {msg} ({time.perf_counter() - t:.0f} s)", flush=True)
            except Exception as exc:  # keep the other stages going; report at the end
                with cv:
                    errors.append(f"{item} {exc}")
                    cv.notify_all()
                print(f"FAILED {item}: {exc}", flush=True)

    lanes = [threading.Thread(target=lane) for _ in range(a.jobs)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    rows = finish([dict(results[r], **{"settings": json.dumps(results[r]["settings"])})
                   for r in rows_wanted if r in results and ROWS[r][0] in base and "dense" in base],
                  base)
    if not a.no_csv:
        C.append_csv(C.RESULTS / "bench_recovery.csv",
                     [dict(b, budget_s=a.budget_s) for b in base.values()] + rows)
    for m, b in base.items():
        print(f"{m}: test ppl {b['ppl_test']:.2f}, inference peak {b['phase_peak_mb']:.0f} MiB")
    print(f"budget: {a.budget_s:.0f} s of training wall clock per row; "
          f"total {time.perf_counter() - t_start:.0f} s")
    print(table(rows))
    for e in errors:
        print("FAILED", e)
    for s in skipped:
        print("NOT RUN (deadline or a failed dependency):", s)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
