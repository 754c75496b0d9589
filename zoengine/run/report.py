"""What a finished run writes and reports: its weights, ``metrics.json``, ``curve.png`` and the
printed summary. ``RunFolder.write_final`` (zoengine.storage.folder) commits the files together."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import numpy as np


def run_summary_json(obj) -> bytes:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return (json.dumps(clean(obj), indent=2) + "\n").encode()


def curve_files(report: dict, log=print) -> dict:
    """``{"curve.png": PNG}`` for the run's final files; ``{}`` with a printed note when
    matplotlib (the ``plot`` extra) is not installed: the curve's numbers are in metrics.json,
    and a missing plotting library must not fail a run at its end."""
    from zoengine.extras import installed

    if not installed("matplotlib"):
        log('note: curve.png not written: matplotlib is not installed (pip install '
            '"zoengine[plot]"); the curve\'s numbers are in metrics.json')
        return {}
    return {"curve.png": plot_curve(report)}


def plot_curve(report: dict) -> bytes:
    """Training loss (raw and moving average) and dev metrics against steps, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.asarray(report["curve"]["loss"], dtype=float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = np.arange(1, len(loss) + 1)
    a1.plot(steps, loss, lw=0.5, alpha=0.35, label="batch loss")
    w = max(1, len(loss) // 50)
    if len(loss) >= w:
        ma = np.convolve(loss, np.ones(w) / w, mode="valid")
        a1.plot(steps[w - 1:], ma, lw=1.5, label=f"moving avg ({w})")
    a1.set_xlabel("step")
    a1.set_ylabel("loss")
    a1.set_title("training loss")
    a1.legend(fontsize=8)
    dev = report["curve"]["dev"]
    xs = [d["step"] for d in dev]
    if "dev_auc" in dev[0]:
        a2.plot(xs, [d["dev_accuracy"] for d in dev], "o-", ms=3, label="dev accuracy")
        a2.plot(xs, [d["dev_auc"] for d in dev], "s-", ms=3, label="dev AUC")
        base = report["before"]["dev"].get("calibrated_accuracy")
        if base is not None:
            a2.axhline(base, ls="--", c="gray", lw=1, label="zero-shot, bias fitted on dev")
        a2.set_title("held-out dev")
    else:  # dev_loss, or a suite task's dev_accuracy / dev_f1
        key = next(k for k in dev[0] if k.startswith("dev_"))
        a2.plot(xs, [d[key] for d in dev], "o-", ms=3, label=key.replace("_", " "))
        a2.set_title(f"held-out {key.replace('_', ' ')}")
    a2.set_xlabel("step")
    a2.legend(fontsize=8)
    fig.suptitle(f"{report['config']['task']} · {report['config']['train']} · "
                 f"{report['config']['method']}", fontsize=10)
    # fixed margins: tight_layout lays out every label twice, 0.25 of the 0.55 CPU-s a plot costs
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.84, wspace=0.22)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def sparsity_line(sp: dict) -> str:
    """The run's sparsity at the end: the true share of zeros over the masked tensors, with
    the share per kind of tensor when the report has it (``sparsity_report``'s ``per_kind``)."""
    line = f"  sparsity {sp['sparsity']:.4f} of {sp['numel']:,} masked weights"
    kinds = sp.get("per_kind")
    if kinds:
        line += " (" + "; ".join(f"{k} {v['sparsity']:.4f} of {v['numel']:,}"
                                 for k, v in kinds.items()) + ")"
    return line


def summary_lines(report: dict) -> list[str]:
    """The printed end-of-run summary: the run, held-out results before and after, and the
    sparsity kept when the run was pruned (``sparsity_after``)."""
    b, a = report["before"], report["after"]
    c = report["config"]
    head = (f"zoengine: task {c['task']}, train {c['train']} "
            f"({report['trainable_params']:,} params), method {c['method']}, {c['steps']} steps, "
            f"{report['timing']['total_s']:.0f} s")
    tail = [sparsity_line(report["sparsity_after"])] if report.get("sparsity_after") else []
    if "test" in b and "loss" in b["test"]:
        return [head, f"  test loss {b['test']['loss']:.4f} -> {a['test']['loss']:.4f}   "
                      f"perplexity {b['test']['perplexity']:.2f} -> {a['test']['perplexity']:.2f}",
                *tail]
    if "metric" in b["test"]:  # a suite task (docs/tasks.md): its metric before and after
        m = b["test"]["metric"]
        return [head, f"  test {m} {b['test'][m]:.4f} -> {a['test'][m]:.4f}   dev {m} "
                      f"{b['dev'][m]:.4f} -> {a['dev'][m]:.4f}", *tail]
    g = report["gain"]
    return [head,
            "  held-out test           accuracy    AUC",
            f"  zero-shot (before)        {b['test']['accuracy']:.3f}    {b['test']['auc']:.3f}",
            f"  dev-calibrated zero-shot  {b['test']['calibrated_accuracy']:.3f}      -",
            f"  after ZO training         {a['test']['accuracy']:.3f}    {a['test']['auc']:.3f}",
            f"  gain: AUC {g['auc']:+.3f}; accuracy {g['accuracy_vs_calibrated_baseline']:+.3f} "
            f"over the dev-calibrated baseline "
            f"({'beats' if g['beats_calibrated_baseline'] else 'does NOT beat'} it)", *tail]


def weights_writer(cfg, trained, tok) -> tuple[str, Callable[[str], None]]:
    """(name, writer) of a run's trained weights for ``RunFolder.write_final``: ``head``:
    ``head.safetensors`` (the option rows, their bias and token ids); ``lora``: the PEFT
    ``adapter`` folder; ``full``, ``norms``: a ``model`` folder with the tokenizer."""
    if cfg.train == "head":
        def write_head(path: str) -> None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in trained.items()}, path,
                      metadata={"model": str(cfg.model), "task": str(cfg.task),
                                "kind": "zoengine-head-rows"})
            os.chmod(path, 0o644)
        return "head.safetensors", write_head

    def write_folder(path: str) -> None:
        trained.save_pretrained(path, safe_serialization=True)
        if cfg.train in ("full", "norms"):
            tok.save_pretrained(path)
    return ("adapter" if cfg.train == "lora" else "model"), write_folder
