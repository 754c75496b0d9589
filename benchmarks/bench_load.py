"""Peak memory of loading a sharded safetensors model folder: zoengine's loader vs
``transformers.from_pretrained``, each dtype in a fresh process (issue 17, part 4).

    python benchmarks/bench_load.py DIR [DIR ...] [--dtypes float32,bfloat16]
                                    [--loaders zoengine,transformers]

Make a folder with ``python benchmarks/bench_scale.py --save-folder 3b bfloat16 DIR``. The peak
is VmHWM after the load and one pass that reads every parameter (transformers maps files
lazily when the dtype matches, so untouched weights would not be counted yet), minus the RSS
before loading; it is divided by the loaded model's bytes. Target: <= 1.1x.
Rows: benchmarks/results/bench_load.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def worker(folder: str, loader: str, dtype: str, threads: int) -> None:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the window

    from zoengine.loading import checkpoint_bytes, load_pretrained

    torch.set_num_threads(threads)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = C.current_rss_mb() * 2**20
    t = time.perf_counter()
    if loader == "zoengine":
        model = load_pretrained(folder, getattr(torch, dtype))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t
    with torch.no_grad():  # read every weight: lazily mapped pages count from here on
        total = sum(float(c.float().sum()) for p in model.parameters()
                    for c in p.view(-1).split(2**24))  # 16M numbers at a time
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    C.emit_result({"folder": folder, "loader": loader, "dtype": dtype,
                   "checkpoint_gib": round(checkpoint_bytes(folder) / 2**30, 3),
                   "model_gib": round(size / 2**30, 3), "load_s": round(load_s, 1),
                   "peak_over_model": round((C.vm_hwm_bytes() - base) / size, 3),
                   "checksum_finite": bool(total == total)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="*")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--loaders", default="zoengine,transformers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(*a.worker, a.threads)
        return 0
    rows = []
    for folder in a.folders:
        for dtype in a.dtypes.split(","):
            for loader in a.loaders.split(","):
                print(f"{folder} {loader} {dtype} ...", flush=True)
                r = C.run_fresh(Path(__file__), ["--worker", folder, loader, dtype,
                                                 "--threads", str(a.threads)])
                r.update(C.env_info(a.threads))
                rows.append(r)
                C.append_csv(C.RESULTS / "bench_load.csv", [r])
    print(C.markdown_table(rows, [("folder", "folder"), ("checkpoint_gib", "checkpoint GiB"),
                                  ("loader", "loader"), ("dtype", "dtype"),
                                  ("model_gib", "loaded GiB"), ("load_s", "load s"),
                                  ("peak_over_model", "peak / loaded size")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
