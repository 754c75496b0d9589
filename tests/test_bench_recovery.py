"""benchmarks/bench_recovery_methods.py's analysis: smoothing, forwards to MeZO's final loss and
the "not reached" case (the real-model runs are the benchmark's, not CI's)."""

import csv
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


R = pytest.importorskip("bench_recovery")


def test_curve_rows_take_the_newest_row_of_each_name_at_the_budget(tmp_path):
    def row(name, budget, when, curve):
        return {"row": name, "model": "wanda50", "budget_s": budget, "timestamp_utc": when,
                "curve": curve, "ppl_pruned": 180.0, "ppl_dense": 100.0}
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row("", 0, "", "")))
        w.writeheader()
        w.writerows([row("a@wanda50", 1800.0, "2026-12-02T21:00:00Z", "[[300, 9, 150.0]]"),
                     row("a@wanda50", 1800.0, "2026-12-03T02:00:00Z", "[[300, 9, 140.0]]"),
                     row("a@wanda50", 240.0, "2026-12-04T00:00:00Z", "[[60, 2, 170.0]]"),
                     row("infer@wanda50", 1800.0, "2026-12-03T02:00:00Z", "")])
    rows = R.curve_rows(path, 1800.0)
    assert [(r["row"], r["curve"]) for r in rows] == [("a@wanda50", "[[300, 9, 140.0]]")]
    assert R.curve_rows(tmp_path / "missing.csv", 1800.0) == []
    assert R.plot_curves(rows, tmp_path / "c.png") is False  # one point: nothing to draw
    rows[0]["curve"] = "[[300, 9, 140.0], [600, 18, 130.0]]"
    assert R.plot_curves(rows, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 0


def test_every_distillation_row_waits_for_the_teacher_cache():
    items = dict(R.plan_items(R.MATRIX_REST + ["zo-full-lm@wanda24"]))
    kd = [r for r in R.MATRIX_REST if "-kd" in r]
    assert len(kd) == 6 and all("teacher" in items[f"row:{r}"] for r in kd)
    assert "teacher" not in items["row:zo-full-lm@wanda24"]


def test_from_logs_rebuilds_what_a_stopped_driver_finished(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(R, "work", lambda: tmp_path)
    (tmp_path / "logs").mkdir()
    done = {"row": "zo-full-lm@wanda50", "model": "wanda50", "ppl_after": 150.0}
    (tmp_path / "logs" / "row-zo-full-lm-wanda50.log").write_text(
        "progress\n" + R.C._MARK + json.dumps(done) + "\n")
    (tmp_path / "logs" / "row-zo-lora-lm-wanda50.log").write_text("killed mid-run\n")
    (tmp_path / "logs" / "infer-wanda50.log").write_text(R.C._MARK + '{"ppl_test": 181.6}\n')
    results, base, errors, missing, _ = R.from_logs(["zo-full-lm@wanda50", "zo-lora-lm@wanda50"])
    assert list(results) == ["zo-full-lm@wanda50"] and results["zo-full-lm@wanda50"]["ppl_after"] == 150.0
    assert results["zo-full-lm@wanda50"]["settings"] == R.ROWS["zo-full-lm@wanda50"][1]
    assert base == {"wanda50": {"ppl_test": 181.6}}  # dense's log is absent: not invented
    assert errors == [] and missing == ["zo-lora-lm@wanda50"]
