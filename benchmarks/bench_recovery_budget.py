"""A memory budget where Adam + backprop does not fit and ZO recovers the pruned model (issue 15).

    python benchmarks/bench_recovery_budget.py --factor 1.15 --steps 30 --threads 1

On Wanda-50 % SmolLM2-135M (bench_recovery.py's model, batch 4 x 64, fp32), each stage in a
fresh process:

  infer     the pruned (and dense) model's test perplexity and inference peak RSS at 4 x 64
            (bench_recovery.py's ``infer`` stage); the budget is ``--factor`` x that peak
  planner   ``zoengine.sparsity.memory.plan`` for "adam" (full Adam + backprop), "lora-adam"
            (LoRA r=8 on q/v with Adam: a lower bound for the benchmark's masked LoRA on five
            projections) and "mezo" at that budget, with the planner's usual freedom (batch,
            sequence length, bf16); and ``predict`` of each at 4 x 64 fp32
  adam      bench_recovery.py's ``adam-lora-lm`` row (AdamW + backprop on masked LoRA, the
            cheapest backprop row there) at batch ``--adam-batch`` x 64 (default 1, below the
            planner's choice for "lora-adam"), ``--adam-s`` seconds: its measured peak vs the
            budget. The planner's "lora-adam" does not know that a masked adapter keeps each
            layer's dense masked delta for backward (docs/sparsity.md), one weight-sized fp32
            tensor per wrapped layer
  zo        ``zoengine train --model <wanda50> --task shakespeare --train full --keep-zeros
            --max-memory <budget> --steps N --batch-size 4 --block-size 64 --lr 3e-5``, the CLI
            as a user runs it: its plan (printed), measured peak (``metrics.json``: VmHWM from
            after planning to the end, both evaluations included), test perplexity before and
            after (the same 64 test blocks as bench_recovery.py), gap closed

Rows go to benchmarks/results/bench_recovery_budget.csv; the run folder of the CLI job goes to
the cache and is deleted after its metrics are read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_recovery as R  # noqa: E402

MODEL = "wanda50"
CSV = C.RESULTS / "bench_recovery_budget.csv"
ADAM = {"train": "adam", "lr": 1e-3, "eps": ""}


def planner_rows(budget_mib: int) -> list[dict]:
    """What the planner says at ``budget_mib`` (from the model folder's config; runtime 420 MiB),
    and its prediction at the benchmark's own 4 x 64 fp32."""
    from transformers import AutoConfig

    from zoengine.sparsity import memory

    cfg = AutoConfig.from_pretrained(R.model_dir(MODEL))
    rows = []
    for method in ("adam", "lora-adam", "mezo"):
        pred = memory.predict(cfg, method, 4, 64, masks=method == "mezo").predicted / 2**20
        row = {"row": f"plan:{method}", "method": method, "budget_mb": budget_mib,
               "predicted_4x64_fp32_mb": pred}
        try:
            p = memory.plan(cfg, f"{budget_mib}MiB", method, batch_size=4, seq_len=64,
                            masks=method == "mezo")
            row.update(fits=True, plan=p.describe(), plan_predicted_mb=p.predicted / 2**20)
        except memory.MemoryBudgetError as exc:
            row.update(fits=False, plan=str(exc),
                       plan_predicted_mb=exc.smallest.predicted / 2**20)
        rows.append(row)
    return rows


def cli_row(a, budget_mib: int) -> dict:
    """``zoengine train ... --max-memory`` in a fresh process; its plan, peak and perplexities."""
    out = R.work() / f"budget-run-{os.getpid()}"
    cmd = [str(Path(sys.executable).parent / "zoengine"), "train", "--model", R.model_dir(MODEL),
           "--task", "shakespeare", "--train", "full", "--keep-zeros", "--max-memory",
           f"{budget_mib}MiB", "--steps", str(a.steps), "--batch-size", "4", "--block-size",
           "64", "--eval-batch-size", "4", "--lr", "3e-5", "--eps", "1e-3", "--seed", "0",
           "--threads", str(a.threads), "--checkpoint-every", "0", "--checkpoint-minutes", "0",
           "--no-progress", "--output-dir", str(out)]
    log = R.work() / "logs" / "budget-zo-cli.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=C.ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if status != 0 or not (out / "metrics.json").exists():
        raise RuntimeError(f"zoengine train failed (status {status}); see {log}")
    m = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out)  # the run folder this function created (538 MB of weights)
    plan_line = next((ln for ln in text.splitlines() if ln.startswith("plan: ")), "")
    mem = m.get("memory", {})
    return {"row": "zo-cli-max-memory", "method": "mezo", "budget_mb": budget_mib,
            "steps": a.steps, "forwards": 2 * a.steps, "plan": plan_line.strip(),
            "phase_peak_mb": mem.get("measured_peak_bytes", math.nan) / 2**20,
            "plan_predicted_mb": mem.get("predicted_peak_bytes", math.nan) / 2**20,
            "ppl_before": m["before"]["test"]["perplexity"],
            "ppl_after": m["after"]["test"]["perplexity"],
            "sparsity_after": json.dumps(m.get("sparsity_after", {}).get("sparsity")),
            "train_s": m["timing"].get("train_s", ""), "proc_wall_s": wall,
            "proc_cpu_s": ru.ru_utime + ru.ru_stime, "loadavg_start": load0,
            "loadavg_end": os.getloadavg()[0], "command": " ".join(cmd[1:])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factor", type=float, default=1.15,
                    help="budget = factor x the pruned model's measured inference peak")
    ap.add_argument("--steps", type=int, default=30, help="ZO steps of the CLI run")
    ap.add_argument("--adam-s", type=float, default=40, help="seconds of the Adam row")
    ap.add_argument("--adam-batch", type=int, default=1, help="batch of the Adam row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-csv", action="store_true")
    a = ap.parse_args(argv)
    a.common = ["--batch", "4", "--seq", "64", "--threads", str(a.threads),
                "--budget-s", str(a.adam_s)]
    base = {m: R.run_worker(a, f"infer:{m}") for m in (MODEL, "dense")}
    inf = base[MODEL]["phase_peak_mb"]
    budget = int(math.ceil(a.factor * inf))
    print(f"pruned inference peak {inf:.0f} MiB -> budget {budget} MiB ({a.factor}x)", flush=True)
    rows = planner_rows(budget)
    a.common[1] = str(a.adam_batch)
    adam = R.run_worker(a, "row:adam-lora-lm@wanda50",
                        ["--row-model", MODEL, "--settings", json.dumps(ADAM)])
    adam.update(row="adam-lora-measured", method="lora-adamw+backprop", budget_mb=budget)
    print(f"adam: peak {adam['phase_peak_mb']:.0f} MiB vs budget {budget} MiB", flush=True)
    zo = cli_row(a, budget)
    print(f"zo: peak {zo['phase_peak_mb']:.0f} MiB, ppl {zo['ppl_before']:.2f} -> "
          f"{zo['ppl_after']:.2f}", flush=True)
    dense, pruned = base["dense"]["ppl_test"], base[MODEL]["ppl_test"]
    for r in (adam, zo):
        r.update(ppl_dense=dense, ppl_pruned=pruned, infer_peak_mb=inf,
                 gap_closed=(pruned - r["ppl_after"]) / (pruned - dense),
                 vs_pruned_inference=r["phase_peak_mb"] / inf,
                 within_budget=r["phase_peak_mb"] <= budget)
    env = C.env_info(a.threads)
    rows = [dict(r, factor=a.factor, **env) for r in (*rows, adam, zo)]
    if not a.no_csv:
        C.append_csv(CSV, rows)
    cols = [("row", "row"), ("budget_mb", "budget MiB"), ("predicted_4x64_fp32_mb",
            "predicted 4x64 fp32 MiB"), ("fits", "planner: fits"), ("phase_peak_mb",
            "measured peak MiB"), ("vs_pruned_inference", "× inference"),
            ("within_budget", "≤ budget"), ("ppl_before", "ppl before"),
            ("ppl_after", "ppl after"), ("gap_closed", "gap closed")]
    print(f"dense {dense:.2f}, pruned {pruned:.2f}, inference peak {inf:.0f} MiB")
    print(C.markdown_table(rows, cols))
    for r in rows:
        if r.get("plan"):
            print(f"{r['row']}: {r['plan']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
