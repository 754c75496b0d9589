"""Step time and peak memory of one ZO step on SmolLM2-135M (CPU), against MeZO's own loop.

    python benchmarks/bench_step.py [--steps 3 --batch 8 --seq 32 --threads 1]

Configurations, each in a fresh subprocess (so ru_maxrss is that configuration's own peak):
  mezo-ref     MeZO's reference loop as the authors wrote it (research/algorithms.md §1(b)):
               torch.manual_seed(s) then torch.normal per tensor, θ.data = θ.data + c*z*ε,
               passes +1, −2, +1, then the update θ − lr*(g*z + wd*θ) with a 4th regeneration
  native       zoengine.MeZO(backend="native")
  reference    zoengine.MeZO(backend="reference")  (the pure-PyTorch oracle)
  inference    two plain forward passes (the floor for any ZO step)

Reports the median step time (wall clock, and process CPU time, which a shared machine
disturbs less) after one warm-up step, peak RSS, and ratios against mezo-ref
and inference; appends rows to benchmarks/results/bench_step.csv and prints a markdown table.
The weights are dumped once (raw fp32, ~540 MB) to the zoengine cache dir, so workers load them
with file reads straight into the parameters: loading never doubles memory, and the peak is the
step's.
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

CONFIGS = ("mezo-ref", "native", "reference", "inference")
LR, EPS, WD = 1e-6, 1e-3, 0.0


def weights_dir() -> Path:
    return C.cache_dir("bench", "smollm2-135m-fp32")


# ---- model dump / load (worker side) -----------------------------------------------------

def prepare() -> None:
    """Load SmolLM2-135M once (GGUF dequant, ~30 s) and dump config + raw fp32 parameters."""
    import torch

    from zoengine.models import load_default_model

    d = weights_dir()
    d.mkdir(parents=True, exist_ok=True)
    model, _ = load_default_model(torch.float32)
    index = []
    tmp = d / "weights.bin.tmp"
    with open(tmp, "wb") as f:
        for name, p in model.named_parameters():
            f.write(p.detach().contiguous().numpy().tobytes())
            index.append([name, list(p.shape)])
    os.replace(tmp, d / "weights.bin")
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    (d / "config.json").write_text(json.dumps({"config": cfg, "params": index}))
    C.emit_result({"prepared": str(d)})


def load_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    meta = json.loads((weights_dir() / "config.json").read_text())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**meta["config"])).to(torch.float32).eval()
    params = dict(model.named_parameters())
    with open(weights_dir() / "weights.bin", "rb") as f:
        for name, shape in meta["params"]:
            p = params[name]
            assert list(p.shape) == shape, (name, p.shape, shape)
            buf = memoryview(p.data.numpy()).cast("B")
            if f.readinto(buf) != len(buf):  # straight into the parameter: no second copy
                raise RuntimeError(f"{weights_dir()}/weights.bin is truncated at {name}")
    return model


# ---- the four step functions -------------------------------------------------------------

def mezo_reference_step(model, closure, params):
    """One step of princeton-nlp/MeZO large_models/trainer.py (zo_step + zo_update), verbatim
    in structure: global torch seed, torch.normal per tensor, new tensors for every update."""
    import numpy as np
    import torch

    def perturb(seed, scaling_factor):
        torch.manual_seed(seed)
        for _, param in params:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * EPS

    seed = np.random.randint(1_000_000_000)
    perturb(seed, 1)
    loss1 = closure()
    perturb(seed, -2)
    loss2 = closure()
    projected_grad = ((loss1 - loss2) / (2 * EPS)).item()
    perturb(seed, 1)
    torch.manual_seed(seed)
    for name, param in params:
        z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                         dtype=param.data.dtype)
        if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
            param.data = param.data - LR * (projected_grad * z + WD * param.data)
        else:
            param.data = param.data - LR * (projected_grad * z)
    return loss1


def worker(config: str, steps: int, batch: int, seq: int, threads: int) -> None:
    import numpy as np
    import torch

    import zoengine

    torch.set_num_threads(threads)
    np.random.seed(42)
    model = load_model()
    rss_loaded = C.current_rss_mb()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (batch, seq), generator=g)

    def closure():
        with torch.inference_mode():
            return model(input_ids=ids, labels=ids).loss

    if config == "mezo-ref":
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        step = lambda: mezo_reference_step(model, closure, params)  # noqa: E731
    elif config in ("native", "reference"):
        opt = zoengine.MeZO(model.named_parameters(), lr=LR, eps=EPS, weight_decay=WD, seed=0,
                            backend=config)
        step = lambda: opt.step(closure)  # noqa: E731
    elif config == "inference":
        step = lambda: (closure(), closure())  # noqa: E731
    else:
        raise ValueError(f"config={config!r}: must be one of {CONFIGS}")
    times, cpu = [], []
    with torch.no_grad():
        for _ in range(steps + 1):  # the first is the warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    n_params = sum(p.numel() for p in model.parameters())
    C.emit_result({"config": config, "step_s": C.median(times[1:]), "warmup_s": times[0],
                   "cpu_s": C.median(cpu[1:]),
                   "all_step_s": [round(t, 3) for t in times[1:]], "rss_loaded_mb": rss_loaded,
                   "n_params": n_params, **C.env_info(threads)})


# ---- driver --------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps after 1 warm-up step")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--csv", type=Path, default=C.RESULTS / "bench_step.csv")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.prepare:
        return prepare()
    if a.worker:
        return worker(a.worker, a.steps, a.batch, a.seq, a.threads)

    me = Path(__file__).resolve()
    if not (weights_dir() / "config.json").exists():
        print(f"dumping SmolLM2-135M weights to {weights_dir()} (once) ...", flush=True)
        C.run_fresh(me, ["--prepare"])
    common = ["--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq),
              "--threads", str(a.threads)]
    rows = []
    for cfg in a.configs.split(","):
        print(f"running {cfg} ...", flush=True)
        r = C.run_fresh(me, ["--worker", cfg, *common])
        r.update(batch=a.batch, seq=a.seq, steps=a.steps)
        rows.append(r)
        print(f"  {cfg}: {r['step_s']:.2f} s/step (steps {r['all_step_s']}), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    by = {r["config"]: r for r in rows}
    for r in rows:
        if "mezo-ref" in by:
            r["time_vs_mezo_ref"] = r["step_s"] / by["mezo-ref"]["step_s"]
            r["cpu_vs_mezo_ref"] = r["cpu_s"] / by["mezo-ref"]["cpu_s"]
        if "inference" in by:
            r["time_vs_inference"] = r["step_s"] / by["inference"]["step_s"]
            r["cpu_vs_inference"] = r["cpu_s"] / by["inference"]["cpu_s"]
            r["rss_vs_inference"] = r["peak_rss_mb"] / by["inference"]["peak_rss_mb"]
    C.append_csv(a.csv, [{k: v for k, v in r.items() if k != "all_step_s"} for r in rows])
    print()
    print(f"SmolLM2-135M ({rows[0]['n_params'] / 1e6:.1f}M params, fp32), batch {a.batch}x{a.seq}, "
          f"{a.threads} thread(s), median of {a.steps} steps after 1 warm-up; "
          f"{rows[0]['device']}, torch {rows[0]['torch']}, git {rows[0]['git_sha']}")
    print()
    print(C.markdown_table(rows, [("config", "configuration"), ("step_s", "wall s/step"),
                                  ("cpu_s", "CPU s/step"),
                                  ("time_vs_mezo_ref", "wall / mezo-ref"),
                                  ("cpu_vs_mezo_ref", "CPU / mezo-ref"),
                                  ("time_vs_inference", "wall / inference"),
                                  ("cpu_vs_inference", "CPU / inference"),
                                  ("peak_rss_mb", "peak RSS (MB)"),
                                  ("rss_vs_inference", "RSS / inference")]))


if __name__ == "__main__":
    main()
