"""Co-simulation: train with the numbers a random-number generator would produce, price it.

    python benchmarks/bench_cosim.py                        # ~5-7 min
    python benchmarks/bench_cosim.py --forwards 10000 --seeds 0 1 2 --lr 1e-4

Same configuration as bench_convergence.py (SmolLM2-135M, tweet sentiment, ZO on the final RMSNorm
weight + the two label-word rows of the LM head over cached layer-30 outputs, d = 1,728; same
cache, same batches per seed, same budget of forward passes). Every noise source trains at the
SAME lr (default: MeZO's lr chosen by bench_convergence.py, read from its CSV; else 1e-4):

* ``MeZO``            Gaussian from the noise contract (software Philox), priced as hwsim's
                      Gaussian default (CLT-4 over an 8-bit LFSR source, no reuse);
* ``uniform-static``  PeZO with fresh numbers (reuse=None, static sqrt(3) scaling);
* ``hw:...``          ``zoengine.ZO(noise="hw:<spec>")``: the bit-accurate generator model of
                      ``zoengine.hwsim.generators``, so training runs on exactly the numbers the
                      priced hardware emits (32-bit LFSR uniform; 8-bit LFSR uniform from a
                      65,536-entry pool; 8-bit LFSR uniform on-the-fly, 16 generators for 256
                      lanes; and an 8-bit CLT-4 Gaussian as the hardware Gaussian baseline).

Each run's RNG hardware is priced with ``estimate(Workload.from_optimizer(opt, ...), platform)``
on ``fpga-xc7`` and ``asic-45nm`` (energy per step at this d, and, for scale, at the full model's
d = 134.5M). Writes benchmarks/results/bench_cosim.csv and bench_cosim.png (hwsim.report's
Pareto plot: FPGA energy per step vs final training loss) and bench_cosim_pareto.png (both
platforms, training loss and held-out accuracy).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import bench_convergence as bc  # noqa: E402

CSV = _common.RESULTS / "bench_cosim.csv"
PNG = _common.RESULTS / "bench_cosim.png"
PNG2 = _common.RESULTS / "bench_cosim_pareto.png"
FULL_D = 134_515_008  # SmolLM2-135M, tied head counted once
CONFIGS = (
    ("MeZO", "MeZO"),
    ("uniform-static", "uniform-static"),
    ("hw:lfsr32-uniform", "ZO:hw:lfsr32-uniform"),
    ("hw:lfsr-uniform-pool65536", "ZO:hw:lfsr-uniform-pool65536"),
    ("hw:lfsr8-uniform-otf16x256", "ZO:hw:lfsr8-uniform-otf16x256"),
    ("hw:lfsr-w8-clt4", "ZO:hw:lfsr-w8-clt4"),
)
PLATFORMS = ("fpga-xc7", "asic-45nm")


def workload_for(opt):
    """hwsim workload of a zoengine optimizer (``from_optimizer`` reads ``opt.noise``, so a
    ``hw:<spec>`` optimizer is priced as its spec's generator and reuse)."""
    from zoengine.hwsim import Workload

    return Workload.from_optimizer(opt)


def mezo_lr_from_convergence(default: float = 1e-4) -> float:
    if not bc.CSV.exists():
        return default
    with open(bc.CSV, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("kind") == "summary"
                and r.get("method") == "MeZO"]
    return float(rows[-1]["lr"]) if rows else default


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--forwards", type=int, default=10000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from zoengine.hwsim import estimate
    from zoengine.hwsim.report import plot_pareto

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    lr = args.lr if args.lr is not None else mezo_lr_from_convergence()
    feats = bc.build_features()
    env = _common.env_info(threads=1)
    rows, points, table = [], [], []
    for label, method in CONFIGS:
        rs = []
        for seed in args.seeds:
            r = bc.run(method, lr, seed, args.forwards, feats, args.eval_every)
            rs.append(r)
            print(f"{label:28s} seed {seed}: train loss {r['final']['train_loss']:.4f} "
                  f"test acc {r['final']['test_acc']:.3f} auc {r['final']['test_auc']:.3f} "
                  f"({r['ms_per_step']:.2f} ms/step)", flush=True)
        w = workload_for(rs[0]["opt"])
        budgets = {p: estimate(w, p) for p in PLATFORMS}
        full = {p: estimate(w.replace(d=FULL_D), p) for p in PLATFORMS}
        loss = [r["final"]["train_loss"] for r in rs]
        acc = [r["final"]["test_acc"] for r in rs]
        aucs = [r["final"]["test_auc"] for r in rs]
        row = dict(env, bench="cosim", config=label, optimizer=type(rs[0]["opt"]).__name__,
                   noise=getattr(rs[0]["opt"], "noise", ""), lr=lr, eps=bc.EPS,
                   d=rs[0]["d"], budget_forwards=args.forwards,
                   seeds=" ".join(map(str, args.seeds)), steps=rs[0]["steps"],
                   hw_dist=w.dist, hw_transform=w.transform, hw_source=w.source, hw_bits=w.bits,
                   hw_reuse=w.reuse, hw_reuse_factor=w.reuse_factor, hw_pool_size=w.pool_size,
                   hw_lanes=w.lanes, hw_uses=round(w.uses, 3),
                   train_loss=bc.mean_sd(loss)[0], train_loss_sd=bc.mean_sd(loss)[1],
                   test_acc=bc.mean_sd(acc)[0], test_acc_sd=bc.mean_sd(acc)[1],
                   test_auc=bc.mean_sd(aucs)[0], test_auc_sd=bc.mean_sd(aucs)[1],
                   train_loss_before=rs[0]["before"]["train_loss"],
                   test_acc_before=rs[0]["before"]["test_acc"],
                   test_auc_before=rs[0]["before"]["test_auc"],
                   ms_per_step=bc.mean_sd([r["ms_per_step"] for r in rs])[0],
                   per_seed_train_loss=" ".join(f"{x:.5f}" for x in loss),
                   per_seed_test_acc=" ".join(f"{x:.3f}" for x in acc))
        for p in PLATFORMS:
            b, bf = budgets[p], full[p]
            tag = p.replace("-", "_")
            row.update({f"{tag}_e_step_j": b.e_step_j, f"{tag}_p_dyn_w": b.p_dyn_w,
                        f"{tag}_t_step_s": b.t_step_s, f"{tag}_generators": b.n_generators,
                        f"{tag}_full135m_e_step_j": bf.e_step_j})
        row.update(fpga_xc7_lut=budgets["fpga-xc7"].lut, fpga_xc7_ff=budgets["fpga-xc7"].ff,
                   fpga_xc7_bram18=budgets["fpga-xc7"].bram18,
                   asic_45nm_ge=budgets["asic-45nm"].ge,
                   asic_45nm_sram_bits=budgets["asic-45nm"].sram_bits)
        rows.append(row)
        points.append(dict(label=label, energy_j=budgets["fpga-xc7"].e_step_j,
                           loss=row["train_loss"], acc=row["test_acc"],
                           e_asic=budgets["asic-45nm"].e_step_j))
        table.append(dict(config=label, hw=f"{w.transform}/{w.source}{w.bits}b/{w.reuse}"
                          + (f" R={w.reuse_factor}" if w.reuse == "on-the-fly" else "")
                          + (f" P={w.pool_size}" if w.reuse == "pool" else ""),
                          loss=bc.pm(loss, "{:.4f}"), acc=bc.pm(acc), auc=bc.pm(aucs),
                          fpga=f"{budgets['fpga-xc7'].e_step_j * 1e9:.2f}",
                          asic=f"{budgets['asic-45nm'].e_step_j * 1e9:.3f}",
                          lut=f"{budgets['fpga-xc7'].lut:.0f}",
                          ge=f"{budgets['asic-45nm'].ge:.0f}",
                          full_fpga=f"{full['fpga-xc7'].e_step_j * 1e3:.3f}",
                          full_asic=f"{full['asic-45nm'].e_step_j * 1e3:.3f}",
                          ms=f"{row['ms_per_step']:.2f}"))
    if not args.no_csv:
        _common.append_csv(CSV, rows)
    plot_pareto([dict(label=p["label"], energy_j=p["energy_j"], loss=p["loss"]) for p in points],
                str(PNG))
    plot_two(points, PNG2)
    print(f"\nlr {lr:g} for every config, budget {args.forwards} forward passes, seeds "
          f"{args.seeds}, d = {rows[0]['d']}")
    print(_common.markdown_table(table, [
        ("config", "noise"), ("hw", "priced as"), ("loss", "final train loss"),
        ("acc", "test acc"), ("auc", "test AUC"), ("fpga", "FPGA nJ/step (d=1,728)"),
        ("asic", "ASIC-45nm nJ/step (d=1,728)"), ("lut", "FPGA LUT"), ("ge", "ASIC GE"),
        ("full_fpga", "FPGA mJ/step at d=134.5M"), ("full_asic", "ASIC mJ/step at d=134.5M"),
        ("ms", "CPU ms/step")]))
    print(f"\nwall time {time.perf_counter() - t_all:.0f} s; wrote {CSV}, {PNG}, {PNG2}")


def plot_two(points: list[dict], path: Path) -> None:
    """Energy per step (both platforms) vs final training loss and vs held-out accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylab, better in ((axes[0], "loss", "final training loss", min),
                                  (axes[1], "acc", "held-out test accuracy", max)):
        for ekey, mark, name in (("energy_j", "o", "fpga-xc7"), ("e_asic", "s", "asic-45nm")):
            pts = sorted(points, key=lambda p: p[ekey])
            front, best = [], math.inf if better is min else -math.inf
            for p in pts:
                if (p[key] < best) if better is min else (p[key] > best):
                    front.append(p)
                    best = p[key]
            ax.scatter([p[ekey] * 1e9 for p in pts], [p[key] for p in pts], marker=mark,
                       label=f"{name}")
            ax.plot([p[ekey] * 1e9 for p in front], [p[key] for p in front], "--", lw=1)
            for p in pts:
                ax.annotate(p["label"].replace("hw:", ""), (p[ekey] * 1e9, p[key]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("RNG energy per ZO step, nJ (d = 1,728)")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Co-simulation: noise source vs RNG energy (dashed: Pareto front per platform; "
                 "mean of seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    _ = np  # numpy imported for bench_convergence's helpers
    main()
