"""How memory and step time grow from 135M to 7B parameters (issue 17), on this machine.

    python benchmarks/bench_scale.py [--sizes 135m,360m,1b,3b,7b] [--dtypes float32,bfloat16]
                                     [--methods inference,mezo,...] [--batch 2 --seq 128]
    python benchmarks/bench_scale.py --report     # table, plot and largest-model statement

LLaMA-architecture models built from configs (shapes of SmolLM2-135M/360M, Llama-3.2-1B/3B and
Llama-2-7B, all with SmolLM2's 49,152-token vocabulary), randomly initialised (cost does not
depend on the values). Each (size, dtype, method) runs in a fresh process:

  inference   one forward with the LM loss under ``inference_mode``
  mezo, kerzoo, pezo, dizo
              ``zoengine.optim.create(name, model.named_parameters())``: one step = 2 forwards
  adam        ``torch.optim.Adam`` on every parameter, with backprop (states in the param dtype)
  adam8bit    bitsandbytes' ``Adam8bit`` (its CPU path), when bitsandbytes is installed
  lora-adam   PEFT LoRA r=8 on q_proj,v_proj, Adam on the adapters, backprop through the base

Peak: VmHWM of the process, reset after the model is built (so it is the step's peak, with the
~0.4 GiB of interpreter, torch and transformers the planner also counts). Step time is divided
by two forwards timed in the same process. Before a configuration runs, the memory planner
predicts its peak (``zoengine.sparsity.memory.predict``); when that exceeds ``--limit-gib``
(default 21: this machine has 24 GiB and the OS and other processes need some), the row says
"does not fit" with the prediction, and nothing runs. Rows: benchmarks/results/bench_scale.csv.
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

CSV = C.RESULTS / "bench_scale.csv"
VOCAB = 49152  # SmolLM2's tokenizer, so the same folders can train on the bundled tasks
SIZES = {  # name -> (hidden, intermediate, layers, heads, kv heads, tied embeddings)
    "135m": (576, 1536, 30, 9, 3, True),     # SmolLM2-135M
    "360m": (960, 2560, 32, 15, 5, True),    # SmolLM2-360M
    "1b": (2048, 8192, 16, 32, 8, True),     # Llama-3.2-1B's blocks
    "3b": (3072, 8192, 28, 24, 8, True),     # Llama-3.2-3B's blocks
    "7b": (4096, 11008, 32, 32, 32, False),  # Llama-2-7B's blocks
}
PLANNED_ONLY = {  # priced by the planner only (beyond this machine): the largest-model bound
    "8b": (4096, 14336, 32, 32, 8, False),   # Llama-3.1-8B's blocks
    "13b": (5120, 13824, 40, 40, 40, False),  # Llama-2-13B's blocks
    "30b": (6656, 17920, 60, 52, 52, False),  # LLaMA-30B's blocks
}
ZO = ("mezo", "kerzoo", "pezo", "dizo")
METHODS = ("inference", *ZO, "adam", "adam8bit", "lora-adam")


def llama_config(size: str):
    from transformers import LlamaConfig

    d, i, n, h, kv, tied = {**SIZES, **PLANNED_ONLY}[size]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=i,
                       num_hidden_layers=n, num_attention_heads=h, num_key_value_heads=kv,
                       tie_word_embeddings=tied, max_position_embeddings=2048)


def predicted_bytes(size: str, method: str, dtype: str, batch: int, seq: int) -> int:
    """The planner's peak for this configuration (from the config alone: nothing built)."""
    from zoengine.sparsity import memory

    return memory.predict(llama_config(size), method, batch, seq, dtype).predicted


def build(size: str, dtype: str):
    """The model with initialisation skipped, its weights filled by tiling one 1M-number
    N(0, 0.02) draw (norm weights: 1): cost does not depend on the values, and a 7B model fills
    in seconds at memory speed instead of minutes of random draws."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(llama_config(size), dtype=getattr(torch, dtype))
    model.tie_weights()
    pool = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.view(-1)
            if name.endswith("norm.weight"):
                flat.fill_(1.0)
                continue
            for start in range(0, flat.numel(), pool.numel()):
                n = min(pool.numel(), flat.numel() - start)
                flat[start:start + n].copy_(pool[:n])
    return model.eval()


def make_step(model, method: str, ids):
    """The function one row times: a forward (inference) or one optimizer step."""
    import torch

    def loss():
        return model(input_ids=ids, labels=ids).loss

    if method == "inference":
        def step():
            with torch.inference_mode():
                return loss()
        return step
    if method in ZO:
        from zoengine.optim import create

        opt = create(method, model.named_parameters(), lr=1e-7, eps=1e-3, seed=0)
        return lambda: opt.step(loss)
    if method == "lora-adam":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                                 target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "adam8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.Adam8bit(params, lr=1e-6)
    else:
        opt = torch.optim.Adam(params, lr=1e-6)

    def backprop_step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids).loss
        out.backward()
        opt.step()
        return out.detach()
    return backprop_step


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        float(fn())
        out.append(time.perf_counter() - t)
    return out


def worker(size: str, dtype: str, method: str, batch: int, seq: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    rss_base = C.current_rss_mb()
    t0 = time.perf_counter()
    model = build(size, dtype)
    build_s = time.perf_counter() - t0
    with open("/proc/self/clear_refs", "w") as f:  # the peak window starts here
        f.write("5")
    ids = torch.randint(VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in model.parameters())
    # bf16 matmuls run ~4x slower than fp32 on this AVX2-only CPU (no native bf16): beyond
    # ~1.5G fp32-equivalent parameters a forward takes > 10 s, so one step is timed, not three;
    # bitsandbytes' CPU Adam8bit updates ~4M parameters/s: always one step
    big = params * (4 if dtype == "bfloat16" else 1) > 1.5e9 or method == "adam8bit"
    with torch.no_grad():
        fwd = timed(lambda: model(input_ids=ids, labels=ids).loss, 2)
    fwd_s = fwd[1]  # the first forward touches cold pages and caches
    step = make_step(model, method, ids)
    steps = timed(step, 1 if big else 3)
    step_s = C.median(steps[1:] or steps)
    C.emit_result({"size": size, "dtype": dtype, "method": method, "params": params,
                   "batch": batch, "seq": seq, "build_s": round(build_s, 1),
                   "forward_s": round(fwd_s, 3), "step_s": round(step_s, 3),
                   "step_over_two_forwards": round(step_s / (2 * fwd_s), 3),
                   "step_timed": len(steps), "peak_gib": round(C.vm_hwm_bytes() / 2**30, 3),
                   "rss_before_model_gib": round(rss_base / 1024, 3),
                   "loadavg_1m": round(os.getloadavg()[0], 2)})


def run_row(size, dtype, method, a) -> dict:
    pred = predicted_bytes(size, method, dtype, a.batch, a.seq)
    row = {"size": size, "dtype": dtype, "method": method, "batch": a.batch, "seq": a.seq,
           "predicted_gib": round(pred / 2**30, 3)}
    if pred > a.limit_gib * 2**30:
        row["status"] = f"does not fit: predicted {pred / 2**30:.1f} GiB > {a.limit_gib} GiB"
        return row
    args = ["--worker", f"{size},{dtype},{method}", "--batch", str(a.batch), "--seq",
            str(a.seq), "--threads", str(a.threads)]
    try:
        row.update(C.run_fresh(Path(__file__), args, timeout=a.timeout))
        row["status"] = "measured"
    except RuntimeError as exc:  # killed (out of memory) or failed: say which
        row["status"] = "failed: " + str(exc).splitlines()[0][-160:]
    if "peak_gib" in row:
        row["planner_error"] = round(row["predicted_gib"] / row["peak_gib"] - 1, 3)
    return row


def save_folder(size: str, dtype: str, folder: str) -> None:
    """A Hugging Face model folder of ``size`` (sharded safetensors, SmolLM2's tokenizer) for
    ``zoengine train --model folder``: what the ``--max-memory`` check at >= 3B trains."""
    from zoengine.models import load_default_model

    _, tok = load_default_model()
    model = build(size, dtype)
    model.save_pretrained(folder, max_shard_size="2GB")
    tok.save_pretrained(folder)
    print(f"wrote {folder}: {sum(p.numel() for p in model.parameters()):,} parameters, {dtype}")


def applicable(method: str) -> bool:
    if method == "adam8bit":
        import importlib.util

        return importlib.util.find_spec("bitsandbytes") is not None
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-gib", type=float, default=21.0)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--report", action="store_true", help="table, plot, largest models")
    ap.add_argument("--budget-gib", type=float, default=22.0, help="--report: usable memory")
    ap.add_argument("--save-folder", nargs=3, metavar=("SIZE", "DTYPE", "DIR"),
                    help="write a model folder of SIZE in DTYPE to DIR, and stop")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        size, dtype, method = a.worker.split(",")
        worker(size, dtype, method, a.batch, a.seq, a.threads)
        return 0
    if a.save_folder:
        save_folder(*a.save_folder)
        return 0
    if a.report:
        from scale_report import report

        return report(CSV, a.budget_gib)
    for size in a.sizes.split(","):
        for dtype in a.dtypes.split(","):
            for method in [m for m in a.methods.split(",") if applicable(m)]:
                print(f"{size} {dtype} {method} ...", flush=True)
                row = run_row(size, dtype, method, a)
                row.update(C.env_info(a.threads))
                C.append_csv(CSV, [row])
                print("   ", json.dumps({k: row.get(k) for k in (
                    "status", "peak_gib", "predicted_gib", "step_over_two_forwards")}),
                    flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
