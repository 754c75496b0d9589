"""Data-parallel ZO over torch.distributed: steps/s and bytes per step for 1, 2, 4 processes.

    python benchmarks/bench_distributed.py [--worlds 1,2,4 --steps 12 --threads 1]

A LLaMA-architecture model from a config (random init, 6.03M parameters: hidden 256, 4 layers,
vocab 4096), batch 4 x 64 tokens per rank, MeZO (native backend) for ``--steps`` timed steps
after 2 warm-up steps, in two modes:
  losses   every rank evaluates the same perturbation on its own batch, losses all-reduced
  samples  n_samples = world: rank r evaluates sample r, the (l+, l-) pairs all-gathered
Each configuration is ``world`` fresh processes (gloo on CPU, NCCL when CUDA is available),
rendezvous on a free local port. Bytes are counted by wrapping ``dist.all_reduce`` /
``dist.all_gather`` (payload bytes a rank hands to the collective, per step; the drift guard
is off here and reported on its own: one int64 all-gather every K steps). Next to them: what
data-parallel backprop sends per step, a ring all-reduce of the fp32 gradients, 2·(w−1)/w ×
parameter bytes per rank (computed, not measured).

On the 2-core machine of these sessions, 4 processes oversubscribe the cores: steps/s then
measures the CPU, not the exchange. Rows go to benchmarks/results/bench_distributed.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HIDDEN, LAYERS, VOCAB, BATCH, SEQ = 256, 4, 4096, 4, 64


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=SEQ)
    return LlamaForCausalLM(cfg).eval()


def worker(mode: str, steps: int, threads: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    import zoengine
    from zoengine.optim.exchange import ScalarExchange

    torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    exchange = None
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        exchange = ScalarExchange(mode, check_every=0)
    sent: list[int] = []
    if world > 1:
        real_reduce, real_gather = dist.all_reduce, dist.all_gather

        def all_reduce(t, *a, **k):
            sent.append(t.numel() * t.element_size())
            return real_reduce(t, *a, **k)

        def all_gather(parts, t, *a, **k):
            sent.append(t.numel() * t.element_size())
            return real_gather(parts, t, *a, **k)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather
    model = _model()
    params = sum(p.numel() for p in model.parameters())
    n = world if mode == "samples" else 1
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-5, eps=1e-3, n_samples=n,
                        backend="native")
    opt.set_distributed(exchange)
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(steps + 2):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        if world > 1:
            dist.barrier()
        before = len(sent)
        t0 = time.perf_counter()
        opt.step(lambda ids=ids: model(input_ids=ids, labels=ids).loss)
        times.append(time.perf_counter() - t0)
        step_bytes = sum(sent[before:])
    from zoengine.journal import tensors_hash

    digest = tensors_hash(list(model.named_parameters()))
    result = {"rank": rank, "params": params, "step_s": C.median(times[2:]),
              "bytes_per_step": step_bytes, "sha256": digest}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, mode: str, steps: int, threads: int) -> dict:
    out = C.cache_dir("bench_distributed", f"{mode}-{world}")
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rank*.json"):
        f.unlink()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(threads)}
    args = [sys.executable, __file__, "--worker", mode, "--steps", str(steps), "--threads",
            str(threads), "--out", str(out)]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=C.ROOT)
             for r in range(world)]
    logs = [p.communicate(timeout=1800)[0].decode() for p in procs]
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise RuntimeError(f"{mode} x {world} failed:\n{log[-3000:]}")
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    r0 = ranks[0]
    return {"mode": mode, "world": world, "params": r0["params"],
            "step_s": max(r["step_s"] for r in ranks),
            "steps_per_s": 1.0 / max(r["step_s"] for r in ranks),
            "rows_per_s": world * BATCH / max(r["step_s"] for r in ranks),
            "zo_bytes_per_step": r0["bytes_per_step"],
            "backprop_ring_bytes_per_step": int(2 * (world - 1) / world * 4 * r0["params"]),
            "replicas_identical": len({r["sha256"] for r in ranks}) == 1}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--modes", default="losses,samples")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", type=Path, default=C.RESULTS / "bench_distributed.csv")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.steps, a.threads, a.out)
    rows = []
    for mode in a.modes.split(","):
        for world in [int(w) for w in a.worlds.split(",")]:
            if mode == "samples" and world == 1:
                continue  # the same as losses x 1
            row = {**C.env_info(a.threads), **launch(world, mode, a.steps, a.threads)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    C.append_csv(a.csv, rows)
    print(C.markdown_table(rows, [
        ("mode", "mode"), ("world", "processes"), ("params", "parameters"),
        ("step_s", "s/step"), ("rows_per_s", "rows/s (all ranks)"),
        ("zo_bytes_per_step", "ZO bytes/step (per rank, sent)"),
        ("backprop_ring_bytes_per_step", "backprop ring all-reduce bytes/step (per rank)"),
        ("replicas_identical", "replicas identical")]))


if __name__ == "__main__":
    main()
