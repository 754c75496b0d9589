"""Step time and peak memory of one ZO step (in-place, virtual) against MeZO's loop and plain forwards.

    python benchmarks/bench_step.py [--steps 3 --batch 8 --seq 32 --threads 1 --dist normal]
    python benchmarks/bench_step.py --configs native,virtual,inference --dist uniform
    python benchmarks/bench_step.py --device cuda --dtype bf16 --model llama-1b      # on a GPU
    python benchmarks/bench_step.py --device cpu --model tiny-llama --steps 2        # smoke run

Models (``--model``):
  smollm2      SmolLM2-135M-Instruct (default on CPU), weights dumped once as raw fp32 to the
               zoengine cache dir and read straight into the parameters (loading never doubles
               memory)
  llama-1b     a LLaMA-architecture model of 1.1B parameters built from a transformers
               LlamaConfig with random init (hidden 2048, intermediate 5632, 22 layers, 32 heads,
               4 KV heads, vocab 32000: TinyLlama-1.1B's shape; no download), default on CUDA
  tiny-llama   the same architecture at hidden 64, 2 layers, vocab 256: smoke runs of every code
               path on a CPU (the ``triton`` configuration then runs in the Triton interpreter)

Configurations, each in a fresh subprocess (so ru_maxrss, and on CUDA the allocator's peak, is
that configuration's own):
  mezo-ref     MeZO's reference loop as the authors wrote it (research/algorithms.md §1(b)):
               torch.manual_seed(s) then torch.normal per tensor, θ.data = θ.data + c*z*ε,
               passes +1, −2, +1, then the update θ − lr*(g*z + wd*θ) with a 4th regeneration
               (always Gaussian: MeZO's loop has only torch.normal)
  native       zoengine.MeZO(backend="native"), in-place perturbation (CPU)
  triton       zoengine.MeZO(backend="triton"), in-place perturbation (CUDA)
  virtual      zoengine.MeZO(...).attach_virtual(model): forward pre-hooks substitute
               θ + c·z during the two evaluations, θ is written once (the update); backend
               ``--backend`` (default native on CPU, triton on CUDA); with Triton, an
               nn.Linear runs the fused noisy-linear kernel (θ + c·z never stored)
  virtual-copy virtual with ZOENGINE_VIRTUAL_LINEAR=copy: every module gets a materialised
               copy θ + c·z (the unfused path; on CPU the two are the same)
  reference    zoengine.MeZO(backend="reference")  (the pure-PyTorch oracle)
  lowrank      zoengine.ZO(noise="lowrank", rank=--rank, resample_every=--resample-every):
               LOZO's z = U·Vᵀ/√r on 2-D weights, in place (docs/lowrank.md)
  lowrank-virtual  the same with attach_virtual(model): a Linear adds c·(x·V)·Uᵀ, no copy
  lowrank-batched  lowrank-virtual with opt.step_batched: the 2n evaluations as one forward of
               the batch repeated 2n times (``--n-samples``; docs/lowrank.md)
  inference    two plain forward passes (the floor of any two-point ZO step)
  forward1     one plain forward pass

``--dist`` (normal, uniform, rademacher) is MeZO's ``dist`` for native / triton / virtual /
reference; the rows record it. Reports the median step time (wall clock, and process CPU time,
which a shared machine disturbs less) after ``--warmup`` warm-up steps (CUDA: between
torch.cuda.synchronize() calls), peak RSS (CPU) or torch.cuda.max_memory_allocated (CUDA), and
ratios against mezo-ref, inference (two forwards) and forward1 measured in the same run; appends
rows to benchmarks/results/bench_step.csv and prints a markdown table.
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

CONFIGS = ("mezo-ref", "native", "triton", "virtual", "virtual-copy", "reference", "inference",
           "forward1", "lowrank", "lowrank-virtual", "lowrank-batched")
DEFAULT_CONFIGS = {"cpu": "mezo-ref,native,virtual,reference,inference",
                   "cuda": "triton,virtual,virtual-copy,mezo-ref,inference,forward1"}
DISTS = ("normal", "uniform", "rademacher")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LR, EPS, WD = 1e-6, 1e-3, 0.0

# LLaMA shapes built from a config with random init (no download).
LLAMA_SPECS = {
    # TinyLlama-1.1B's shape: 1,100,048,384 parameters (untied embeddings).
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                     max_position_embeddings=2048, tie_word_embeddings=False,
                     rms_norm_eps=1e-5),
    "tiny-llama": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                       max_position_embeddings=256, tie_word_embeddings=False,
                       rms_norm_eps=1e-5),
}
MODELS = ("smollm2", *LLAMA_SPECS)
MODEL_TITLES = {"smollm2": "SmolLM2-135M", "llama-1b": "LLaMA-1.1B (random init)",
                "tiny-llama": "tiny LLaMA (random init)"}


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


def load_smollm2():
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


def build_llama(name: str, dtype, device):
    """A LlamaForCausalLM of shape LLAMA_SPECS[name], random init (seed 0), built directly on
    ``device`` in ``dtype`` (factory functions under torch.device(...) and a default dtype)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA_SPECS[name])
    prev = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype if dtype in (torch.float32, torch.float64) else
                                torch.float32)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype).eval()  # (a no-op when built in place)


def load_model(name: str, dtype, device):
    import torch

    if name == "smollm2":
        model = load_smollm2()
        if dtype != torch.float32 or device.type != "cpu":
            model = model.to(device=device, dtype=dtype)
        return model
    return build_llama(name, dtype, device)


# ---- the step functions ------------------------------------------------------------------

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


def config_backend(config: str, device_type: str, backend: str | None) -> str | None:
    """The zoengine backend a configuration uses (None for the ones without an optimizer)."""
    if config in ("native", "triton", "reference"):
        return config
    if config.startswith("lowrank"):
        return "reference"  # low-rank noise runs on PyTorch ops
    if config.startswith("virtual"):
        return backend or ("triton" if device_type == "cuda" else "native")
    return None


def worker(a) -> None:
    config, device_type = a.worker, a.device
    if config == "virtual-copy":
        os.environ["ZOENGINE_VIRTUAL_LINEAR"] = "copy"  # anything but "fused": materialise
    if (config_backend(config, device_type, a.backend) == "triton" and device_type == "cpu"):
        # Triton kernels on CPU tensors run only in the interpreter, which must be chosen
        # before triton.language is first imported (smoke runs of the GPU path, tiny models).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import numpy as np
    import torch

    import zoengine

    torch.set_num_threads(a.threads)
    np.random.seed(42)
    device = torch.device(device_type)
    cuda = device.type == "cuda"
    dtype = getattr(torch, DTYPES[a.dtype])
    model = load_model(a.model, dtype, device)
    rss_loaded = C.current_rss_mb()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (a.batch, a.seq), generator=g).to(device)

    def closure():
        with torch.inference_mode():
            return model(input_ids=ids, labels=ids).loss

    backend = config_backend(config, device_type, a.backend)
    dist = a.dist if backend is not None else ("normal" if config == "mezo-ref" else "-")
    virtual = config.startswith("virtual") or config in ("lowrank-virtual", "lowrank-batched")
    extra: dict = {"backend": backend or ("torch" if config == "mezo-ref" else "-"),
                   "perturbation": ("virtual" if virtual else
                                    "inplace" if backend or config == "mezo-ref" else "-")}
    if config == "mezo-ref":
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        step = lambda: mezo_reference_step(model, closure, params)  # noqa: E731
    elif config.startswith("lowrank"):
        opt = zoengine.ZO(model.named_parameters(), lr=LR, eps=EPS, weight_decay=WD, seed=0,
                          noise="lowrank", rank=a.rank, resample_every=a.resample_every,
                          n_samples=a.n_samples)
        if virtual:
            opt.attach_virtual(model)
        dist = f"lowrank r={a.rank} nu={a.resample_every}"
        extra.update(rank=a.rank, resample_every=a.resample_every,
                     numbers_per_step=opt.rng_budget()["numbers_generated_per_step"])
        step = lambda: opt.step(closure)  # noqa: E731
        if config == "lowrank-batched":
            from zoengine.optim import group_losses, tile_batch

            def grouped(groups):
                t = tile_batch(ids, groups)
                with torch.inference_mode():
                    return group_losses(model(input_ids=t).logits, t, groups)
            step = lambda: opt.step_batched(grouped)  # noqa: E731
    elif backend is not None:
        opt = zoengine.MeZO(model.named_parameters(), lr=LR, eps=EPS, weight_decay=WD, seed=0,
                            dist=a.dist, backend=backend, n_samples=a.n_samples)
        if virtual:
            opt.attach_virtual(model)
        if virtual:
            fb = list(getattr(opt, "inplace_fallback", []) or [])
            extra.update(inplace_fallback=len(fb), inplace_fallback_names=";".join(fb)[:300],
                         virtual_linear=("fused" if backend == "triton" and os.environ.get(
                             "ZOENGINE_VIRTUAL_LINEAR", "fused") == "fused" else "copy"))
        step = lambda: opt.step(closure)  # noqa: E731
    elif config == "inference":
        step = lambda: (closure(), closure())  # noqa: E731
    elif config == "forward1":
        step = closure
    else:
        raise ValueError(f"config={config!r}: must be one of {CONFIGS}")
    if cuda:
        torch.cuda.synchronize()
        mem_loaded = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    times, cpu, paired = [], [], []
    with torch.no_grad():
        for _ in range(a.steps + a.warmup):
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            out = step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if a.paired:  # 2n plain forwards right after, in this process: a load-paired base
                c0 = time.process_time()
                for _ in range(2 * a.n_samples):
                    closure()
                paired.append(time.process_time() - c0)
    if a.paired:
        extra.update(paired_cpu_s=C.median(paired[a.warmup:]),
                     cpu_vs_paired=C.median([c / f for c, f in zip(cpu[a.warmup:],
                                                                   paired[a.warmup:])]))
    last = out[-1] if isinstance(out, tuple) else out
    result = {"config": config, "model": a.model, "dtype": a.dtype, "dist": dist,
              "device_type": device_type, "step_s": C.median(times[a.warmup:]),
              "warmup_s": times[0], "cpu_s": C.median(cpu[a.warmup:]),
              "all_step_s": [round(t, 4) for t in times[a.warmup:]],
              "rss_loaded_mb": rss_loaded, "last_loss": float(last),
              "n_params": sum(p.numel() for p in model.parameters()),
              "n_samples": a.n_samples, **extra}
    if os.environ.get("TRITON_INTERPRET") == "1" and backend == "triton":
        result["status"] = "triton interpreter on CPU (smoke run: times are not kernel times)"
    if cuda:
        result.update(cuda_loaded_mb=mem_loaded,
                      cuda_peak_mb=torch.cuda.max_memory_allocated() / 2**20)
    C.emit_result({**result, **C.env_info(a.threads)})


# ---- driver --------------------------------------------------------------------------------

def _ratios(rows: list[dict]) -> None:
    by = {r["config"]: r for r in rows}
    mem = "cuda_peak_mb" if all("cuda_peak_mb" in r for r in rows) else "peak_rss_mb"
    for r in rows:
        if "mezo-ref" in by:
            r["time_vs_mezo_ref"] = r["step_s"] / by["mezo-ref"]["step_s"]
            r["cpu_vs_mezo_ref"] = r["cpu_s"] / by["mezo-ref"]["cpu_s"]
        if "inference" in by:
            r["time_vs_inference"] = r["step_s"] / by["inference"]["step_s"]
            r["cpu_vs_inference"] = r["cpu_s"] / by["inference"]["cpu_s"]
            r["rss_vs_inference"] = r["peak_rss_mb"] / by["inference"]["peak_rss_mb"]
            if mem == "cuda_peak_mb":
                r["cuda_peak_vs_inference"] = r["cuda_peak_mb"] / by["inference"]["cuda_peak_mb"]
        if "forward1" in by:
            r["time_vs_forward1"] = r["step_s"] / by["forward1"]["step_s"]
            r["cpu_vs_forward1"] = r["cpu_s"] / by["forward1"]["cpu_s"]


def main(argv=None) -> list[dict] | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (CPU), 16 (CUDA)")
    ap.add_argument("--seq", type=int, default=None, help="default 32 (CPU), 256 (CUDA)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                    help="default fp32 (CPU), bf16 (CUDA)")
    ap.add_argument("--model", choices=MODELS, default=None,
                    help="default smollm2 (CPU), llama-1b (CUDA)")
    ap.add_argument("--dist", choices=DISTS, default="normal",
                    help="MeZO's dist for the native/triton/virtual/reference configurations")
    ap.add_argument("--backend", default=None,
                    help="backend of the virtual configuration (default native on CPU, "
                         "triton on CUDA)")
    ap.add_argument("--rank", type=int, default=2, help="r of the lowrank configurations")
    ap.add_argument("--resample-every", type=int, default=50, help="ν of the lowrank ones")
    ap.add_argument("--n-samples", type=int, default=1,
                    help="n of the ZO configurations (2n evaluations a step)")
    ap.add_argument("--paired", action="store_true",
                    help="after each step, time 2n plain forwards in the same process: "
                         "cpu_vs_paired, a ratio a shared machine's load drift cancels from")
    ap.add_argument("--configs", default=None,
                    help=f"comma separated, from {','.join(CONFIGS)} (default on CPU: "
                         f"{DEFAULT_CONFIGS['cpu']}; on CUDA: {DEFAULT_CONFIGS['cuda']})")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    ap.add_argument("--total-timeout", type=float, default=None,
                    help="seconds for all configurations: a configuration that cannot start "
                         "with 20 s left is not run (and reported), so the rows of the others "
                         "are still written inside an outer time limit")
    ap.add_argument("--csv", type=Path, default=C.RESULTS / "bench_step.csv")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    a.batch = a.batch or (16 if cuda else 8)
    a.seq = a.seq or (256 if cuda else 32)
    a.dtype = a.dtype or ("bf16" if cuda else "fp32")
    a.model = a.model or ("llama-1b" if cuda else "smollm2")
    a.configs = a.configs or DEFAULT_CONFIGS[a.device]
    if a.prepare:
        return prepare()
    if a.worker:
        return worker(a)
    unknown = [c for c in a.configs.split(",") if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}: choose from {CONFIGS}")

    me = Path(__file__).resolve()
    if a.model == "smollm2" and not (weights_dir() / "config.json").exists():
        print(f"dumping SmolLM2-135M weights to {weights_dir()} (once) ...", flush=True)
        C.run_fresh(me, ["--prepare"])
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch),
              "--seq", str(a.seq), "--threads", str(a.threads), "--device", a.device,
              "--dtype", a.dtype, "--model", a.model, "--dist", a.dist, "--rank", str(a.rank),
              "--resample-every", str(a.resample_every), "--n-samples", str(a.n_samples)]
    if a.paired:
        common.append("--paired")
    if a.backend:
        common += ["--backend", a.backend]
    rows, failed = [], []
    t_start = time.monotonic()
    for cfg in a.configs.split(","):
        limit = a.timeout
        if a.total_timeout is not None:
            limit = min(limit, a.total_timeout - (time.monotonic() - t_start))
            if limit < 20:
                print(f"  {cfg}: NOT RUN (--total-timeout {a.total_timeout:g} s spent)",
                      flush=True)
                failed.append(cfg)
                continue
        print(f"running {cfg} ...", flush=True)
        try:
            r = C.run_fresh(me, ["--worker", cfg, *common], timeout=limit)
        except Exception as exc:  # one failing configuration must not lose the others' rows
            print(f"  {cfg}: FAILED: {str(exc)[-1500:]}", flush=True)
            failed.append(cfg)
            continue
        r.update(batch=a.batch, seq=a.seq, steps=a.steps)
        rows.append(r)
        mem = (f"peak CUDA {r['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in r else
               f"peak RSS {r['peak_rss_mb']:.0f} MB")
        fb = f", in-place fallback {r['inplace_fallback']}" if "inplace_fallback" in r else ""
        print(f"  {cfg}: {r['step_s']:.4g} s/step (steps {r['all_step_s']}), {mem}{fb}",
              flush=True)
    if not rows:
        raise SystemExit("no configuration ran")
    _ratios(rows)
    C.append_csv(a.csv, [{k: v for k, v in r.items() if k != "all_step_s"} for r in rows])
    print()
    print(f"{MODEL_TITLES[a.model]} ({rows[0]['n_params'] / 1e6:.1f}M params, {a.dtype}, "
          f"{a.device}), batch {a.batch}x{a.seq}, dist {a.dist}, {a.threads} thread(s), "
          f"median of {a.steps} steps after {a.warmup} warm-up; {rows[0]['device']}, "
          f"torch {rows[0]['torch']}, git {rows[0]['git_sha']}")
    print()
    cols = [("config", "configuration"), ("dist", "dist"), ("step_s", "wall s/step")]
    cols += [] if cuda else [("cpu_s", "CPU s/step")]
    cols += [("time_vs_mezo_ref", "wall / mezo-ref"), ("time_vs_inference", "wall / two forwards")]
    cols += [] if cuda else [("cpu_vs_inference", "CPU / two forwards")]
    if any("time_vs_forward1" in r for r in rows):
        cols.append(("time_vs_forward1", "wall / one forward"))
    if cuda:
        cols += [("cuda_peak_mb", "peak CUDA (MB)"),
                 ("cuda_peak_vs_inference", "peak / inference")]
    else:
        cols += [("peak_rss_mb", "peak RSS (MB)"), ("rss_vs_inference", "RSS / inference")]
    if any(r.get("status") for r in rows):
        cols.append(("status", "status"))
    print(C.markdown_table(rows, cols))
    if failed:
        raise SystemExit(f"configuration(s) failed: {', '.join(failed)} (the others' rows "
                         "were written)")
    return rows


if __name__ == "__main__":
    main()
