"""Peak memory of a ZO step (each registered method) vs plain inference vs Adam with backprop,
on SmolLM2-135M at the same batch and sequence length.

    python benchmarks/bench_memory.py [--batch 16 --seq 64 --threads 1 --steps 2]

Each configuration runs in a fresh process, so its peak is its own: ``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on a GPU (``--device cuda``). The loss is the causal-LM loss
over the whole sequence (full-vocabulary logits), the same closure for every configuration.

  inference   the closure under ``torch.inference_mode`` (what a ZO step must stay close to)
  zo:<name>   ``zoengine.optim.create(name, model.named_parameters())``, one step = 2 forwards
  adam        ``torch.optim.Adam`` with ``loss.backward()`` on all parameters

Rows go to benchmarks/results/bench_memory.csv; a markdown table is printed with the ratios
against inference and against Adam, both for the whole process's peak and for the peak minus the
RSS before the model was built (interpreter, torch and transformers: ~400 MB that every
configuration pays alike). Targets (issue 9): ZO <= 1.1x inference, >= 3x below Adam.

Weights: SmolLM2 is dequantised from its GGUF once (~30-60 s) and cached as safetensors in the
zoengine cache folder; workers build the model from its config and copy the tensors in one at a
time, so loading never holds two copies of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def cache_dir() -> Path:
    return C.cache_dir("bench_memory", "smollm2-135m")


def prepare() -> None:
    import torch
    from safetensors.torch import save_file

    from zoengine.models import load_default_model

    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    model, _ = load_default_model(torch.float32)
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(tensors, str(d / "weights.tmp"))
    os.replace(d / "weights.tmp", d / "weights.safetensors")
    (d / "config.json").write_text(json.dumps(cfg))
    C.emit_result({"prepared": str(d)})


def load(device: str):
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    d = cache_dir()
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**json.loads((d / "config.json").read_text())))
    params = dict(model.named_parameters())
    with safe_open(str(d / "weights.safetensors"), framework="pt") as f, torch.no_grad():
        for name in f.keys():  # one tensor at a time: never two copies of the model
            params[name].copy_(f.get_tensor(name))
    return model.eval()


def worker(config: str, batch: int, seq: int, threads: int, steps: int, device: str) -> None:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 - counted in the baseline

    torch.set_num_threads(threads)
    rss_base = C.current_rss_mb()  # interpreter + torch + transformers, before the model
    model = load(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (batch, seq), generator=g).to(device)

    def closure():
        return model(input_ids=ids, labels=ids).loss

    if config == "inference":
        def step():
            with torch.inference_mode():
                return closure()
    elif config == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = closure()
            loss.backward()
            opt.step()
            return loss
    else:
        from zoengine.optim import create

        opt = create(config.split(":", 1)[1], model.named_parameters(), lr=1e-6, eps=1e-3,
                     seed=0)

        def step():
            return opt.step(closure)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        float(step())
        times.append(time.perf_counter() - t)
    out = {"config": config, "step_s": C.median(times[1:] or times), "batch": batch, "seq": seq,
           "rss_before_model_mb": rss_base}
    if device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    C.emit_result(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="steps per config (median of 2nd..)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default=None, help="comma-separated subset")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.prepare:
        prepare()
        return 0
    if a.worker:
        worker(a.worker, a.batch, a.seq, a.threads, a.steps, a.device)
        return 0
    from zoengine.optim import available_methods

    configs = a.configs.split(",") if a.configs else \
        ["inference", *[f"zo:{m}" for m in available_methods()], "adam"]
    if not (cache_dir() / "weights.safetensors").exists():
        print("caching SmolLM2 weights (one-off) ...", flush=True)
        C.run_fresh(Path(__file__), ["--prepare"])
    common = ["--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads),
              "--steps", str(a.steps), "--device", a.device]
    rows = []
    for cfg in configs:
        print(f"running {cfg} ...", flush=True)
        r = C.run_fresh(Path(__file__), ["--worker", cfg, *common])
        r["peak_mb"] = r.get("peak_cuda_mb", r["peak_rss_mb"])
        # what the model and the step add on top of the imports (CPU; on GPU peak_mb is that)
        r["model_mb"] = r["peak_mb"] - (0 if a.device == "cuda" else r["rss_before_model_mb"])
        rows.append(r)
    by = {r["config"]: r for r in rows}
    for r in rows:
        if "inference" in by:
            r["vs_inference"] = r["peak_mb"] / by["inference"]["peak_mb"]
            r["model_vs_inference"] = r["model_mb"] / by["inference"]["model_mb"]
        if "adam" in by:
            r["adam_over_this"] = by["adam"]["peak_mb"] / r["peak_mb"]
            r["model_adam_over_this"] = by["adam"]["model_mb"] / r["model_mb"]
        r.update(C.env_info(a.threads))
        r["memory"] = "cuda max_memory_allocated" if a.device == "cuda" else "ru_maxrss"
    C.append_csv(C.RESULTS / "bench_memory.csv", rows)
    print(C.markdown_table(rows, [("config", "config"), ("peak_mb", "peak MiB"),
                                  ("vs_inference", "x inference"),
                                  ("adam_over_this", "Adam / this"),
                                  ("model_mb", "peak - imports MiB"),
                                  ("model_vs_inference", "x inference (-imports)"),
                                  ("model_adam_over_this", "Adam / this (-imports)"),
                                  ("step_s", "s/step")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
