"""Low-rank noise and batched samples: step time against plain forwards, random numbers, memory.

    python benchmarks/bench_lowrank.py                      # SmolLM2-135M, fp32, 1 thread
    python benchmarks/bench_lowrank.py --model tiny-llama --steps 1   # smoke run (seconds)

Two sweeps of ``benchmarks/bench_step.py`` configurations, each in a fresh subprocess:

- ranks: at n = 1, r in {1, 2, 4, 8}: full-rank MeZO in place (native kernels) and virtual,
  low-rank in place, virtual, and batched (``step_batched``);
- samples: at r = 2, n in {1, 4, 16}: full-rank native in place, low-rank virtual one group at
  a time (``step``) and batched (``step_batched``: one forward of the batch repeated 2n times).

Each row's CPU time per step is divided by that of 2n plain forwards of the same batch timed
right after each step in the same process (``bench_step.py --paired``): the cost of the step
beyond evaluating its 2n points, paired so that a shared machine's changing load cancels. n = 16
times one step after the warm-up (each is ~70 CPU-s on SmolLM2). Appends rows to benchmarks/results/bench_lowrank.csv
(device, versions, git sha in every row) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_step  # noqa: E402

RANKS = (1, 2, 4, 8)
SAMPLES = (1, 4, 16)


def sweep(common: list[str], csv: Path, steps: int) -> list[dict]:
    """Every point of both sweeps. Each ZO configuration times 2n plain forwards right after
    each of its steps, in its own process (``--paired``): ``cpu_vs_paired`` is the step over
    those, a ratio the load drift of a shared machine cancels from; the ``inference`` row gives
    the memory baseline."""
    rows = []
    base = bench_step.main([*common, "--steps", str(steps), "--configs", "inference",
                            "--csv", str(csv)])
    rows += [dict(base[0], sweep="baseline", rank="-", cpu_vs_paired=1.0)]
    for r in RANKS:
        configs = "lowrank,lowrank-virtual,lowrank-batched" + (",native,virtual" if r == 1
                                                                else "")
        for row in bench_step.main([*common, "--steps", str(steps), "--paired", "--configs",
                                    configs, "--rank", str(r), "--n-samples", "1", "--csv",
                                    str(csv)]):
            rows.append(dict(row, sweep="ranks"))
    for n in SAMPLES[1:]:  # n = 1 is the ranks sweep's r = 2
        configs = "native,lowrank-virtual,lowrank-batched"
        for row in bench_step.main([*common, "--steps", str(steps if n < 16 else 1),
                                    "--paired", "--configs", configs, "--rank", "2",
                                    "--n-samples", str(n), "--csv", str(csv)]):
            rows.append(dict(row, sweep="samples"))
    for row in rows:
        row["rss_vs_inference"] = row["peak_rss_mb"] / base[0]["peak_rss_mb"]
        row.setdefault("rank", "-")
        row.setdefault("numbers_per_step", "-")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=bench_step.MODELS)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resample-every", type=int, default=50)
    ap.add_argument("--csv", type=Path, default=C.RESULTS / "bench_lowrank.csv")
    a = ap.parse_args(argv)
    common = ["--model", a.model, "--batch", str(a.batch), "--seq",
              str(a.seq), "--threads", str(a.threads), "--resample-every",
              str(a.resample_every)]
    steps_csv = a.csv.with_name(a.csv.stem + "_steps.csv")  # bench_step's own rows
    rows = sweep(common, steps_csv, a.steps)
    C.append_csv(a.csv, rows)
    print()
    print(f"{bench_step.MODEL_TITLES[a.model]}, fp32, CPU, batch {a.batch}x{a.seq}, "
          f"{a.threads} thread(s), ν = {a.resample_every}, median of {a.steps} steps; "
          f"{rows[0]['device']}, torch {rows[0]['torch']}, git {rows[0]['git_sha']}")
    print()
    print(C.markdown_table(rows, [
        ("sweep", "sweep"), ("config", "configuration"), ("rank", "r"), ("n_samples", "n"),
        ("cpu_s", "CPU s/step"), ("cpu_vs_paired", "CPU / 2n forwards (paired)"),
        ("numbers_per_step", "random numbers / step"), ("peak_rss_mb", "peak RSS (MB)"),
        ("rss_vs_inference", "RSS / inference")]))


if __name__ == "__main__":
    main()
