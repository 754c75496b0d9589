"""bf16 ZO training on a tiny LLaMA: in-place vs virtual perturbation, with and without
stochastic rounding, against an fp32 reference curve.

    python benchmarks/bench_bf16.py            # 800 MeZO steps x 5 configurations, ~4 min
    python benchmarks/bench_bf16.py --steps 200 --eval-every 20 --no-plot      # quick look

Set-up (fixed seeds, CPU):
  model     transformers LlamaForCausalLM from a LlamaConfig: hidden 64, intermediate 128,
            2 layers, 4 heads, vocab 128, untied embeddings (98,624 parameters), seed 0
  task      a fixed random permutation π of the 128 tokens; a sequence starts at a random token
            and follows x[t+1] = π(x[t]). Training batch: 4 fixed sequences of 16 tokens; a
            held-out batch of 16 other sequences checks that the model learns π, not the batch
  start     ``--pretrain`` Adam steps with backprop in fp32 (lr 3e-3, fresh batches of 32) so
            ZO fine-tunes a partly trained model, as ZO is used (in a trial from random init at
            the same lr, bf16 in-place still got 92 % of fp32's loss drop in 1,000 steps: the
            drift hurts once the loss is sensitive to the weights)
  train     zoengine.MeZO(lr=1e-4, eps=1e-3, seed=0, backend="native") on the training
            batch's LM loss, the same z sequence for every configuration. At lr 1e-4 fp32 lowers
            the loss visibly in a few hundred steps while the update lr·g·z stays below one bf16
            ulp of a typical weight (~0.4 ulp: the regime of LLM fine-tuning, where in-place
            rounding drift competes with the update). Contrast run: ``--lr 1e-3 --pretrain 0
            --steps 300`` (updates of ~8 ulps, from random init): all five train alike

Configurations (all from the same fp32 start, cast to the configuration's dtype):
  fp32-inplace           fp32 weights, in-place perturbation (the reference curve)
  bf16-inplace           bf16 weights, in-place perturbation (+εz, −2εz, fused restore+update:
                         three roundings of θ per step)
  bf16-inplace-sr        the same with stochastic_rounding=True (the update pass rounds
                         stochastically; the two perturbation passes still round to nearest)
  bf16-virtual           opt.attach_virtual(model): θ + c·z is substituted in the forward pass
                         only, θ is written once per step (the update), rounded to nearest
  bf16-virtual-sr        virtual + stochastic_rounding=True

Logged: the step's returned loss (mean of the two perturbed losses), and every ``--eval-every``
steps the clean training-batch loss and held-out loss at the unperturbed weights; per step,
Σ|Δθ| / Σ ulp_bf16(θ) over all elements (the mean change in bf16 ulps: what the step really
wrote; for fp32, the intended update counted in bf16 ulps) and the fraction of elements
changed; per bf16 configuration, the same after 10 steps at lr = 0 (the drift perturbing alone
leaves behind). Rows go to benchmarks/results/bench_bf16.csv (one per configuration) and
bench_bf16_curves.csv (one per eval point); a markdown table is printed and the curves are
plotted to benchmarks/results/bf16_training.png (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CONFIGS = ("fp32-inplace", "bf16-inplace", "bf16-inplace-sr", "bf16-virtual", "bf16-virtual-sr")
SPEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
            tie_word_embeddings=False)


def chain_batch(torch, perm, n: int, length: int, gen):
    """n sequences of ``length`` tokens following x[t+1] = perm[x[t]] from random starts."""
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(len(perm), (n,), generator=gen)
    for t in range(1, length):
        ids[:, t] = perm[ids[:, t - 1]]
    return ids


def pretrained_state(torch, a):
    """(state_dict, train ids, held-out ids): the fp32 start every configuration copies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SPEC)).float()
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(SPEC["vocab_size"], generator=gen)
    train_ids = chain_batch(torch, perm, a.batch, a.seq, gen)
    heldout_ids = chain_batch(torch, perm, 16, a.seq, gen)
    if a.pretrain:
        adam = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(a.pretrain):
            x = chain_batch(torch, perm, 32, a.seq, gen)
            loss = model(input_ids=x, labels=x).loss
            adam.zero_grad()
            loss.backward()
            adam.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, train_ids, heldout_ids


def bf16_ulp(torch, x):
    """The bf16 ulp at each element of x (|x| in [2^e, 2^(e+1)) -> 2^(e-7)); 0 maps to the
    ulp of the smallest normal so it never divides by zero."""
    x = x.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    _, e = torch.frexp(x)  # x = m * 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), e - 8)


def run_config(torch, zoengine, name: str, state, train_ids, heldout_ids, a) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float32 if name.startswith("fp32") else torch.bfloat16
    virtual = "virtual" in name
    sr = name.endswith("-sr")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SPEC))
    model.load_state_dict(state)
    model = model.to(dtype).eval()
    opt = zoengine.MeZO(model.named_parameters(), lr=a.lr, eps=a.eps, seed=a.seed,
                        backend="native", stochastic_rounding=sr)
    if virtual:
        opt.attach_virtual(model)
    fallback = list(getattr(opt, "inplace_fallback", []) or []) if virtual else []
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_on(ids):
        with torch.inference_mode():
            return float(model(input_ids=ids, labels=ids).loss.float())

    def closure():
        with torch.inference_mode():
            return model(input_ids=train_ids, labels=train_ids).loss

    curve = [{"step": 0, "eval_loss": loss_on(train_ids), "heldout_loss": loss_on(heldout_ids),
              "step_loss": "", "dtheta_ulp": "", "changed_frac": ""}]
    window: list[float] = []
    dulp: list[float] = []
    changed: list[float] = []
    n_el = sum(p.numel() for p in params)
    t0 = time.perf_counter()
    for s in range(1, a.steps + 1):
        before = [p.detach().clone() for p in params]
        window.append(float(opt.step(closure)))
        with torch.no_grad():
            num, den, moved = 0.0, 0.0, 0
            for p, b in zip(params, before):
                d = (p.detach().float() - b.float()).abs()
                # Σ|Δθ| / Σ ulp(θ before the step) in bf16 ulps (fp32 runs: the same change
                # counted in bf16 ulps, i.e. the update the bf16 runs try to make)
                num += float(d.sum())
                den += float(bf16_ulp(torch, b).sum())
                moved += int((d > 0).sum())
        dulp.append(num / den)
        changed.append(moved / n_el)
        if s % a.eval_every == 0 or s == a.steps:
            curve.append({"step": s, "eval_loss": loss_on(train_ids),
                          "heldout_loss": loss_on(heldout_ids),
                          "step_loss": sum(window) / len(window),
                          "dtheta_ulp": sum(dulp[-len(window):]) / len(window),
                          "changed_frac": sum(changed[-len(window):]) / len(window)})
            window = []
    secs = time.perf_counter() - t0
    start, end = curve[0]["eval_loss"], curve[-1]["eval_loss"]
    best = min(c["eval_loss"] for c in curve)
    return {"config": name, "dtype": "fp32" if dtype == torch.float32 else "bf16",
            "perturbation": "virtual" if virtual else "inplace", "stochastic_rounding": sr,
            "lr": a.lr, "eps": a.eps, "seed": a.seed, "steps": a.steps, "pretrain": a.pretrain,
            "start_eval_loss": start, "end_eval_loss": end, "best_eval_loss": best,
            "delta_eval_loss": end - start,
            "start_heldout_loss": curve[0]["heldout_loss"],
            "end_heldout_loss": curve[-1]["heldout_loss"],
            "mean_dtheta_ulp": sum(dulp) / len(dulp),
            "mean_changed_frac": sum(changed) / len(changed),
            "inplace_fallback": len(fallback), "seconds": secs, "n_params": n_el,
            "curve": curve}


def drift_probe(torch, zoengine, state, train_ids, a, virtual: bool) -> float:
    """Σ|Δθ| / Σ ulp(θ) per step over 10 steps at lr = 0 (bf16): what perturbing alone leaves
    behind (0 when the step never writes θ)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**SPEC))
    model.load_state_dict(state)
    model = model.to(torch.bfloat16).eval()
    opt = zoengine.MeZO(model.named_parameters(), lr=0.0, eps=a.eps, seed=a.seed,
                        backend="native")
    if virtual:
        opt.attach_virtual(model)

    def closure():
        with torch.inference_mode():
            return model(input_ids=train_ids, labels=train_ids).loss

    ratios = []
    for _ in range(10):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        with torch.no_grad():
            num = sum(float((p.detach().float() - b.float()).abs().sum())
                      for p, b in zip(model.parameters(), before))
            ratios.append(num / sum(float(bf16_ulp(torch, b).sum()) for b in before))
    return sum(ratios) / len(ratios)


def plot(results: list[dict], path: Path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"fp32-inplace": ("k", "-"), "bf16-inplace": ("tab:red", "-"),
              "bf16-inplace-sr": ("tab:orange", "--"), "bf16-virtual": ("tab:blue", "-"),
              "bf16-virtual-sr": ("tab:green", "-")}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        color, ls = styles.get(r["config"], (None, "-"))
        pts = r["curve"]
        ax1.plot([c["step"] for c in pts], [c["eval_loss"] for c in pts], color=color,
                 linestyle=ls, label=r["config"])
        later = [c for c in pts if c["dtheta_ulp"] != ""]
        ax2.plot([c["step"] for c in later], [c["dtheta_ulp"] for c in later], color=color,
                 linestyle=ls, label=r["config"])
    ax1.set_xlabel("ZO step")
    ax1.set_ylabel("training-batch loss at the unperturbed weights")
    ax1.set_title(f"MeZO, tiny LLaMA, lr {a.lr:g}, eps {a.eps:g}")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("ZO step")
    ax2.set_ylabel("mean |Δθ| per step, in bf16 ulps of θ")
    ax2.set_yscale("log")
    ax2.set_title("what a step writes (fp32: the intended update)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="MeZO's noise seed (all configurations)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--pretrain", type=int, default=20, help="Adam steps before ZO (fp32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--csv", type=Path, default=C.RESULTS / "bench_bf16.csv")
    ap.add_argument("--curves-csv", type=Path, default=C.RESULTS / "bench_bf16_curves.csv")
    ap.add_argument("--plot", type=Path, default=C.RESULTS / "bf16_training.png")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)

    import torch

    import zoengine

    torch.set_num_threads(a.threads)
    env = C.env_info(a.threads)
    state, train_ids, heldout_ids = pretrained_state(torch, a)
    results, failed = [], []
    for name in a.configs.split(","):
        if name not in CONFIGS:
            ap.error(f"unknown configuration {name!r}: choose from {CONFIGS}")
        print(f"running {name} ...", flush=True)
        try:
            r = run_config(torch, zoengine, name, state, train_ids, heldout_ids, a)
        except (TypeError, ValueError, NotImplementedError, RuntimeError) as exc:
            print(f"  {name}: FAILED: {type(exc).__name__}: {exc}"[:400], flush=True)
            failed.append((name, f"{type(exc).__name__}: {exc}"[:200]))
            continue
        if r["dtype"] == "bf16":
            try:
                r["drift_ulp_lr0"] = drift_probe(torch, zoengine, state, train_ids, a,
                                                 r["perturbation"] == "virtual")
            except (TypeError, ValueError, RuntimeError) as exc:
                r["drift_ulp_lr0"] = f"failed: {exc}"[:100]
        results.append(r)
        print(f"  {name}: eval loss {r['start_eval_loss']:.4f} -> {r['end_eval_loss']:.4f} "
              f"(held-out {r['start_heldout_loss']:.4f} -> {r['end_heldout_loss']:.4f}), "
              f"mean |dθ| {r['mean_dtheta_ulp']:.3g} ulp/step, {r['seconds']:.0f} s", flush=True)
    if not results:
        raise SystemExit("no configuration ran")
    ref = next((r for r in results if r["config"] == "fp32-inplace"), None)
    for r in results:
        if ref is not None and ref["delta_eval_loss"] < 0:
            r["progress_vs_fp32"] = r["delta_eval_loss"] / ref["delta_eval_loss"]
    rows = [{k: v for k, v in r.items() if k != "curve"} | env for r in results]
    rows += [{"config": n, "status": f"failed: {why}", "lr": a.lr, "eps": a.eps,
              "steps": a.steps} | env for n, why in failed]
    C.append_csv(a.csv, rows)
    C.append_csv(a.curves_csv, [{"config": r["config"], "lr": a.lr, "eps": a.eps,
                                 "seed": a.seed, **c,
                                 "git_sha": env["git_sha"],
                                 "timestamp_utc": env["timestamp_utc"]}
                                for r in results for c in r["curve"]])
    if not a.no_plot:
        plot(results, a.plot, a)
    print()
    print(f"tiny LLaMA ({results[0]['n_params']:,} params), MeZO lr {a.lr:g}, eps {a.eps:g}, "
          f"seed {a.seed}, "
          f"{a.steps} steps after {a.pretrain} fp32 Adam steps, batch {a.batch}x{a.seq}, "
          f"{a.threads} thread(s); {env['device']}, torch {env['torch']}, git {env['git_sha']}")
    print()
    shown = [{**r, **{k: f"{r[k]:.4f}" for k in ("start_eval_loss", "end_eval_loss",
                                                  "best_eval_loss", "end_heldout_loss")}}
             for r in results]
    print(C.markdown_table(shown, [
        ("config", "configuration"), ("start_eval_loss", "start loss"),
        ("end_eval_loss", "end loss"), ("best_eval_loss", "best loss"),
        ("progress_vs_fp32", "loss drop / fp32's"),
        ("end_heldout_loss", "end held-out loss"),
        ("mean_dtheta_ulp", "mean |Δθ|/step (ulp)"),
        ("mean_changed_frac", "elements changed/step"),
        ("drift_ulp_lr0", "|Δθ|/step at lr=0 (ulp)"), ("seconds", "s")]))
    for n, why in failed:
        print(f"\n{n}: not run ({why})")
    if not a.no_plot:
        print(f"\nplot: {a.plot.relative_to(C.ROOT) if a.plot.is_relative_to(C.ROOT) else a.plot}")
    if any(math.isnan(r["end_eval_loss"]) for r in results):
        print("warning: a configuration ended with a NaN loss")


if __name__ == "__main__":
    main()
