"""Step journal on SmolLM2-135M (CPU): its size against the weights', replay time against training.

    python benchmarks/bench_journal.py [--steps 10 --n-samples 1,4 --threads 1]

For each n_samples, full-parameter MeZO (native backend) trains SmolLM2-135M (fp32) after
``opt.set_journal(PATH)`` on batches of Macbeth token blocks (batch 4 x 32, LM loss), then the
starting weights are put back and ``zoengine.journal.replay`` rebuilds the trained weights from
the journal alone (no forward pass); every parameter is checked with ``torch.equal``.

Measured, in the same run and process:
  - training wall / CPU seconds per step (mean of steps 1..N-1; step 0 also hashes the weights
    for the journal header and is reported on its own),
  - replay wall / CPU seconds per step (mean of steps 1..N-1: ``replay(until_step=1)`` first,
    which reads the journal, rebuilds the optimizer and checks the weights' SHA-256, then
    ``replay(optimizer=...)`` for the rest), and the replay's fixed cost (read + build + hash),
  - the journal file's size after N steps, the size of ``model.safetensors`` written by
    ``save_pretrained``, and the cost of appending one record (fsync per record, the default),
    timed on a scratch copy of the journal.
Computed exactly: the record size (``Layout(header).size``), the size of a 1,000-step journal
(header + 1,000 fixed-size records) and the weights' raw fp32 size (sum of numel x 4).
Extrapolated from the N-1 measured steps: the time of a 1,000-step replay (fixed cost + 1,000 x
per-step) and of 1,000 training steps.

Appends one row per n_samples to benchmarks/results/bench_journal.csv and prints a markdown
table. Journals and the scratch safetensors go to the zoengine cache dir, never the repository.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LR, EPS = 1e-6, 1e-3
BATCH, SEQ = 4, 32
APPENDS = 100  # records appended to a scratch journal to time one append


def work_dir() -> Path:
    return C.cache_dir("bench", "journal")


def set_weights(model, state: dict) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])


def time_appends(path: Path, fsync) -> float:
    """Seconds to append one record (pack + write + flush + fsync) to a copy of ``path``."""
    from zoengine.optim.journal_file import JournalWriter, read_records

    header, records, _ = read_records(str(path))
    scratch = path.with_suffix(".append-test")
    if scratch.exists():
        scratch.unlink()
    w = JournalWriter(str(scratch), header, fsync=fsync)
    last = records[-1]
    t0 = time.perf_counter()
    for i in range(APPENDS):
        last.step = 10_000 + i
        w.append(last)
    dt = (time.perf_counter() - t0) / APPENDS
    w.close()
    scratch.unlink()
    return dt


def run_config(model, initial: dict, blocks, n_samples: int, steps: int, backend: str) -> dict:
    import torch

    import zoengine
    from zoengine.journal import read_header, replay
    from zoengine.optim.journal_file import Layout

    path = work_dir() / f"smollm2-135m-mezo-n{n_samples}.zoj"
    if path.exists():
        path.unlink()
    set_weights(model, initial)
    opt = zoengine.MeZO(model.named_parameters(), lr=LR, eps=EPS, seed=0, n_samples=n_samples,
                        backend=backend)
    opt.set_journal(str(path))
    n_batches = blocks.shape[0] // BATCH
    wall, cpu = [], []
    with torch.no_grad():
        for k in range(steps):
            b = blocks[(k % n_batches) * BATCH:(k % n_batches + 1) * BATCH]

            def closure(b=b):
                with torch.inference_mode():
                    return model(input_ids=b, labels=b).loss

            t0, c0 = time.perf_counter(), time.process_time()
            loss = opt.step(closure)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            print(f"  n={n_samples} train step {k}: loss {float(loss):.4f}, {wall[-1]:.2f} s",
                  flush=True)
    opt.close_journal()
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}

    set_weights(model, initial)  # a fresh copy of the starting weights
    t0, c0 = time.perf_counter(), time.process_time()
    ropt = replay(model, str(path), until_step=1)  # read, rebuild, hash check, step 0
    t1, c1 = time.perf_counter(), time.process_time()
    ropt = replay(model, str(path), optimizer=ropt)  # steps 1..N-1
    t2, c2 = time.perf_counter(), time.process_time()
    identical = all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    mismatched = [n for n, p in model.named_parameters() if not torch.equal(p, trained[n])]
    print(f"  n={n_samples} replay: {t2 - t0:.2f} s for {steps} steps, bit-identical "
          f"{identical}", flush=True)
    del trained

    header, first_record = read_header(str(path))
    record = Layout(header).size
    journal_bytes = path.stat().st_size
    assert journal_bytes == first_record + steps * record, (journal_bytes, first_record, record)
    append_s = time_appends(path, "step")

    measured = steps - 1
    train_step = statistics.fmean(wall[1:])
    train_cpu = statistics.fmean(cpu[1:])
    replay_step = (t2 - t1) / measured
    replay_cpu = (c2 - c1) / measured
    replay_fixed = max(0.0, (t1 - t0) - replay_step)
    train_fixed = max(0.0, wall[0] - train_step)
    return {"config": f"MeZO n_samples={n_samples}", "n_samples": n_samples,
            "backend": ropt.backend or "auto", "steps": steps, "measured_steps": measured,
            "bit_identical": identical, "mismatched_tensors": len(mismatched),
            "record_bytes": record, "header_bytes": first_record,
            "journal_bytes": journal_bytes,
            "journal_1000_bytes": first_record + 1000 * record,
            "append_ms": append_s * 1e3,
            "train_step_s": train_step, "train_cpu_s": train_cpu, "train_first_s": wall[0],
            "train_step_median_s": statistics.median(wall[1:]),
            "replay_step_s": replay_step, "replay_cpu_s": replay_cpu,
            "replay_first_s": t1 - t0, "replay_fixed_s": replay_fixed,
            "replay_total_s": t2 - t0,
            "replay_vs_train": replay_step / train_step,
            "replay_cpu_vs_train_cpu": replay_cpu / train_cpu,
            "append_vs_train": append_s / train_step,
            "train_1000_s_extrap": train_fixed + 1000 * train_step,
            "replay_1000_s_extrap": replay_fixed + 1000 * replay_step}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="training steps per n_samples (>= 2)")
    ap.add_argument("--n-samples", default="1,4", help="comma-separated n_samples values")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--csv", type=Path, default=C.RESULTS / "bench_journal.csv")
    a = ap.parse_args(argv)
    ns = [int(x) for x in a.n_samples.split(",")]
    if a.steps < 2:
        ap.error("--steps must be >= 2 (step 0 is timed on its own)")

    import torch

    torch.set_num_threads(a.threads)
    import zoengine
    from zoengine.models import load_default_model

    t_start = time.perf_counter()
    work_dir().mkdir(parents=True, exist_ok=True)
    print("loading SmolLM2-135M (fp32) ...", flush=True)
    model, tok = load_default_model(torch.float32)
    model.eval()
    blocks = zoengine.tasks.lm_blocks(tok, zoengine.tasks.shakespeare().splits["train"]["text"][0],
                                      SEQ)
    named = list(model.named_parameters())
    n_params = sum(p.numel() for _, p in named)
    weights_bytes = sum(p.numel() * p.element_size() for _, p in named)
    initial = {n: p.detach().clone() for n, p in named}

    st_dir = work_dir() / "safetensors"
    shutil.rmtree(st_dir, ignore_errors=True)
    model.save_pretrained(st_dir)
    st_files = sorted(st_dir.glob("*.safetensors"))
    safetensors_bytes = sum(f.stat().st_size for f in st_files)
    shutil.rmtree(st_dir, ignore_errors=True)
    print(f"{n_params / 1e6:.1f}M params: raw fp32 {weights_bytes:,} B, "
          f"model.safetensors {safetensors_bytes:,} B", flush=True)

    env = C.env_info(a.threads)
    rows = []
    for n in ns:
        print(f"running MeZO n_samples={n}, {a.steps} steps ...", flush=True)
        r = run_config(model, initial, blocks, n, a.steps, a.backend)
        r.update(model="SmolLM2-135M-Instruct fp32", n_params=n_params, batch=BATCH, seq=SEQ,
                 weights_bytes=weights_bytes, safetensors_bytes=safetensors_bytes,
                 journal_1000_vs_weights=r["journal_1000_bytes"] / weights_bytes,
                 journal_1000_vs_safetensors=r["journal_1000_bytes"] / safetensors_bytes,
                 **env)
        rows.append(r)
    C.append_csv(a.csv, rows)
    for r in rows:
        r["journal_1000_vs_weights_pct"] = f"{100 * r['journal_1000_vs_weights']:.4f} %"
        r["kb_1000"] = f"{r['journal_1000_bytes']:,}"
        r["hdr"], r["jn"] = f"{r['header_bytes']:,}", f"{r['journal_bytes']:,}"
        r["bit"] = "yes" if r["bit_identical"] else f"NO ({r['mismatched_tensors']} tensors)"
    print()
    print(f"SmolLM2-135M ({n_params / 1e6:.1f}M params, fp32, raw {weights_bytes:,} B, "
          f"model.safetensors {safetensors_bytes:,} B), MeZO lr {LR} eps {EPS}, batch "
          f"{BATCH}x{SEQ}, backend {rows[0]['backend']}, {a.threads} thread(s); "
          f"{env['device']}, torch {env['torch']}, git {env['git_sha']}; "
          f"total {time.perf_counter() - t_start:.0f} s")
    print()
    print(C.markdown_table(rows, [
        ("config", "configuration"), ("steps", "steps run"), ("record_bytes", "record (B)"),
        ("hdr", "header (B)"), ("jn", "journal after N steps (B)"),
        ("kb_1000", "1,000-step journal (B, exact)"),
        ("journal_1000_vs_weights_pct", "1,000-step journal / fp32 weights"),
        ("append_ms", "append+fsync (ms/record)"),
        ("train_step_s", "train wall s/step"), ("replay_step_s", "replay wall s/step"),
        ("replay_vs_train", "replay / train (wall)"),
        ("replay_cpu_vs_train_cpu", "replay / train (CPU)"),
        ("replay_fixed_s", "replay fixed s"),
        ("replay_1000_s_extrap", "1,000-step replay s (extrap.)"),
        ("train_1000_s_extrap", "1,000 train steps s (extrap.)"),
        ("bit", "bit-identical")]))


if __name__ == "__main__":
    main()
