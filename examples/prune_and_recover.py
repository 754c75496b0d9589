"""Prune SmolLM2-135M with Wanda, then recover it with MeZO while every pruned zero stays zero.

    python examples/prune_and_recover.py [--pattern 2:4] [--steps 20] [--max-memory 2GiB]

1. load the embedded model; measure held-out Shakespeare perplexity
2. Wanda-prune 50 % (unstructured, 2:4 or 4:8), calibrated on the *train* split; measure
3. plan the recovery under the memory budget (zoengine.sparsity.memory.plan), refuse if nothing fits
4. MeZO recovery on the LM loss with ``masks=`` from the pruner; measure, and check that the
   sparsity at the end is exactly the sparsity after pruning

A few dozen steps take a few minutes on one CPU thread; real recovery needs thousands of steps
(benchmarks/bench_pruned.py measures both perplexity and memory).
"""

from __future__ import annotations

import argparse

import torch

import zoengine
from zoengine import sparsity
from zoengine.models import load_default_model
from zoengine.run.pruning import calibration_blocks
from zoengine.sparsity import memory
from zoengine.tasks import lm_blocks, lm_eval, shakespeare


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pattern", default="unstructured", help="unstructured | 2:4 | 4:8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max-memory", default="2GiB")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    model, tok = load_default_model()
    task = shakespeare()
    train = lm_blocks(tok, task.splits["train"]["text"][0], a.seq)
    test = lm_blocks(tok, task.splits["test"]["text"][0], 128)
    print(f"dense:   perplexity {lm_eval(model, test, 4)['perplexity']:.2f}")

    calib = calibration_blocks(tok, "shakespeare", n_blocks=4, block_size=128)
    masks = sparsity.prune(model, "wanda", 0.5, a.pattern, calib=[calib])
    after_prune = sparsity.sparsity_report(model, masks)
    print(f"pruned:  perplexity {lm_eval(model, test, 4)['perplexity']:.2f}, sparsity "
          f"{after_prune['sparsity']:.4f} ({a.pattern}); masks as bits "
          f"{sparsity.mask_memory(masks)['bit_bytes'] / 2**20:.1f} MiB")

    plan = memory.plan(model, a.max_memory, "mezo", batch_size=a.batch, seq_len=a.seq,
                       dtypes=("float32",), masks=True,
                       masked=sum(m.numel() for m in masks.values()))
    print(plan)
    opt = zoengine.MeZO(model.named_parameters(), lr=a.lr, eps=1e-3, masks=masks)
    g = torch.Generator().manual_seed(0)
    memory.reset_peak()
    for step in range(a.steps):
        b = train[torch.randint(0, len(train), (plan.batch_size,), generator=g)]
        b = b[:, :plan.seq_len]
        loss = opt.step(lambda b=b: model(input_ids=b, labels=b).loss)
        if step % 5 == 0:
            print(f"  step {step:3d}  loss {float(loss):.4f}")
    memory.report_peak(plan)
    end = sparsity.sparsity_report(model, masks)
    params = dict(model.named_parameters())
    pruned = sum(int((~m).sum()) for m in masks.values())
    still_zero = all(bool((params[k].detach()[~m] == 0).all()) for k, m in masks.items())
    # the Q4 dequantised weights also hold a few exact zeros at kept positions: those are live
    # weights and may move, so the check is on the pruned positions
    print(f"recovered: perplexity {lm_eval(model, test, 4)['perplexity']:.2f}, sparsity "
          f"{end['sparsity']:.4f}; all {pruned:,} pruned weights still exactly zero: {still_zero}")
    if a.pattern != "unstructured":
        n, m = sparsity.parse_pattern(a.pattern)
        print(f"still a valid {a.pattern} pattern: "
              f"{all(sparsity.nm_ok(params[k], n, m) for k in masks)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
