"""Structured pruning of SmolLM2-135M: CPU inference speedup and damage against the dense model.

    python benchmarks/bench_structured.py [--threads 1,2 --runs 3 --calib-blocks 4]

Variants (all fp32, CPU, from the same dense weights, Wanda-style scores calibrated on
``--calib-blocks`` x 128 tokens of the Shakespeare *train* split, sequential per block):

  dense            SmolLM2-135M-Instruct (``zoengine.models.load_default_model``)
  channels-25      ``prune_structured(m, "channels", 0.25)``: 1536 -> 1152 MLP channels per layer
  heads-1/3        ``prune_structured(m, "heads", 1/3)``: one KV group of 3 removed per layer,
                   9 -> 6 query heads, 3 -> 2 KV heads
  heads+channels   heads-1/3, then channels-25 calibrated on the head-pruned model

Every pruned variant is saved with ``save_pretrained`` and loaded back with plain
``AutoModelForCausalLM.from_pretrained``; the *reloaded* model is the one timed, and its logits
must equal the in-memory pruned model's (column ``reload_equal``).

Measured per variant: parameters; held-out perplexity on ``--eval-blocks`` x 128 tokens of the
Shakespeare *dev* split (no recovery: the raw damage); forward latency (``use_cache=False``,
full logits) at batch 1 x 128 and 8 x 128 tokens for each ``--threads`` value, median of
``--runs`` after ``--warmup``. Variants are timed round-robin (run r of every variant before run
r + 1 of any), so a load change on a shared machine hits all of them alike; speedups are
dense / variant within the same run, wall and process CPU time. The LM head (576 x 49152, tied)
is not pruned: it is ~21 % of a dense forward's FLOPs and bounds the speedup.
Rows go to benchmarks/results/bench_structured.csv.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHAPES = ((1, 128), (8, 128))


def load_dense():
    """Dense fp32 SmolLM2 + tokenizer; dequantised from the GGUF once, then cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = C.cache_dir("bench_structured", "dense")
    if not (d / "config.json").exists():
        from zoengine.models import load_default_model

        model, tok = load_default_model(torch.float32)
        model.save_pretrained(d)
        tok.save_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    return model, tok


def data(tok, calib_blocks: int, eval_blocks: int):
    from zoengine.run.pruning import calibration_blocks
    from zoengine.tasks import lm_blocks, load_task

    calib = calibration_blocks(tok, "shakespeare", calib_blocks, 128, seed=0)
    dev = load_task("shakespeare", block_size=128).splits["dev"]["text"][0]
    return list(calib.split(2)), lm_blocks(tok, dev, 128)[:eval_blocks]


def build_variants(dense, calib) -> dict:
    """name -> (in-memory pruned model, seconds spent pruning it, from dense)."""
    from zoengine.sparsity import prune_structured

    out = {}
    steps = (("channels-25", None, "channels", 0.25), ("heads-1/3", None, "heads", 1 / 3),
             ("heads+channels", "heads-1/3", "channels", 0.25))
    for name, start, structure, s in steps:
        m = copy.deepcopy(dense if start is None else out[start][0])
        t0 = time.perf_counter()
        prune_structured(m, structure, s, calib=calib)
        out[name] = (m, time.perf_counter() - t0 + (out[start][1] if start else 0.0))
        print(f"pruned {name} in {out[name][1]:.1f} s", flush=True)
    return out


def reload(name: str, model, probe):
    """save_pretrained + AutoModelForCausalLM.from_pretrained; (reloaded, logits equal?)."""
    import torch
    from transformers import AutoModelForCausalLM

    d = C.cache_dir("bench_structured", name.replace("/", "of").replace("+", "-"))
    model.save_pretrained(d)
    back = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.inference_mode():
        same = torch.equal(model(probe, use_cache=False).logits,
                           back(probe, use_cache=False).logits)
    return back, same


def describe(m) -> str:
    c = m.config
    return (f"{c.num_attention_heads}q/{c.num_key_value_heads}kv heads, "
            f"{c.intermediate_size} ch")


def time_forwards(models: dict, x, warmup: int, runs: int) -> dict:
    """{name: (median wall s, median CPU s)} of ``model(x)``, variants interleaved per run."""
    import torch

    wall = {k: [] for k in models}
    cpu = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(warmup):
                m(x, use_cache=False)
        for _ in range(runs):
            for k, m in models.items():
                t0, c0 = time.perf_counter(), time.process_time()
                m(x, use_cache=False)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in models}


def measure(a) -> list[dict]:
    import torch

    from zoengine.tasks import lm_eval

    torch.manual_seed(0)
    torch.set_num_threads(max(a.threads))
    t0 = time.perf_counter()
    dense, tok = load_dense()
    calib, dev = data(tok, a.calib_blocks, a.eval_blocks)
    print(f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    models, info = {"dense": dense}, {"dense": {"prune_s": 0.0, "reload_equal": ""}}
    for name, (m, secs) in build_variants(dense, calib).items():
        models[name], same = reload(name, m, dev[:1])
        info[name] = {"prune_s": round(secs, 1), "reload_equal": same}
        del m
    n_dense = sum(p.numel() for p in dense.parameters())
    for name, m in models.items():
        n = sum(p.numel() for p in m.parameters())
        info[name].update(variant=name, config=describe(m), params=n,
                          params_vs_dense=n / n_dense,
                          dev_ppl=lm_eval(m, dev, batch_size=4)["perplexity"])
        print(f"{name}: {n:,} params, dev ppl {info[name]['dev_ppl']:.2f}", flush=True)
    rows = []
    for threads in a.threads:
        torch.set_num_threads(threads)
        for b, t in SHAPES:
            x = dev[:b] if len(dev) >= b else dev[:1].repeat(b, 1)
            runs = a.runs if b > 1 else a.runs_small
            times = time_forwards(models, x[:, :t], a.warmup, runs)
            for name, (w, c) in times.items():
                rows.append(dict(info[name], batch=b, seq=t, runs=runs, wall_ms=w * 1e3,
                                 cpu_ms=c * 1e3, speedup_wall=times["dense"][0] / w,
                                 speedup_cpu=times["dense"][1] / c, **C.env_info(threads)))
            print(f"timed {threads} thread(s), {b}x{t}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = {}
    for r in rows:
        key = (r["variant"], r["threads"])
        o = out.setdefault(key, {k: r[k] for k in ("variant", "config", "threads", "dev_ppl")})
        o["reload"] = {True: "yes", False: "NO"}.get(r["reload_equal"], "-")
        o["params"] = f"{r['params'] / 1e6:.1f} M ({r['params_vs_dense']:.2f})"
        tag = f"{r['batch']}x{r['seq']}"
        o[f"ms_{tag}"] = r["wall_ms"]
        o[f"sw_{tag}"] = f"{r['speedup_wall']:.2f}"
        o[f"sc_{tag}"] = f"{r['speedup_cpu']:.2f}"
    cols = [("variant", "variant"), ("config", "config"), ("params", "params (vs dense)"),
            ("reload", "reloaded = pruned"), ("dev_ppl", "dev ppl"), ("threads", "threads")]
    for b, t in SHAPES:
        tag = f"{b}x{t}"
        cols += [(f"ms_{tag}", f"{tag} wall ms"), (f"sw_{tag}", f"{tag} speedup wall"),
                 (f"sc_{tag}", f"{tag} speedup CPU")]
    ordered = sorted(out.values(), key=lambda o: (o["threads"], list(out).index(
        (o["variant"], o["threads"]))))
    return C.markdown_table(ordered, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--runs", type=int, default=3, help="timed runs at batch 8")
    ap.add_argument("--runs-small", type=int, default=5, help="timed runs at batch 1")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--calib-blocks", type=int, default=4)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--csv", default=str(C.RESULTS / "bench_structured.csv"))
    a = ap.parse_args()
    a.threads = [int(t) for t in str(a.threads).split(",")]
    t0 = time.perf_counter()
    rows = measure(a)
    C.append_csv(Path(a.csv), rows)
    print(table(rows))
    print(f"\n{len(rows)} rows -> {a.csv} "
          f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
