"""hwsim generator throughput on CPU: bit-accurate LFSR words and float32 streams per second.

    python benchmarks/bench_hwsim_generators.py [--instances 4096 --clocks 2048 --numel 4000000 --reps 7 --threads 1]

Rows: ``zoengine.hwsim.generators.source_words("lfsr", bits=8)`` (the raw W-bit words of
``--instances`` LFSRs over ``--clocks`` clocks, as the RTL emits them) and
``generators.stream("lfsr-uniform", --numel)`` (unit-variance float32 samples, what
``noise="hw:lfsr-uniform"`` feeds a ZO step). numpy only, no torch in the timed calls. Reports
the best and the median of ``--reps`` timed runs after one warm-up, and values per CPU-second
(process time), appends rows to benchmarks/results/bench_hwsim_generators.csv and prints a
markdown table. This measurement used to be a timed assertion in
tests/test_hwsim_generators.py; the test now checks shapes and dtypes of the same calls only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=4096)
    ap.add_argument("--clocks", type=int, default=2048)
    ap.add_argument("--numel", type=int, default=4_000_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", type=Path, default=C.RESULTS / "bench_hwsim_generators.csv")
    a = ap.parse_args(argv)

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)  # before numpy is imported
    import torch  # env_info reads its version; nothing timed uses it

    from zoengine.hwsim import generators as G

    torch.set_num_threads(a.threads)
    cases = [
        (f"lfsr raw words, W=8, {a.instances} instances x {a.clocks} clocks", "uint8",
         lambda: G.source_words("lfsr", seed=0, instances=a.instances, clocks=a.clocks, bits=8)),
        ("stream lfsr-uniform", "float32",
         lambda: G.stream("lfsr-uniform", a.numel, seed=0)),
    ]
    env = C.env_info(a.threads)
    rows = []
    for name, dtype, fn in cases:
        n = fn().size  # the values one call makes (its first call, outside the timing)
        r = {"generator": name, "dtype": dtype, "values": n, **C.throughput(fn, n, a.reps),
             "reps": a.reps, **env}
        rows.append(r)
        print(f"  {name}: best {r['best_M_per_s']:.1f} M/s, median {r['median_M_per_s']:.1f} M/s",
              flush=True)
    C.append_csv(a.csv, rows)
    print()
    print(f"{a.threads} thread(s), {env['device']}, torch {env['torch']}, git {env['git_sha']}")
    print()
    print(C.markdown_table(rows, [("generator", "generator"), ("dtype", "dtype"),
                                  ("values", "values per call"),
                                  ("best_M_per_s", "best M values/s"),
                                  ("median_M_per_s", "median M values/s"),
                                  ("cpu_median_M_per_s", "M values per CPU-s (median)")]))


if __name__ == "__main__":
    main()
