"""MeZO vs KerZOO vs DiZO on the best ZO recovery configuration, for the same forwards (issue 15).

    python benchmarks/bench_recovery_methods.py --forwards 140 --threads 1

The configuration is bench_recovery.py's best ZO row, ``zo-full-lm@wanda50``: SmolLM2-135M,
Wanda 50 % unstructured, full-parameter ZO on the LM loss of the Shakespeare train split, batch
4 x 64, lr 3e-5, eps 1e-3, seed 0, the pruned zeros kept (``masks="zeros"``, what
``zoengine train --keep-zeros`` passes). Each method runs in a fresh process:

  mezo     ``create("mezo", ...)``
  kerzoo   ``create("kerzoo", ...)``: kernel order 3, r ~ U[-1, 1] (the class defaults)
  dizo     ``create("dizo", ..., projected="code")`` (attention k_proj/v_proj, what
           ``zoengine train --method dizo --train full`` projects); the other DiZO settings are
           the paper's (10 search iterations, eps_p 0.1, lr_p 2, tau 0.2) except the interval
           (``--dizo-interval``, default 20 instead of 50, so that the budget holds two
           projections); its search batches come from a separate random stream

Same data: step ``s`` trains on the blocks drawn by ``RandomState(s)`` in every method (DiZO's
search draws from ``RandomState(10**6 + 100 s + i)``). Every loss evaluation is counted as a
forward (a counter inside the closures), DiZO's search included; a run stops at ``--forwards``.

Measured, per method: the step loss (the mean of the step's two evaluations, what the optimizer
sees) against forwards, smoothed by a trailing mean over ``--window`` steps; a *probe* loss on 8
fixed training blocks every ``--probe-every`` forwards (not counted: same blocks for every
method and point, so it has no batch-to-batch noise); held-out perplexity before and after (the
test split, 64 blocks, as bench_recovery.py); the peak RSS of the window (set up, eval, train,
eval) and the CPU seconds. Reported for KerZOO and DiZO: the forwards they need to reach MeZO's
final smoothed step loss (and final probe loss), or "not reached within N forwards".
Rows: benchmarks/results/bench_recovery_methods.csv (+ _curves.csv); plot: the .png.

``--train norms`` runs the same comparison on the normalisation gains only (the fastest
recovery in bench_recovery.py: lr 1e-4, no masks needed; DiZO projects every gain):
curves and plot go to bench_recovery_methods_norms_curves.csv / _norms.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_recovery as R  # noqa: E402

METHODS = ("mezo", "kerzoo", "dizo")
MODEL = "wanda50"
SETTINGS = {"full": R.FULL, "norms": R.NORMS}  # --train: bench_recovery.py's lr and eps
CSV = C.RESULTS / "bench_recovery_methods.csv"


def outputs(train: str) -> tuple[Path, Path]:
    """(curves CSV, plot) of one trainable set; ``full`` keeps the first run's file names."""
    tail = "" if train == "full" else f"_{train}"
    return (C.RESULTS / f"bench_recovery_methods{tail}_curves.csv",
            C.RESULTS / f"bench_recovery_methods{tail}.png")


def loadavg() -> float:
    return os.getloadavg()[0]


class Counted:
    """Loss closures that count their forwards."""

    def __init__(self, net):
        self.net, self.forwards = net, 0

    def closure(self, batch):
        from zoengine.tasks import lm_loss

        def f():
            self.forwards += 1
            return lm_loss(self.net, batch)
        return f


def build(method: str, model, counted: Counted, train, a):
    import numpy as np
    import torch

    from zoengine.optim import create

    st = SETTINGS[a.train]
    if a.train == "norms":  # the gains only: no pruned weight is trained, no mask needed
        from zoengine.sparsity.norms import train_norms_only

        params, kw = train_norms_only(model), {}
    else:
        params, kw = list(model.named_parameters()), {"masks": "zeros"}
    if method == "dizo":
        opt_box, calls = [], {"step": -1, "i": 0}

        def fresh():  # a new search batch per iteration, from its own stream
            step = opt_box[0].state["zo"]["step"]
            if step != calls["step"]:
                calls.update(step=step, i=0)
            calls["i"] += 1
            rng = np.random.RandomState(10**6 + 100 * step + calls["i"])
            return counted.closure(train[torch.as_tensor(rng.randint(0, len(train), a.batch))])
        kw.update(projected="code" if a.train == "full" else "all", interval=a.dizo_interval,
                  projection_closure=fresh)
    opt = create(method, params, lr=st["lr"], eps=st["eps"], seed=0, **kw)
    if method == "dizo":
        opt_box.append(opt)
    return opt


def probe(net, blocks) -> float:
    from zoengine.tasks import lm_eval

    return lm_eval(net, blocks, 4)["loss"]


def train_loop(opt, counted, train, probe_blocks, a) -> tuple[list, float, float]:
    """Steps until ``a.forwards``; the curve: one dict per step (and per probe point)."""
    import numpy as np
    import torch

    curve = [{"step": 0, "forwards": 0, "probe": probe(counted.net, probe_blocks)}]
    next_probe, step = a.probe_every, 0
    t0, c0 = time.perf_counter(), time.process_time()
    while counted.forwards < a.forwards:
        rng = np.random.RandomState(step)
        b = train[torch.as_tensor(rng.randint(0, len(train), a.batch))]
        with torch.no_grad():
            loss = float(opt.step(counted.closure(b)))
        step += 1
        point = {"step": step, "forwards": counted.forwards, "loss": loss}
        if counted.forwards >= next_probe or counted.forwards >= a.forwards:
            point["probe"] = probe(counted.net, probe_blocks)
            next_probe += a.probe_every
        curve.append(point)
    return curve, time.perf_counter() - t0, time.process_time() - c0


def worker(a, method: str) -> dict:
    import gc

    import numpy as np
    import torch

    from zoengine import sparsity as S
    from zoengine.sparsity import memory
    from zoengine.tasks import lm_eval

    load0 = loadavg()
    model, _, blocks = R._load(a, MODEL)
    zeros_start = S.sparsity_report(model)["zeros"]  # counted per tensor, nothing kept
    train = blocks["train"]
    probe_blocks = train[torch.as_tensor(np.random.RandomState(12345).choice(len(train), 8,
                                                                             replace=False))]
    counted = Counted(model)
    opt = build(method, model, counted, train, a)
    gc.collect()
    memory.reset_peak()
    before = lm_eval(model, blocks["test"], a.batch)
    curve, train_s, train_cpu = train_loop(opt, counted, train, probe_blocks, a)
    after = lm_eval(model, blocks["test"], a.batch)
    peak = memory.peak_memory() / 2**20
    zeros_end = S.sparsity_report(model)["zeros"]
    st = SETTINGS[a.train]
    res = {"row": f"{method}@{MODEL}", "method": method, "model": MODEL, "train": a.train,
           "steps": curve[-1]["step"], "forwards": counted.forwards, "lr": st["lr"],
           "eps": st["eps"],
           "ppl_before": before["perplexity"], "ppl_after": after["perplexity"],
           "train_s": train_s, "train_cpu_s": train_cpu, "phase_peak_mb": peak,
           "zeros_start": zeros_start, "zeros_end": zeros_end,
           "sparsity_exact": zeros_end == zeros_start, "mask_bytes": opt.mask_bytes(),
           "batch": a.batch, "seq": a.seq, "loadavg_start": load0, "loadavg_end": loadavg(),
           "curve": curve}
    if method == "dizo":
        res["dizo"] = json.dumps(opt.projection_summary())
        res["dizo_interval"] = a.dizo_interval
    return res


# ---- analysis --------------------------------------------------------------------------------

def smooth(curve: list[dict], window: int) -> list[tuple[int, float]]:
    """(forwards, trailing mean of the last ``window`` step losses), once the window is full."""
    losses = [(p["forwards"], p["loss"]) for p in curve if "loss" in p]
    return [(f, sum(x for _, x in losses[i - window + 1:i + 1]) / window)
            for i, (f, _) in enumerate(losses) if i >= window - 1]


def reach(points: list[tuple[int, float]], target: float) -> int | None:
    """The first forwards count whose value is at or below ``target``."""
    return next((f for f, v in points if v <= target), None)


def paired(curve: list[dict], ref: list[dict], window: int) -> float:
    """Mean of (loss - MeZO's loss at the same step) over this run's last ``window`` steps: step
    s trains on the same batch in every method, so the batch-to-batch noise cancels (at equal
    steps, not equal forwards: DiZO's searches add forwards between steps)."""
    mine = {p["step"]: p["loss"] for p in curve if "loss" in p}
    theirs = {p["step"]: p["loss"] for p in ref if "loss" in p}
    steps = [s for s in sorted(mine) if s in theirs][-window:]
    return sum(mine[s] - theirs[s] for s in steps) / len(steps) if steps else math.nan


def from_curves(path: Path) -> dict:
    """The last recorded run of each method, rebuilt from the curves CSV (for re-analysis)."""
    import csv

    rows: dict = {}
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            r = rows.setdefault(rec["method"], {"method": rec["method"], "curve": [], "t": ""})
            if rec["timestamp_utc"] != r["t"]:
                r.update(curve=[], t=rec["timestamp_utc"])
            p = {"step": int(rec["step"]), "forwards": int(rec["forwards"])}
            p.update({k: float(rec[c]) for k, c in (("loss", "loss"), ("probe", "probe_loss"))
                      if rec[c] != ""})
            r["curve"].append(p)
    for r in rows.values():
        r["forwards"] = r["curve"][-1]["forwards"]
    return rows


def analyse(rows: dict, window: int) -> None:
    """Adds final smoothed / probe losses, and forwards to MeZO's, to every row."""
    for r in rows.values():
        sm = smooth(r["curve"], window)
        pr = [(p["forwards"], p["probe"]) for p in r["curve"] if "probe" in p]
        r["final_smoothed_loss"], r["final_probe_loss"] = sm[-1][1], pr[-1][1]
        r["probe_loss_start"], r["window_steps"] = pr[0][1], window
    if "mezo" not in rows:
        return
    ref = rows["mezo"]
    for r in rows.values():
        sm = smooth(r["curve"], window)
        pr = [(p["forwards"], p["probe"]) for p in r["curve"] if "probe" in p]
        f1 = reach(sm, ref["final_smoothed_loss"])
        f2 = reach(pr[1:], ref["final_probe_loss"])
        r["forwards_to_mezo_smoothed"] = f1 if f1 is not None else ""
        r["forwards_to_mezo_probe"] = f2 if f2 is not None else ""
        r["paired_vs_mezo"] = paired(r["curve"], ref["curve"], window)
        r["reach_note"] = "; ".join(
            f"{what}: " + (f"{f} forwards" if f is not None else
                           f"not reached within {r['forwards']} forwards")
            for what, f in (("smoothed step loss", f1), ("probe loss", f2)))


def plot(rows: dict, window: int, path: Path, train: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, r in rows.items():
        sm = smooth(r["curve"], window)
        ax1.plot([f for f, _ in sm], [v for _, v in sm], label=m)
        pr = [(p["forwards"], p["probe"]) for p in r["curve"] if "probe" in p]
        ax2.plot([f for f, _ in pr], [v for _, v in pr], marker=".", label=m)
    if "mezo" in rows:
        ax1.axhline(rows["mezo"]["final_smoothed_loss"], color="grey", ls=":", lw=1)
        ax2.axhline(rows["mezo"]["final_probe_loss"], color="grey", ls=":", lw=1)
    ax1.set(xlabel="forward passes", ylabel=f"train loss (mean of last {window} steps)",
            title="step loss, smoothed")
    ax2.set(xlabel="forward passes", ylabel="loss on 8 fixed train blocks",
            title="probe loss (not counted as forwards)")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    what = {"full": "full ZO", "norms": "ZO on the norm gains"}[train]
    fig.suptitle(f"Wanda-50 % SmolLM2-135M, {what} on the LM loss, batch 4 x 64, "
                 f"lr {SETTINGS[train]['lr']:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_rows(rows: dict) -> list[dict]:
    out = []
    for m, r in rows.items():
        for p in r["curve"]:
            out.append({"method": m, "step": p["step"], "forwards": p["forwards"],
                        "loss": p.get("loss", ""), "probe_loss": p.get("probe", ""),
                        "git_sha": r["git_sha"], "timestamp_utc": r["timestamp_utc"]})
    return out


def table(rows: dict) -> str:
    out = [dict(r, ppl=f"{r['ppl_before']:.1f} → {r['ppl_after']:.1f}",
                time=f"{r['train_s']:.0f} / {r['train_cpu_s']:.0f}",
                sm=f"{r['final_smoothed_loss']:.4f}", pr=f"{r['final_probe_loss']:.4f}",
                peak=f"{r['phase_peak_mb']:.0f} ({r.get('vs_pruned_inference', math.nan):.2f}×)")
           for r in rows.values()]
    cols = [("method", "method"), ("steps", "steps"), ("forwards", "forwards"),
            ("sm", "final smoothed loss"), ("pr", "final probe loss"),
            ("reach_note", "forwards to MeZO's final loss"),
            ("paired_vs_mezo", "step loss − MeZO's, same steps"), ("ppl", "test ppl"),
            ("gap_closed", "gap closed"), ("time", "train wall s / CPU s"),
            ("peak", "peak MiB (× inference)")]
    return C.markdown_table(out, cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--forwards", type=int, default=140, help="forward passes per method")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--window", type=int, default=10, help="smoothing window, in steps")
    ap.add_argument("--probe-every", type=int, default=20, help="forwards between probes")
    ap.add_argument("--dizo-interval", type=int, default=20)
    ap.add_argument("--train", choices=sorted(SETTINGS), default="full",
                    help="the trainable set: all weights (pruned zeros kept by masks) or the "
                         "normalisation gains (--train norms)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--reanalyse", action="store_true",
                    help="recompute the analysis from the curves CSV, train nothing")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.budget_s = 0.0  # bench_recovery's workers read it; unused here
    extra = ["--forwards", str(a.forwards), "--probe-every", str(a.probe_every),
             "--dizo-interval", str(a.dizo_interval), "--train", a.train]
    a.common = ["--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads)]
    if a.worker is not None:
        C.emit_result(dict(worker(a, a.worker), **C.env_info(a.threads)))
        return 0
    if a.reanalyse:  # from the recorded curves: no training
        rows = from_curves(outputs(a.train)[0])
        analyse(rows, a.window)
        for m, r in rows.items():
            print(f"{m} ({r['t']}): final smoothed {r['final_smoothed_loss']:.4f}, probe "
                  f"{r['final_probe_loss']:.4f}, paired vs MeZO {r.get('paired_vs_mezo', '')}"
                  f"; {r.get('reach_note', '')}")
        return 0
    base = {m: R.run_worker(a, f"infer:{m}") for m in ("dense", MODEL)}  # bench_recovery's
    rows = {}
    for m in [m for m in a.methods.split(",") if m]:
        rows[m] = run_method(a, m, extra)
    analyse(rows, a.window)
    dense, pruned = base["dense"]["ppl_test"], base[MODEL]["ppl_test"]
    for r in rows.values():
        r.update(ppl_dense=dense, ppl_pruned=pruned, infer_peak_mb=base[MODEL]["phase_peak_mb"],
                 gap_closed=(pruned - r["ppl_after"]) / (pruned - dense),
                 vs_pruned_inference=r["phase_peak_mb"] / base[MODEL]["phase_peak_mb"],
                 window_steps=a.window, probe_every=a.probe_every)
    if not a.no_csv:
        C.append_csv(CSV, [{k: v for k, v in r.items() if k != "curve"} for r in rows.values()])
        curves, png = outputs(a.train)
        C.append_csv(curves, curve_rows(rows))
        plot(rows, a.window, png, a.train)
    print(f"dense {dense:.2f}, pruned {pruned:.2f} (test ppl); inference peak "
          f"{base[MODEL]['phase_peak_mb']:.0f} MiB")
    print(table(rows))
    return 0


def run_method(a, method: str, extra: list) -> dict:
    """One method in a fresh interpreter (this file's worker), with its wall and CPU time."""
    t0 = time.perf_counter()
    r = C.run_logged(Path(__file__), ["--worker", method, *a.common, *extra],
                     R.work() / "logs" / f"methods-{method}.log")
    print(f"{method}: {r['steps']} steps, {r['forwards']} forwards, ppl "
          f"{r['ppl_before']:.2f} -> {r['ppl_after']:.2f}, {r['train_s']:.0f} s "
          f"({time.perf_counter() - t0:.0f} s in all)", flush=True)
    return r


if __name__ == "__main__":
    raise SystemExit(main())
