"""Noise throughput on CPU: values per second of each generator, one thread by default.

    python benchmarks/bench_noise.py [--numel 4194304 --reps 7 --threads 1]

Rows: torch.normal (MeZO's generator), the reference oracle (eager-PyTorch Philox, as
zoengine.noise.generate and zoengine/kernels/reference.py use it), and the native backend, both as pure
generation into a buffer (``native_ops.noise``) and as the op a ZO step runs (``perturb_`` of an
fp32 tensor: generate, scale, add, store). Reports the best and the median of ``--reps`` timed
runs (the best is the least disturbed by other processes on a shared machine) and values per
CPU-second (process time, which excludes time the process waited for a core), appends rows to
benchmarks/results/bench_noise.csv and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 22)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", type=Path, default=C.RESULTS / "bench_noise.csv")
    a = ap.parse_args(argv)

    import torch

    from zoengine import noise
    from zoengine.kernels import native_ops

    torch.set_num_threads(a.threads)
    n = a.numel
    x = torch.zeros(n)
    step = iter(range(10**9))
    cases = [
        ("torch.normal(0, 1, size)", "normal", lambda: torch.normal(0, 1, size=(n,))),
        ("Tensor.normal_() in place", "normal", lambda: x.normal_()),
        ("reference oracle noise.generate", "normal",
         lambda: noise.generate(n, seed=0, step=next(step), key=1)),
    ]
    reason = native_ops.unavailable_reason([x])
    if reason is None:
        for dist in ("normal", "uniform", "rademacher"):
            cases.append((f"native noise() {dist}", dist,
                          lambda d=dist: native_ops.noise(n, seed=0, step=next(step), key=1, dist=d)))
        for dist in ("normal", "uniform", "rademacher"):
            cases.append((f"native perturb_ fp32 {dist}", dist,
                          lambda d=dist: native_ops.perturb_([x], [1], seed=0, step=next(step),
                                                             scale=1e-3, dist=d)))
    else:
        print(f"native backend unavailable: {reason}")
    env = C.env_info(a.threads)
    variant = native_ops.build_info()["variant"] if reason is None else "unavailable"
    rows = []
    for name, dist, fn in cases:
        reps = a.reps if "oracle" not in name else max(2, a.reps // 3)  # the oracle is slow
        r = {"generator": name, "dist": dist, "numel": n, **C.throughput(fn, n, reps), "reps": reps,
             "native_variant": variant, **env}
        rows.append(r)
        print(f"  {name}: best {r['best_M_per_s']:.0f} M/s, median {r['median_M_per_s']:.0f} M/s",
              flush=True)
    base = rows[0]["best_M_per_s"]
    for r in rows:
        r["best_vs_torch_normal"] = r["best_M_per_s"] / base
    C.append_csv(a.csv, rows)
    print()
    print(f"{n:,} values, {a.threads} thread(s), {env['device']}, torch {env['torch']}, "
          f"native build {variant}, git {env['git_sha']}")
    print()
    print(C.markdown_table(rows, [("generator", "generator"), ("dist", "dist"),
                                  ("best_M_per_s", "best M values/s"),
                                  ("median_M_per_s", "median M values/s"),
                                  ("cpu_median_M_per_s", "M values per CPU-s (median)"),
                                  ("best_vs_torch_normal", "best / torch.normal")]))


if __name__ == "__main__":
    main()
