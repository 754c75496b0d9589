"""benchmarks/bench_recovery_methods.py's analysis: smoothing, forwards to MeZO's final loss and
the "not reached" case (the real-model runs are the benchmark's, not CI's)."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
M = pytest.importorskip("bench_recovery_methods")


def _curve(losses, probes, per_step=2):
    curve = [{"step": 0, "forwards": 0, "probe": probes[0]}]
    for s, x in enumerate(losses, 1):
        p = {"step": s, "forwards": per_step * s, "loss": x}
        if s % 2 == 0:
            p["probe"] = probes[s // 2]
        curve.append(p)
    return curve


def test_smooth_is_a_trailing_mean_once_the_window_is_full():
    sm = M.smooth(_curve([4.0, 2.0, 6.0, 0.0], [9, 9, 9]), 2)
    assert sm == [(4, 3.0), (6, 4.0), (8, 3.0)]


def test_forwards_to_mezo_final_loss_and_not_reached():
    rows = {"mezo": {"curve": _curve([5, 5, 4, 4, 3, 3], [5, 4.5, 4.0, 3.5]), "forwards": 12},
            "fast": {"curve": _curve([4, 3, 3, 2, 2, 2], [5, 3.0, 2.0, 1.0]), "forwards": 12},
            "slow": {"curve": _curve([6, 6, 6, 6, 6, 6], [5, 5, 5, 5]), "forwards": 12}}
    M.analyse(rows, 2)
    assert rows["mezo"]["final_smoothed_loss"] == 3.0 and rows["mezo"]["final_probe_loss"] == 3.5
    assert rows["mezo"]["forwards_to_mezo_smoothed"] == 12  # reaches its own at the end
    assert rows["fast"]["forwards_to_mezo_smoothed"] == 6  # (4 + 3) / 2 > 3; (3 + 3) / 2 <= 3
    assert rows["fast"]["forwards_to_mezo_probe"] == 4  # the start point is not a "reach"
    assert rows["slow"]["forwards_to_mezo_smoothed"] == ""
    assert "not reached within 12 forwards" in rows["slow"]["reach_note"]
    assert rows["fast"]["paired_vs_mezo"] == -1.0  # steps 5-6, same batches: (2 - 3) each
    assert rows["mezo"]["paired_vs_mezo"] == 0.0
