"""Every ZO method on an equal forward budget, learning rate chosen per method on a dev split.

    python benchmarks/bench_methods.py                          # both setups, all methods
    python benchmarks/bench_methods.py --setup tiny --methods MeZO ZO-Adam --seeds 0 1 2

Setups (benchmarks/methods_setups.py): ``tiny`` — a character-level LLaMA (~94k parameters)
pretrained on Macbeth, every parameter fine-tuned on tweets (new text), batch 16 x 32;
``smollm2`` — SmolLM2-135M on the shipped tweet-sentiment task, its final norm and two
label rows (1,728 numbers) on cached features (bench_convergence.py).

Protocol: each method runs every learning rate of its grid (``GRIDS``) with every seed; a run
stops at the first step that reaches the forward budget (every forward counted: the 2n of a
step, the conservative rule's three, DiZO's search, FZOO's centre, HiZOO's extra). The lr of a
method is the one with the lowest mean final **dev** loss over the seeds (a run that diverges
disqualifies its lr). For that lr the summary gives final dev/test loss and accuracy (mean ±
sd), and the forwards, steps and thread-CPU seconds at which each seed's dev loss first
reached MeZO's mean final dev loss (evaluated every budget/30 forwards), with the optimizer
state the method keeps beside the weights. Rows: results/bench_methods.csv (every run),
bench_methods_curves.csv, bench_methods_summary.csv; plot bench_methods.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

RESULTS = _common.RESULTS
EPS = 1e-3
# name -> (registry name, keyword arguments); DiZO's projected set is per setup (below)
METHODS = {
    "MeZO": ("mezo", {}),
    "ZO-SGD-MMT": ("zo-sgd-mmt", {}),
    "ZO-SGD-Sign": ("zo-sgd-sign", {}),
    "ZO-Adam": ("zo-adam", {}),
    "ZO-SGD-Cons": ("zo-sgd-cons", {}),
    "KerZOO": ("kerzoo", {"kernel_order": 3, "r_range": 0.5}),
    "PeZO": ("pezo", {}),
    "DiZO": ("dizo", {"interval": 50}),
    "FZOO": ("fzoo", {}),
    "HiZOO": ("hizoo", {}),
    "Sparse-MeZO": ("sparse-mezo", {}),
    # LOZO's z = U·Vᵀ/√r (docs/lowrank.md) at its script's defaults r = 1, ν = 100; unit
    # variance per element, so MeZO's lr grid applies
    "MeZO-LowRank": ("mezo-lowrank", {"rank": 1, "resample_every": 100}),
}
DIZO_PROJECTED = {"tiny": "code", "smollm2": r"^head_(neg|pos)$"}
# lr grids per setup and method family: sgd-like steps scale with |g|·|z|, sign/Adam steps are
# lr per coordinate, so their grids sit lower; each grid spans 10x around a pilot's best.
# A best lr at a grid's top edge extended the grid (smollm2: first 3e-5..3e-4 for sgd-like;
# tiny: first 1e-4..1e-3, where Adam, sign, conservative, FZOO and Sparse-MeZO chose 1e-3).
_SGD = {"tiny": [1e-4, 3e-4, 1e-3, 3e-3], "smollm2": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]}
_PER_COORD = {"tiny": [1e-4, 3e-4, 1e-3, 3e-3], "smollm2": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}
GRIDS = {m: _SGD for m in METHODS}
GRIDS.update({"ZO-SGD-Sign": _PER_COORD, "ZO-Adam": _PER_COORD, "FZOO": _PER_COORD,
              "ZO-SGD-MMT": {"tiny": [1e-5, 3e-5, 1e-4], "smollm2": [3e-6, 1e-5, 3e-5, 1e-4]},
              "KerZOO": {"tiny": [3e-5, 1e-4, 3e-4], "smollm2": [1e-5, 3e-5, 1e-4, 3e-4]},
              "Sparse-MeZO": {"tiny": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "smollm2": _SGD["smollm2"]}})
GRIDS["FZOO"] = {"tiny": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "smollm2": _PER_COORD["smollm2"]}
BUDGET = {"tiny": 1500, "smollm2": 4000}  # tiny: ~15 ms a forward on this CPU, 99 runs


def build(name: str, setup_key: str, named, lr: float, seed: int):
    from zoengine.optim import create

    reg, kw = METHODS[name]
    if name == "DiZO":
        kw = dict(kw, projected=DIZO_PROJECTED[setup_key])
    return create(reg, named, lr=lr, eps=EPS, seed=seed, **kw)


def state_bytes(opt) -> int:
    """Bytes of every tensor the optimizer keeps (buffers, pool, masks, anchors)."""
    import torch

    seen, total = set(), 0
    for st in opt.state.values():
        for v in (st.values() if isinstance(st, dict) else ()):
            if isinstance(v, torch.Tensor) and id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
    if hasattr(opt, "anchor_bytes"):
        total += int(opt.anchor_bytes())
    return total


def run_one(setup, setup_key: str, method: str, lr: float, seed: int, budget: int,
            start: dict) -> dict:
    """One run from the setup's starting weights ``start``; returns finals and the curve."""
    import torch

    from zoengine.optim import NonFiniteLossError

    with torch.no_grad():
        for n, p in setup.named_parameters():
            p.copy_(start[n])
    fw = [0]

    def counted(closure):
        def f():
            fw[0] += 1
            return closure()
        return f

    batches, search = np.random.RandomState(seed), np.random.RandomState(seed + 7919)
    opt = build(method, setup_key, setup.named_parameters(), lr, seed)
    opt.set_batch_source(lambda step, k: counted(setup.train_closure(setup.sample(search))))
    every = budget // 30
    curve = [dict(forwards=0, steps=0, cpu_s=0.0, **setup.metrics())]
    cpu, steps, diverged, next_eval = 0.0, 0, False, every
    while fw[0] < budget:
        closure = counted(setup.train_closure(setup.sample(batches)))
        t0 = time.thread_time()
        try:
            loss = float(opt.step(closure))
        except (NonFiniteLossError, FloatingPointError):
            diverged = True
            break
        cpu += time.thread_time() - t0
        steps += 1
        if not math.isfinite(loss):
            diverged = True
            break
        if fw[0] >= next_eval or fw[0] >= budget:
            curve.append(dict(forwards=fw[0], steps=steps, cpu_s=cpu, **setup.metrics()))
            next_eval += every
    final = curve[-1] if not diverged else {k: math.nan for k in curve[-1]}
    return dict(setup=setup_key, method=method, lr=lr, seed=seed, diverged=diverged,
                forwards=fw[0], steps=steps, cpu_s=cpu, state_bytes=state_bytes(opt),
                param_bytes=sum(p.numel() * p.element_size() for _, p in
                                setup.named_parameters()),
                **{f"final_{k}": v for k, v in final.items() if k.endswith(("loss", "acc"))},
                curve=curve)


def select(runs: list[dict]) -> dict:
    """method -> (lr, its runs): the lr with the lowest mean final dev loss (any divergence
    disqualifies it)."""
    by = {}
    for r in runs:
        by.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r)
    out = {}
    for m, per_lr in by.items():
        def score(rs):
            return math.inf if any(r["diverged"] for r in rs) else statistics.fmean(
                r["final_dev_loss"] for r in rs)
        lr = min(per_lr, key=lambda lr: score(per_lr[lr]))
        out[m] = (lr, per_lr[lr], score(per_lr[lr]))
    return out


def reach(curve: list[dict], target: float):
    for pt in curve:
        if pt["dev_loss"] <= target:
            return pt
    return None


def mean_sd(xs) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "—"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.3f} ± {sd:.3f}"


def summarize(runs: list[dict], budget: int) -> list[dict]:
    """One row per method at its selected lr; the target is MeZO's mean final dev loss."""
    chosen = select(runs)
    if "MeZO" not in chosen:
        raise SystemExit("the summary needs MeZO's runs (its final dev loss is the target)")
    target = chosen["MeZO"][2]
    mezo_cpu = statistics.fmean(r["cpu_s"] for r in chosen["MeZO"][1])
    mezo_hits = [h for h in (reach(r["curve"], target) for r in chosen["MeZO"][1]) if h]
    mezo_fw = statistics.fmean(h["forwards"] for h in mezo_hits)
    rows = []
    for m, (lr, rs, score) in chosen.items():
        hits = [reach(r["curve"], target) for r in rs]
        got = [h for h in hits if h is not None]
        fw = statistics.fmean(h["forwards"] for h in got) if got else math.nan
        rows.append(dict(
            setup=rs[0]["setup"], method=m, lr=lr, seeds=len(rs), budget=budget,
            dev_loss=mean_sd(r["final_dev_loss"] for r in rs),
            dev_acc=mean_sd(r["final_dev_acc"] for r in rs),
            test_loss=mean_sd(r["final_test_loss"] for r in rs),
            test_acc=mean_sd(r["final_test_acc"] for r in rs),
            reached=f"{len(got)}/{len(rs)}", target=round(target, 4),
            forwards_to_target=round(fw) if got else "",
            forwards_ratio=round(fw / budget, 3) if got else "",
            forwards_vs_mezo=round(fw / mezo_fw, 3) if got else "",
            steps_to_target=round(statistics.fmean(h["steps"] for h in got)) if got else "",
            cpu_s_to_target=round(statistics.fmean(h["cpu_s"] for h in got), 2) if got else "",
            cpu_ratio_to_mezo=(round(statistics.fmean(h["cpu_s"] for h in got) / mezo_cpu, 3)
                               if got else ""),
            cpu_s_run=round(statistics.fmean(r["cpu_s"] for r in rs), 2),
            state_over_params=round(rs[0]["state_bytes"] / rs[0]["param_bytes"], 3),
            diverged=sum(r["diverged"] for r in rs)))
    return rows


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = sorted({r["setup"] for r in runs})
    fig, axes = plt.subplots(1, len(setups), figsize=(6.5 * len(setups), 4.5), squeeze=False)
    for ax, key in zip(axes[0], setups):
        for m, (lr, rs, _) in select([r for r in runs if r["setup"] == key]).items():
            if any(r["diverged"] for r in rs):
                continue
            n = min(len(r["curve"]) for r in rs)
            x = [rs[0]["curve"][i]["forwards"] for i in range(n)]
            y = [statistics.fmean(r["curve"][i]["dev_loss"] for r in rs) for i in range(n)]
            ax.plot(x, y, label=f"{m} (lr {lr:g})", lw=2.2 if m == "MeZO" else 1.2,
                    color="black" if m == "MeZO" else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("forward passes")
        ax.set_ylabel("dev loss (mean of seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_SETUPS: dict = {}


def run_path(key: str, method: str, lr: float, seed: int, budget: int) -> Path:
    """Where a finished run is kept (zoengine's cache folder), so a grid extended later
    recomputes only its new points; ``--fresh`` ignores them."""
    return _common.cache_dir("bench_methods", "runs", f"{key}-{method}-{lr:g}-s{seed}-"
                                                      f"f{budget}.json")


def _work(task):
    import json

    key, method, lr, seed, budget, fresh = task
    path = run_path(key, method, lr, seed, budget)
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    result = _compute(key, method, lr, seed, budget)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


def _compute(key: str, method: str, lr: float, seed: int, budget: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import methods_setups

    if key not in _SETUPS:
        s = methods_setups.SETUPS[key]()
        _SETUPS[key] = (s, {n: p.detach().clone() for n, p in s.named_parameters()})
    setup, start = _SETUPS[key]
    return run_one(setup, key, method, lr, seed, budget, start)


def main(argv=None) -> None:
    from zoengine.optim import available_methods

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", choices=["tiny", "smollm2", "both"], default="both")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--forwards", type=int, default=None, help="budget (default per setup)")
    ap.add_argument("--workers", type=int, default=1, help="processes, one thread each")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="recompute runs kept in the cache")
    a = ap.parse_args(argv)
    keys = ["tiny", "smollm2"] if a.setup == "both" else [a.setup]
    missing = [m for m in a.methods if METHODS[m][0] not in available_methods()]
    methods = [m for m in a.methods if m not in missing]
    if missing:
        print(f"not in the registry, skipped: {missing}", flush=True)
    tasks = [(k, m, lr, s, a.forwards or BUDGET[k], a.fresh) for k in keys for m in methods
             for lr in GRIDS[m][k] for s in a.seeds]
    runs = _run_all(tasks, a.workers)
    env = _common.env_info(threads=1)
    summary = [dict(env, **row) for k in keys
               for row in summarize([r for r in runs if r["setup"] == k], a.forwards or BUDGET[k])]
    _print_table(summary)
    if not a.no_csv:
        _common.append_csv(RESULTS / "bench_methods.csv",
                           [dict(env, **{k: v for k, v in r.items() if k != "curve"})
                            for r in runs])
        _common.append_csv(RESULTS / "bench_methods_curves.csv",
                           [dict(env, setup=r["setup"], method=r["method"], lr=r["lr"],
                                 seed=r["seed"], **pt) for r in runs for pt in r["curve"]])
        _common.append_csv(RESULTS / "bench_methods_summary.csv", summary)
        plot(runs, RESULTS / "bench_methods.png")


def _run_all(tasks, workers: int) -> list[dict]:
    from tqdm import tqdm

    if workers <= 1:
        return [_work(t) for t in tqdm(tasks, desc="runs")]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(_work, tasks), total=len(tasks), desc="runs"))


def _print_table(rows: list[dict]) -> None:
    cols = ["setup", "method", "lr", "dev_loss", "dev_acc", "test_loss", "reached",
            "forwards_ratio", "forwards_vs_mezo", "steps_to_target", "cpu_ratio_to_mezo",
            "state_over_params"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
