"""Throughput of the in-place ZO ops (perturb_, restore_update_) per backend, over sizes.

    python benchmarks/bench_kernels.py [--sizes 1e5,1e6,4e6 --tensors 1,256 --dtypes fp32,bf16
                                        --dists normal --ops perturb,restore_update --reps 5]

Providers, measured in the same run on the same tensors:
  naive      MeZO's code: torch.manual_seed(seed) once per pass, then per tensor
             z = torch.normal(0, 1, size) and θ.data = θ.data + c·z (restore_update = MeZO's
             two passes: the +ε restore, then θ − lr·(g·z + wd·θ) after reseeding); normal only
  reference  zoengine.kernels.reference (pure PyTorch, the oracle)
  native     zoengine.kernels.native_ops (compiled C, CPU tensors), when it builds
  triton     zoengine.kernels.triton_ops, one launch for all tensors (CUDA only: on a CPU
             machine its rows are written with status "not yet measured")
  copy       dst.copy_(src) over the same bytes: the achievable memory bandwidth, as a ceiling

Reported: best and median seconds of ``--reps`` runs, GB/s counting one read and one write of
the parameters (the minimum any in-place op moves), the fraction of the copy provider's GB/s
and, on a GPU with a known peak (table below or ``--peak-gbs``), the fraction of peak memory
bandwidth. Rows are appended to benchmarks/results/bench_kernels.csv with device, versions and
git sha; a markdown table is printed. Full-step ratios (ZO step vs two forwards) are
benchmarks/bench_step.py's job.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# Peak HBM bandwidth in GB/s from the vendors' datasheets (dense, per device).
PEAK_GBS = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H200": 4800.0,
            "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0,
            "L40S": 864.0, "RTX 4090": 1008.0}
PROVIDERS = ("naive", "reference", "native", "triton", "copy")
SEED, STEP, EPS, LR, WD = 0, 0, 1e-3, 1e-6, 0.0


def _parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s]


def _make_params(torch, numel: int, tensors: int, dtype, device):
    """``tensors`` tensors holding ``numel`` elements in all (sizes differ by at most 1)."""
    base, extra = divmod(numel, tensors)
    sizes = [base + (1 if i < extra else 0) for i in range(tensors)]
    return [torch.randn(s, device=device).mul_(0.02).to(dtype) for s in sizes if s > 0]


def _naive_ops(torch):
    def perturb(params, scale):
        torch.manual_seed(SEED)
        for p in params:
            z = torch.normal(0, 1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z

    def restore_update(params, grads):
        perturb(params, EPS)  # MeZO restores with its own pass ...
        torch.manual_seed(SEED)  # ... then reseeds and regenerates z for the update
        for p in params:
            z = torch.normal(0, 1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data - LR * (grads[0] * z + WD * p.data)

    return perturb, restore_update


def _zo_ops(mod):
    def perturb(params, keys, dist):
        mod.perturb_(params, keys, seed=SEED, step=STEP, scale=EPS, dist=dist)

    def restore_update(params, keys, dist, grads):
        mod.restore_update_(params, keys, seed=SEED, step=STEP, eps=EPS, lr=LR, grads=grads,
                            weight_decay=WD, dist=dist)

    return perturb, restore_update


def _available(torch, device) -> dict:
    """provider -> module/callables, or a string saying why it is not measured."""
    out: dict = {"naive": _naive_ops(torch), "copy": None}
    from zoengine.kernels import reference

    out["reference"] = _zo_ops(reference)
    try:
        from zoengine.kernels import native_ops

        probe = torch.zeros(4, device=device)
        why = native_ops.unavailable_reason([probe])
        out["native"] = _zo_ops(native_ops) if why is None else f"unavailable: {why}"
    except Exception as exc:  # not written yet, or failed to build
        out["native"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    if device.type != "cuda":
        out["triton"] = "not yet measured (no CUDA device in this run)"
    else:
        try:
            from zoengine.kernels import triton_ops

            out["triton"] = (_zo_ops(triton_ops) if not triton_ops.is_interpreted() else
                             "not measured: TRITON_INTERPRET=1 is set")
        except Exception as exc:
            out["triton"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return out


def _timed(torch, fn, reps: int, device) -> list[float]:
    fn()  # warm-up: compilation, table cache, allocator
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="elements per op, comma separated "
                    "(default 1e5,1e6,4e6 on CPU; 1e5,1e6,1e7,1e8,1e9 on CUDA)")
    ap.add_argument("--tensors", default="1,256", help="split each size into this many tensors")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--dists", default="normal")
    ap.add_argument("--ops", default="perturb,restore_update")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--samples", type=int, default=1, help="n of restore_update's Σ g_k z_k")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--peak-gbs", type=float, default=None, help="device peak memory GB/s")
    ap.add_argument("--csv", type=Path, default=C.RESULTS / "bench_kernels.csv")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = _parse_sizes(a.sizes or ("1e5,1e6,1e7,1e8,1e9" if device.type == "cuda"
                                     else "1e5,1e6,4e6"))
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    env = C.env_info(a.threads)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    peak = a.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in env["device"]), None)
    providers = _available(torch, device)
    wanted = [p for p in a.providers.split(",") if p]
    grads = [1.0 + k for k in range(a.samples)]
    rows = []
    for numel in sizes:
        for tensors in (int(t) for t in a.tensors.split(",")):
            for dname in a.dtypes.split(","):
                dtype = dtypes[dname]
                try:
                    params = _make_params(torch, numel, tensors, dtype, device)
                except RuntimeError as exc:  # out of memory at the largest sizes
                    print(f"skip {numel:.0e} {dname}: {exc}"[:200])
                    continue
                keys = list(range(len(params)))
                gbytes = 2 * numel * params[0].element_size() / 1e9
                copy_gbs = None
                if "copy" in wanted:
                    src = [p.clone() for p in params]
                    ts = _timed(torch, _copier(params, src), a.reps, device)
                    copy_gbs = gbytes / min(ts)
                    src = None  # free before the ops run
                    rows.append(_row(env, "copy", "copy", dname, "-", numel, tensors, ts,
                                     gbytes, copy_gbs, peak, a.samples))
                for op in a.ops.split(","):
                    for dist in a.dists.split(","):
                        for prov in wanted:
                            if prov == "copy":
                                continue
                            impl = providers.get(prov)
                            if prov == "naive" and dist != "normal":
                                continue  # MeZO's loop only has torch.normal
                            if isinstance(impl, str):
                                rows.append({**_row(env, prov, op, dname, dist, numel, tensors,
                                                    None, gbytes, copy_gbs, peak, a.samples),
                                             "status": impl})
                                continue
                            fn = _bind(prov, impl, op, params, keys, dist, grads)
                            ts = _timed(torch, fn, a.reps, device)
                            rows.append(_row(env, prov, op, dname, dist, numel, tensors, ts,
                                             gbytes, copy_gbs, peak, a.samples))
                            r = rows[-1]
                            print(f"  {op:15s} {prov:9s} {dname} {dist:10s} n={numel:.0e} "
                                  f"T={tensors:<4d} {r['best_s'] * 1e3:9.2f} ms "
                                  f"{r['GB_per_s']:8.2f} GB/s", flush=True)
                params = None  # free before the next size
    C.append_csv(a.csv, rows)
    print()
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"{a.threads} thread(s), git {env['git_sha']}; peak GB/s: {peak or 'unknown'}")
    print()
    print(C.markdown_table(rows, [("op", "op"), ("provider", "provider"), ("dtype", "dtype"),
                                  ("dist", "dist"), ("numel", "elements"),
                                  ("tensors", "tensors"), ("best_s", "best s"),
                                  ("GB_per_s", "GB/s"), ("frac_of_copy", "of copy"),
                                  ("frac_of_peak", "of peak"), ("status", "status")]))


def _copier(dst, src):
    def run():
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    return run


def _bind(prov, impl, op, params, keys, dist, grads):
    perturb, restore_update = impl
    if prov == "naive":
        return (lambda: perturb(params, EPS)) if op == "perturb" else (
            lambda: restore_update(params, grads))
    return (lambda: perturb(params, keys, dist)) if op == "perturb" else (
        lambda: restore_update(params, keys, dist, grads))


def _row(env, provider, op, dtype, dist, numel, tensors, times, gbytes, copy_gbs, peak,
         samples) -> dict:
    row = {"op": op, "provider": provider, "dtype": dtype, "dist": dist, "numel": numel,
           "tensors": tensors, "samples": samples if op == "restore_update" else "",
           "best_s": "", "median_s": "", "GB_per_s": "", "frac_of_copy": "",
           "frac_of_peak": "", "status": "measured", **env}
    if times:
        gbs = gbytes / min(times)
        row.update(best_s=min(times), median_s=C.median(times), GB_per_s=gbs,
                   frac_of_copy=gbs / copy_gbs if copy_gbs else "",
                   frac_of_peak=gbs / peak if peak else "")
    return row


if __name__ == "__main__":
    main()
