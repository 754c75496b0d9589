"""Recover pruned SmolLM2-135M under one wall-clock budget per row (issue 15).

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
  norms rows MeZO on the normalisation gains only (``--train norms``, 35,136 parameters; no
             pruned weight is trained, so no mask is needed)

The 30-minute run (issue 15's budget; ~100 min for six rows, two at a time):

    python benchmarks/bench_recovery.py --budget-s 1800 --curve-every 300 --deadline-min 80 \
        --rows zo-norms-lm@wanda50,zo-norms-lm-2x@wanda50,zo-full-lm@wanda50,\
zo-norms-kd@wanda50,zo-norms-lm@wanda24,zo-norms-lm@channels25

The rest of the issue's matrix (2:4 and channels 25 %: full KD+LM, masked LoRA and rsLoRA
with LM and KD+LM, AdamW + backprop on masked LoRA), at the first budget, ~40 min:

    python benchmarks/bench_recovery.py --budget-s 240 --jobs 2 --threads 1 --rows matrix-rest

``--curve-every S`` measures the test perplexity every S training seconds (the clock stops
meanwhile) and plots gap closed against time (bench_recovery_curves.png).

Peak: VmHWM reset after loading and setting up (optimizer built), so it covers before-eval,
training and after-eval; ``vs_pruned_inference`` divides it by the pruned model's ``infer``
peak. Full rows pass ``masks="zeros"`` (as ``zoengine train --keep-zeros``), and the sparsity
is counted from the zeros before and after, with no mask dict kept. Before 2026-12-02 17:20 the
rows built a dict of bool masks (101 MiB) plus a packed copy and freed the dict before the
window; glibc kept the freed heap fragmented and the peak read 1.10-1.17x instead of 1.05x
(docs/sparsity.md, "Recovering a pruned model"). The machine is shared: CPU seconds are
recorded next to wall seconds.
Rows go to benchmarks/results/bench_recovery.csv; the markdown table is printed. The stages'
code is in _recovery.py (shared with bench_recovery_methods.py and bench_recovery_budget.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _recovery import (  # noqa: E402,F401
    LORA_TARGETS,
    _load,
    model_dir,
    work,
    worker_infer,
    worker_prune,
    worker_teacher,
    worker_train,
)

PRUNED = ("wanda50", "wanda24", "channels25")
FULL = {"train": "full", "lr": 3e-5, "eps": 1e-3}
# the normalisation gains only (--train norms): 35,136 parameters; lr from a 240 s sweep on
# Wanda 50 % (one core each, two at once): 3e-5 closed 12 %, 1e-4 23 %, 2e-4 26 %; 4e-4 was
# at 170 after 60 s and 225 (worse than pruned) after 240 s, 1e-3 diverged
NORMS = {"train": "norms", "lr": 1e-4, "eps": 1e-3}
LORA = {"train": "lora", "lr": 2e-3, "eps": 1e-2, "scaling": "lora"}
KD = {"objective": "kd+lm", "kd_weight": 0.5}
ROWS = {  # name -> (model, settings); "best" rows are resolved from finished rows at run time
    "zo-full-lm@wanda50": ("wanda50", FULL),
    "zo-lora-lm@wanda50": ("wanda50", LORA),
    "zo-lora-kd@wanda50": ("wanda50", dict(LORA, **KD)),
    "zo-full-kd@wanda50": ("wanda50", dict(FULL, **KD)),
    "zo-rslora-best@wanda50": ("wanda50", "best-lora"),
    "adam-lora-lm@wanda50": ("wanda50", {"train": "adam", "lr": 1e-3, "eps": ""}),
    "zo-best@wanda24": ("wanda24", "best"),
    # the same, fixed (what the "best" rows resolved to on 2026-12-02)
    "zo-rslora-lm@wanda50": ("wanda50", dict(LORA, scaling="rslora")),
    # rsLoRA's scale alpha/sqrt(r) is sqrt(8) = 2.83x LoRA's alpha/r at r = 8: the same
    # effective step needs lr / 2.83 (at LoRA's lr the LM row diverged)
    "zo-rslora-lm-lr@wanda50": ("wanda50", dict(LORA, scaling="rslora", lr=7e-4)),
    "zo-rslora-kd-lr@wanda50": ("wanda50", dict(LORA, **KD, scaling="rslora", lr=7e-4)),
    "zo-full-lm@wanda24": ("wanda24", FULL),
    "zo-full-lm@channels25": ("channels25", FULL),
    "zo-norms-lm@wanda50": ("wanda50", NORMS),
    "zo-norms-lm-2x@wanda50": ("wanda50", dict(NORMS, lr=2e-4)),
    "zo-norms-kd@wanda50": ("wanda50", dict(NORMS, **KD)),
    "zo-norms-lm@wanda24": ("wanda24", NORMS),
    "zo-norms-lm@channels25": ("channels25", NORMS),
}
# the rest of the issue's matrix on 2:4 and channels 25 %, with Wanda 50 %'s settings
MATRIX_REST = [f"{name}@{m}" for m in ("wanda24", "channels25") for name in (
    "zo-full-kd", "zo-lora-lm", "zo-lora-kd", "zo-rslora-lm-lr", "zo-rslora-kd-lr",
    "adam-lora-lm")]
ROWS.update({r: (r.split("@")[1], ROWS[r.split("@")[0] + "@wanda50"][1]) for r in MATRIX_REST})
CSV_PATH = C.RESULTS / "bench_recovery.csv"
CURVES_PNG = C.RESULTS / "bench_recovery_curves.png"
DEFAULT_ROWS = ["zo-full-lm@wanda50", "zo-full-kd@wanda50", "zo-lora-lm@wanda50",
                "zo-lora-kd@wanda50",
                "zo-rslora-best@wanda50", "adam-lora-lm@wanda50", "zo-best@wanda24",
                "zo-full-lm@channels25"]


# ---- driver ----------------------------------------------------------------------------------

def stage_log(stage: str) -> Path:
    return work() / "logs" / f"{stage.replace(':', '-').replace('@', '-')}.log"


def run_worker(a, stage: str, extra=()) -> dict:
    """``stage`` in a fresh interpreter; its result, with the child's own wall and CPU time."""
    return C.run_logged(Path(__file__), ["--worker", stage, *a.common, *extra], stage_log(stage))


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
        if "-kd" in r or ROWS[r][1] in ("best", "best-lora"):
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
    if not rows:
        return rows
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


def curve_rows(csv_path: Path, budget_s: float) -> list[dict]:
    """The newest row of each name at ``budget_s`` that recorded a perplexity curve."""
    if not csv_path.exists():
        return []
    newest: dict[str, dict] = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            if not r.get("curve") or not r.get("budget_s") or float(r["budget_s"]) != budget_s:
                continue
            if r["row"] not in newest or r["timestamp_utc"] > newest[r["row"]]["timestamp_utc"]:
                newest[r["row"]] = r
    return list(newest.values())


FLOOR = -0.25  # gap closed below this is drawn at it (diverged rows)


def plot_curves(rows: list[dict], path: Path) -> bool:
    """Gap closed against training minutes, one line per row, one panel per pruned model
    (Wanda 50 % apart: most rows are there)."""
    rows = [r for r in rows if len(json.loads(r.get("curve") or "[]")) > 1]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Wanda 50 % unstructured", [r for r in rows if r["model"] == "wanda50"]),
              ("Wanda 2:4 and channels 25 %", [r for r in rows if r["model"] != "wanda50"])]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), sharey=True,
                             squeeze=False)
    for ax, (title, group) in zip(axes[0], panels):
        for r in sorted(group, key=lambda r: r["row"]):
            pruned, dense = float(r["ppl_pruned"]), float(r["ppl_dense"])
            pts = [(0.0, 0.0)] + [(t / 60, (pruned - p) / (pruned - dense))
                                  for t, _, p in json.loads(r["curve"])]
            label = r["row"].split("@")[0] if title.startswith("Wanda 50") else r["row"]
            if pts[-1][1] < FLOOR:  # a diverged row would squash every other line
                label += f" (diverged: ppl {float(pts[-1][1]) * (dense - pruned) + pruned:.3g})"
            ax.plot(*zip(*[(t, max(g, FLOOR)) for t, g in pts]), marker=".", label=label)
        ax.axhline(1 / 3, color="grey", ls="--", lw=0.8)
        ax.axhline(1 / 2, color="grey", ls=":", lw=0.8)
        ax.text(0.3, 1 / 3 + 0.01, "target: a third", color="grey", fontsize=8)
        ax.text(0.3, 1 / 2 + 0.01, "stretch: a half", color="grey", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=FLOOR - 0.02)
        ax.set_xlabel("training wall clock (min, one core per row)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("perplexity gap closed (held-out Shakespeare)")
    fig.suptitle("Recovering pruned SmolLM2-135M by ZO, same clock per row")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class Lanes:
    """Runs the stages on ``a.jobs`` threads, in priority order, each once its dependencies are
    done; a failed stage's dependents, and everything after ``a.deadline_min``, are skipped."""

    def __init__(self, a, items: list, done: set):
        self.a, self.items, self.done = a, items, done
        self.results, self.base, self.errors, self.skipped = {}, {}, [], []
        self.cv, self.t_start = threading.Condition(), time.perf_counter()

    def take(self):
        with self.cv:
            while True:
                if time.perf_counter() - self.t_start > self.a.deadline_min * 60:
                    self.skipped.extend(i for i, _ in self.items)
                    self.items.clear()
                if not self.items:
                    return None
                failed = {e.split(" ")[0] for e in self.errors}
                for k, (item, deps) in enumerate(self.items):
                    if any(d in failed or d in self.skipped for d in deps):
                        self.skipped.append(item)
                        self.items.pop(k)
                        break
                    if all(d in self.done for d in deps):
                        return self.items.pop(k)[0]
                else:
                    self.cv.wait(10)

    def run_item(self, item: str) -> str:
        kind, _, arg = item.partition(":")
        if kind == "row":
            with self.cv:
                st = resolve(arg, self.results)
            r = run_worker(self.a, item, ["--row-model", ROWS[arg][0], "--settings",
                                          json.dumps(st)])
            r["settings"], r["picked"] = st, st.get("picked", "")
            msg = (f"{r['steps']} steps, ppl {r['ppl_before']:.2f} -> {r['ppl_after']:.2f}, "
                   f"train {r['train_s']:.0f} s / {r['train_cpu_s']:.0f} CPU s, peak "
                   f"{r['phase_peak_mb']:.0f} MiB")
        else:
            r = run_worker(self.a, item)
            msg = (f"ppl {r['ppl_test']:.2f} peak {r['phase_peak_mb']:.0f} MiB"
                   if kind == "infer" else "")
        with self.cv:
            if kind == "row":
                self.results[arg] = r
            elif kind == "infer":
                self.base[arg] = r
            self.done.add(item)
            self.cv.notify_all()
        return msg

    def lane(self):
        while (item := self.take()) is not None:
            t = time.perf_counter()
            try:
                msg = self.run_item(item)
                print(f"{item}: {msg} ({time.perf_counter() - t:.0f} s)", flush=True)
            except Exception as exc:  # keep the other stages going; report at the end
                with self.cv:
                    self.errors.append(f"{item} {exc}")
                    self.cv.notify_all()
                print(f"FAILED {item}: {exc}", flush=True)

    def run(self) -> Lanes:
        lanes = [threading.Thread(target=self.lane) for _ in range(self.a.jobs)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
        return self


def from_logs(rows_wanted: list[str]):
    """The results a stopped driver had finished, read back from its stages' logs (each
    worker prints its result line before exiting); what has no result line is reported."""
    def read(stage: str):
        log = stage_log(stage)
        return C.result_in(log.read_text().splitlines()) if log.exists() else None

    results = {}
    for r in rows_wanted:
        if (x := read(f"row:{r}")) is not None:
            st = ROWS[r][1] if isinstance(ROWS[r][1], dict) else {}
            results[r] = dict(x, settings=st, picked="")
    models = {"dense"} | {ROWS[r][0] for r in results}
    base = {m: x for m in sorted(models) if (x := read(f"infer:{m}")) is not None}
    missing = [r for r in rows_wanted if r not in results]
    return results, base, [], missing, time.perf_counter()


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
    ap.add_argument("--curve-every", type=float, default=0,
                    help="test perplexity every this many training seconds (0: before and "
                         "after only; the clock stops while it is measured)")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--plot", action="store_true",
                    help="only redraw results/bench_recovery_curves.png from the CSV's rows "
                         "at --budget-s")
    ap.add_argument("--from-logs", action="store_true",
                    help="run nothing: rebuild the rows (and their baselines) from the stage "
                         "logs of an earlier run that was stopped before writing the CSV")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row-model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.common = ["--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads),
                "--budget-s", str(a.budget_s), "--curve-every", str(a.curve_every)]
    if a.plot:
        ok = plot_curves(curve_rows(CSV_PATH, a.budget_s), CURVES_PNG)
        print("wrote" if ok else f"no curves at --budget-s {a.budget_s} in {CSV_PATH}; kept",
              CURVES_PNG)
        return 0 if ok else 1
    if a.worker is not None:
        kind, _, arg = a.worker.partition(":")
        fn = {"prune": worker_prune, "teacher": worker_teacher, "infer": worker_infer,
              "row": worker_train}[kind]
        C.emit_result(dict(fn(a, arg), **C.env_info(a.threads)))
        return 0
    work().mkdir(parents=True, exist_ok=True)
    rows_wanted = MATRIX_REST if a.rows == "matrix-rest" else [r for r in a.rows.split(",") if r]
    unknown = [r for r in rows_wanted if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown row(s) {unknown}; known: {sorted(ROWS)} or 'matrix-rest'")
    if a.from_logs:
        results, base, errors, skipped, t_start = from_logs(rows_wanted)
    else:
        done = {f"prune:{m}" for m in PRUNED if (work() / m / "config.json").exists()}
        if (work() / "teacher" / "header.json").exists():
            done.add("teacher")
        items = [(i, d) for i, d in plan_items(rows_wanted) if i not in done]
        run = Lanes(a, items, done).run()
        results, base, errors, skipped, t_start = (run.results, run.base, run.errors,
                                                   run.skipped, run.t_start)
    rows = finish([dict(results[r], **{"settings": json.dumps(results[r]["settings"])})
                   for r in rows_wanted if r in results and ROWS[r][0] in base and "dense" in base],
                  base)
    if not a.no_csv:
        C.append_csv(CSV_PATH,
                     [dict(b, budget_s=a.budget_s) for b in base.values()] + rows)
    for m, b in base.items():
        print(f"{m}: test ppl {b['ppl_test']:.2f}, inference peak {b['phase_peak_mb']:.0f} MiB")
    print(f"budget: {a.budget_s:.0f} s of training wall clock per row; "
          f"total {time.perf_counter() - t_start:.0f} s")
    print(table(rows))
    if not a.no_csv and plot_curves(curve_rows(CSV_PATH, a.budget_s), CURVES_PNG):
        print("wrote", CURVES_PNG)
    for e in errors:
        print("FAILED", e)
    for s in skipped:
        print("NOT RUN (deadline or a failed dependency):", s)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
