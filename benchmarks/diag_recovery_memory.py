"""Why bench_recovery.py's ZO-full peak read 1.17x inference while bench_pruned.py read 1.05x.

    python benchmarks/diag_recovery_memory.py infer            # the baseline
    python benchmarks/diag_recovery_memory.py dict             # bench_recovery's old setup
    python benchmarks/diag_recovery_memory.py dict-trim        # ... + malloc_trim(0) after setup
    python benchmarks/diag_recovery_memory.py dict-nopacked    # ... without its packed copy
    python benchmarks/diag_recovery_memory.py zeros            # masks="zeros" (the fix)
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/diag_recovery_memory.py dict
    ... --loader hf                                            # transformers.from_pretrained

One fresh process per call (run them one after another): loads bench_recovery.py's Wanda-50 %
model, sets up as the mode says, then reads RSS, RssAnon/RssFile and the VmHWM of each phase
(eval before, ``--steps`` MeZO steps, eval after; the window is reset before each) and prints
one JSON line. docs/sparsity.md ("Recovering a pruned model") has the measured table.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _recovery as R  # noqa: E402


def status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "RssAnon", "RssFile")):
                out[line.split(":")[0]] = int(line.split()[1]) // 1024
    return out


def load(loader: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoengine.tasks import lm_blocks, shakespeare

    folder = R.model_dir("wanda50")
    if loader == "hf":  # what bench_recovery.py's rows used before zoengine.loading
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    else:
        from zoengine.run.resources import load_model

        model, tok = load_model(folder)
    task = shakespeare(block_size=64)
    return model, {s: lm_blocks(tok, task.splits[s]["text"][0], 64) for s in ("train", "test")}


def setup(mode: str, model) -> object:
    from zoengine import sparsity as S
    from zoengine.optim import create
    from zoengine.optim.masks import pack_mask

    params = list(model.named_parameters())
    if mode == "zeros":
        return create("mezo", params, lr=3e-5, eps=1e-3, seed=0, masks="zeros"), None
    masks = S.masks_from_zeros(model)  # 101 MiB of bool on SmolLM2
    packed = None if "nopacked" in mode else {n: pack_mask(m) for n, m in masks.items()}
    opt = create("mezo", params, lr=3e-5, eps=1e-3, seed=0, masks=masks)
    del masks
    gc.collect()
    if "trim" in mode:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return opt, packed


def main(argv=None) -> int:
    import numpy as np
    import torch

    from zoengine.sparsity import memory
    from zoengine.tasks import lm_eval, lm_loss

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("infer", "dict", "dict-trim", "dict-nopacked", "zeros"))
    ap.add_argument("--loader", choices=("zoengine", "hf"), default="zoengine")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, blocks = load(a.loader)
    out = {"mode": a.mode, "loader": a.loader, "load": status()}
    opt, _packed = setup(a.mode, model) if a.mode != "infer" else (None, None)
    out["setup"] = status()
    phases = [("eval_before", lambda: lm_eval(model, blocks["test"], 4))]
    if opt is not None:
        def train():
            for s in range(a.steps):
                idx = np.random.RandomState(s).randint(0, len(blocks["train"]), 4)
                b = blocks["train"][torch.as_tensor(idx)]
                with torch.no_grad():
                    opt.step(lambda b=b: lm_loss(model, b))
        phases += [("train", train), ("eval_after", lambda: lm_eval(model, blocks["test"], 4))]
    for name, fn in phases:
        memory.reset_peak()
        t0 = time.process_time()
        fn()
        out[name] = dict(status(), peak=round(memory.peak_memory() / 2**20, 1),
                         cpu_s=round(time.process_time() - t0, 1))
    out["peak_mb"] = max(out[n]["peak"] for n, _ in phases)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
