"""Forward through a perturbed linear layer: plain vs materialised vs fused noisy linear (issue 14).

    python benchmarks/bench_noisy_linear.py [--shapes 4096x2048x2048,4096x5632x2048,4096x2048x5632
                                             --dtype bf16 --dist normal --reps 20]
    python benchmarks/bench_noisy_linear.py --interpret-smoke   # tiny shapes, CPU interpreter

Shapes are MxNxK: x (M, K) tokens, W (N, K). The defaults are LLaMA-1B-like (hidden 2048,
MLP 5632; q/o, gate/up and down projections) at 4,096 tokens. Providers, on the same tensors:
  linear       F.linear(x, W): the floor (no noise at all)
  materialise  W' = copy of W, triton_ops.perturb_(W') (one launch), F.linear(x, W'): what a
               ZO step does today, minus the restore (the copy keeps W intact)
  fused        triton_noisy_linear.noisy_linear(x, W, ...): z made per W tile in registers,
               W' never stored; products in IEEE fp32 (dot_precision="ieee")
  fused-tf32   the same with dot_precision="tf32" (tensor cores; operands rounded to 10 bits)

Reported: median and best ms of ``--reps`` runs (CUDA events; perf_counter on CPU), ratio of
the median to ``linear``'s, TFLOP/s (2MNK / time), and the max |y - noisy_linear_reference|
(the materialised oracle, W' rounded to the weight dtype) for the noisy providers. Rows go to
benchmarks/results/bench_noisy_linear.csv with device, versions and git sha; a markdown table
is printed. Without a CUDA device every row is written with status "not yet measured" (nothing
runs), except under ``--interpret-smoke``, which runs tiny shapes on CPU tensors under
TRITON_INTERPRET=1 to exercise the script (its times are the interpreter's, not a speed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PROVIDERS = ("linear", "materialise", "fused", "fused-tf32")
DEFAULT_SHAPES = "4096x2048x2048,4096x5632x2048,4096x2048x5632"
SMOKE_SHAPES = "8x16x24,33x20x40,16x12x22"  # K % 4 == 0 (block path) and K = 22 (per element)
SEED, STEP, SAMPLE, KEY, SCALE = 0, 0, 0, 0x50A09EB9, 1e-3


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def _providers(torch, nl, tops, dist: str):
    """provider -> fn(x, W, W_buffer) -> y."""
    F = torch.nn.functional
    kw = dict(key=KEY, seed=SEED, step=STEP, sample=SAMPLE, scale=SCALE, dist=dist)

    def materialise(x, w, buf):
        buf.copy_(w)
        tops.perturb_([buf], [KEY], seed=SEED, step=STEP, sample=SAMPLE, scale=SCALE, dist=dist)
        return F.linear(x, buf)

    return {"linear": lambda x, w, buf: F.linear(x, w),
            "materialise": materialise,
            "fused": lambda x, w, buf: nl.noisy_linear(x, w, **kw),
            "fused-tf32": lambda x, w, buf: nl.noisy_linear(x, w, dot_precision="tf32", **kw)}


def _timed(torch, fn, reps: int, device) -> list[float]:
    """Seconds per run (CUDA events on a GPU), after one warm-up run (compilation)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _row(env, mode, prov, shape, dtype, dist, status, times=None, floor=None, err=None) -> dict:
    M, N, K = shape
    row = {"mode": mode, "provider": prov, "M": M, "N": N, "K": K, "dtype": dtype, "dist": dist,
           "median_ms": "", "best_ms": "", "ratio_to_linear": "", "TFLOPs": "",
           "max_abs_err_vs_reference": "" if err is None else err, "status": status, **env}
    if times:
        med = C.median(times)
        row.update(median_ms=med * 1e3, best_ms=min(times) * 1e3,
                   TFLOPs=2 * M * N * K / med / 1e12,
                   ratio_to_linear=med / floor if floor else "")
    return row


def _measure_shape(torch, env, mode, shape, dname, dist, a, device, impls, nl) -> list[dict]:
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    M, N, K = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtypes[dname]).to(device)
    w = (torch.randn(N, K, generator=g) * 0.02).to(dtypes[dname]).to(device)
    buf = torch.empty_like(w)
    ref = nl.noisy_linear_reference(x, w, key=KEY, seed=SEED, step=STEP, sample=SAMPLE,
                                    scale=SCALE, dist=dist).float()
    rows, floor = [], None
    for prov in a.providers.split(","):
        fn = impls[prov]
        times = _timed(torch, lambda fn=fn: fn(x, w, buf), a.reps, device)
        err = None if prov == "linear" else (fn(x, w, buf).float() - ref).abs().max().item()
        floor = C.median(times) if prov == "linear" else floor
        status = "measured" if mode == "gpu" else "smoke: CPU interpreter, not a speed"
        rows.append(_row(env, mode, prov, shape, dname, dist, status, times, floor, err))
        r = rows[-1]
        print(f"  {M}x{N}x{K} {dname} {prov:12s} {r['median_ms']:10.3f} ms"
              f"{'' if err is None else f'   max err {err:.3g}'}", flush=True)
    return rows


def _setup(a):
    """(torch, device, mode, why-not-measured or None), importing torch after the env var."""
    if a.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton.language is first imported
    import torch

    torch.set_num_threads(a.threads)
    if a.interpret_smoke:
        return torch, torch.device("cpu"), "interpret-smoke", None
    if not torch.cuda.is_available():
        return torch, None, "gpu", "not yet measured (no CUDA device in this run)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return torch, None, "gpu", "not measured: TRITON_INTERPRET=1 is set"
    return torch, torch.device("cuda"), "gpu", None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help=f"MxNxK list (default {DEFAULT_SHAPES}; "
                    f"with --interpret-smoke {SMOKE_SHAPES})")
    ap.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default bf16; smoke fp32)")
    ap.add_argument("--dist", default="normal")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--reps", type=int, default=None, help="default 20 (smoke: 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1 (exercises the script)")
    ap.add_argument("--csv", type=Path, default=C.RESULTS / "bench_noisy_linear.csv")
    a = ap.parse_args(argv)
    smoke = a.interpret_smoke
    shapes = _parse_shapes(a.shapes or (SMOKE_SHAPES if smoke else DEFAULT_SHAPES))
    dname = a.dtype or ("fp32" if smoke else "bf16")
    a.reps = a.reps or (2 if smoke else 20)
    torch, device, mode, why = _setup(a)
    env = C.env_info(a.threads)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    rows = []
    if why is not None:
        rows = [_row(env, mode, p, s, dname, a.dist, why) for s in shapes
                for p in a.providers.split(",")]
        print(why)
    else:
        from zoengine.kernels import triton_noisy_linear as nl
        from zoengine.kernels import triton_ops as tops

        impls = _providers(torch, nl, tops, a.dist)
        for shape in shapes:
            rows += _measure_shape(torch, env, mode, shape, dname, a.dist, a, device, impls, nl)
    C.append_csv(a.csv, rows)
    print()
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, mode {mode}, "
          f"git {env['git_sha']}")
    print()
    print(C.markdown_table(rows, [("M", "M"), ("N", "N"), ("K", "K"), ("dtype", "dtype"),
                                  ("provider", "provider"), ("median_ms", "median ms"),
                                  ("ratio_to_linear", "/ linear"), ("TFLOPs", "TFLOP/s"),
                                  ("max_abs_err_vs_reference", "max err vs oracle"),
                                  ("status", "status")]))


if __name__ == "__main__":
    main()
