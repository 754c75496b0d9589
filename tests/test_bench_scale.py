"""benchmarks/bench_scale.py's decisions without running a model: what the planner says fits,
the first-order baselines' formulas, and the largest-model bound of its report."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_scale as B  # noqa: E402
import scale_report as R  # noqa: E402

from zoengine.sparsity import memory as M  # noqa: E402

GIB = 2**30


def test_family_has_the_sizes_it_names():
    params = R.family_params()
    for name, want in [("135m", 0.135e9), ("360m", 0.36e9), ("1b", 1.07e9), ("3b", 2.97e9),
                       ("7b", 6.9e9), ("13b", 13.2e9)]:
        assert params[name] == pytest.approx(want, rel=0.03), name


def test_7b_fits_in_bfloat16_only():
    assert B.predicted_bytes("7b", "mezo", "float32", 1, 128) > 24 * GIB
    assert B.predicted_bytes("7b", "mezo", "bfloat16", 1, 128) < 21 * GIB
    assert B.predicted_bytes("7b", "adam", "bfloat16", 1, 128) > 24 * GIB


def test_a_row_over_the_limit_runs_nothing():
    a = SimpleNamespace(batch=1, seq=128, limit_gib=21.0, threads=1, timeout=1)
    row = B.run_row("7b", "float32", "mezo", a)  # a worker would fail the 1 s timeout
    assert row["status"].startswith("does not fit: predicted 2")
    assert "peak_gib" not in row


def test_backprop_baselines_by_hand():
    shape = M.ModelShape(params=1000, hidden=8, intermediate=16, vocab=32, layers=2, kv_dim=4,
                         largest_tensor=256)
    act = M.activation_bytes(shape, 1, 4, "float32")
    stored = 2 * 4 * (16 * 8 + 5 * 16) * 4
    lora = 2 * 8 * (2 * 8 + 8 + 4)
    assert M.lora_numel(shape) == lora
    assert M.backprop_bytes(shape, 1, 4, "float32", "adam") == 1000 * 16 + stored + 2 * act
    assert M.backprop_bytes(shape, 1, 4, "bfloat16", "adam") == \
        1000 * 8 + stored // 2 + 2 * M.activation_bytes(shape, 1, 4, "bfloat16")
    assert M.backprop_bytes(shape, 1, 4, "float32", "adam8bit") == \
        int(1000 * 4 + 1000 * 6.03 + stored + 2 * act)
    assert M.backprop_bytes(shape, 1, 4, "float32", "lora-adam") == \
        1000 * 4 + lora * 12 + stored + 2 * act
    for method in M.BACKPROP:
        assert method in M.methods()
        assert M.predict(shape, method, 1, 4).breakdown["params_grads_states_activations"] > 0


def _rows(tmp_path, peaks: dict) -> list[dict]:
    path = tmp_path / "scale.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["size", "dtype", "method", "batch", "seq", "peak_gib"])
        w.writeheader()
        for (size, dtype, method), peak in peaks.items():
            w.writerow({"size": size, "dtype": dtype, "method": method, "batch": 1, "seq": 128,
                        "peak_gib": peak})
    return R.latest_rows(path)


def test_largest_model_from_rows_and_planner(tmp_path):
    rows = _rows(tmp_path, {("1b", "float32", "mezo"): 4.4, ("3b", "float32", "mezo"): 12.2,
                            ("7b", "bfloat16", "mezo"): 14.0})
    fp32 = R.largest("mezo", "float32", rows, 22 * GIB, 1, 128)
    assert fp32["measured"] == "3b" and fp32["planned"] == "3b"
    params = R.family_params()
    assert params["3b"] < fp32["bound_params"] < params["7b"]
    # the bound is where the planner's line through 3b and 7b meets the budget
    p3, p7 = (B.predicted_bytes(s, "mezo", "float32", 1, 128) for s in ("3b", "7b"))
    at = p3 + (fp32["bound_params"] - params["3b"]) * (p7 - p3) / (params["7b"] - params["3b"])
    assert at == pytest.approx(22 * GIB, rel=1e-9)
    bf16 = R.largest("mezo", "bfloat16", rows, 22 * GIB, 1, 128)
    assert bf16["measured"] == "7b" and bf16["bound_params"] > params["7b"]
    small = R.largest("mezo", "float32", rows, 10 * GIB, 1, 128)
    assert small["measured"] == "1b"  # the 3b row's 12.2 GiB is over a 10 GiB budget
