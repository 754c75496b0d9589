"""Helpers shared by the benchmark scripts: environment rows, CSV, fresh-process runs, tables.

Importing this module does not import torch, so a driver that only spawns workers stays small
(its memory is not what we measure).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
_MARK = "@@BENCH_RESULT@@ "  # a worker's result line on stdout: marker + JSON


def cache_dir(*parts: str) -> Path:
    """A folder under zoengine's cache ($ZOENGINE_CACHE_DIR, else $XDG_CACHE_HOME/zoengine, else
    ~/.cache/zoengine): benchmarks keep dumped weights there, never in the repository."""
    base = os.environ.get("ZOENGINE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "zoengine")
    return Path(base).joinpath(*parts)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The CUDA device name when torch sees one, else the CPU model."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return cpu_model()


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown" if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(threads: int) -> dict:
    """The columns every benchmark row carries: device, versions, git sha, time, threads."""
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = "none"
    return {"device": device_name(), "torch": torch.__version__, "transformers": tf_version,
            "python": platform.python_version(), "git_sha": git_sha(),
            "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "threads": threads}


def append_csv(path: Path, rows: Sequence[dict]) -> None:
    """Append rows; if the columns changed since the file was written, rewrite it with the union."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    fields: list[str] = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            old = list(reader)
    new_fields = fields + [k for r in rows for k in r if k not in fields]
    new_fields = list(dict.fromkeys(new_fields))
    if new_fields == fields:
        with open(path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=fields).writerows(rows)
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=new_fields)
        w.writeheader()
        w.writerows(old)
        w.writerows(rows)
    os.replace(tmp, path)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (ru_maxrss is KiB on Linux)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def current_rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def vm_hwm_bytes() -> int:
    """This process's peak RSS since the last ``clear_refs`` reset (Linux VmHWM), in bytes."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def emit_result(result: dict) -> None:
    """Called by a worker: print its result (with peak RSS) for run_fresh to pick up."""
    result = dict(result, peak_rss_mb=round(peak_rss_mb(), 1))
    print(_MARK + json.dumps(result), flush=True)


def result_in(lines: Sequence[str]) -> dict | None:
    """The last result a worker emitted in ``lines`` (its stdout or log), or None."""
    for line in reversed(lines):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    return None


def run_fresh(script: Path, args: Sequence[str], timeout: float = 3600) -> dict:
    """Run ``python script *args`` in a fresh interpreter and return the dict it emitted.

    A fresh process per configuration makes ru_maxrss the peak of that configuration alone.
    """
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if (result := result_in(proc.stdout.splitlines())) is not None:
        return result
    raise RuntimeError(f"{script.name} {' '.join(args)} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def run_logged(script: Path, args: Sequence[str], log: Path) -> dict:
    """``run_fresh`` with the child's output kept in ``log`` (long stages: read it while it
    runs) and the child's own wall and CPU seconds added (``proc_wall_s``, ``proc_cpu_s``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(script), *args], stdout=f,
                             stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if (result := result_in(log.read_text().splitlines())) is not None:
        return dict(result, proc_wall_s=wall, proc_cpu_s=ru.ru_utime + ru.ru_stime)
    raise RuntimeError(f"{script.name} {' '.join(args[:2])} failed (status {status}); see {log}")


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def throughput(fn, numel: int, reps: int) -> dict:
    """Values per second of ``fn()`` (which makes ``numel`` values): one warm-up call, then the
    best and the median wall time of ``reps`` calls and the median process (CPU) time."""
    fn()  # warm-up (and, for the native backend, its build)
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"best_M_per_s": numel / min(times) / 1e6,
            "median_M_per_s": numel / median(times) / 1e6,
            "cpu_median_M_per_s": numel / median(cpu) / 1e6}


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """rows -> markdown; columns are (key, header) pairs; floats get 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)
