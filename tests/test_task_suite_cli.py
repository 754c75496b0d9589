"""`zoengine train --task NAME --data-dir DIR` runs a suite task end to end on the tiny model:
MeZO's sampling, the task's metric before and after, the dev curve, complete outputs."""

from __future__ import annotations

import json

import pytest
from test_task_suite import write_suite

from zoengine.cli import main


@pytest.mark.parametrize("task, metric, extra", [
    ("sst2", "accuracy", ["--train", "full"]),
    ("squad", "f1", ["--train", "full", "--max-length", "64"]),
])
def test_train_a_suite_task_from_local_files(tiny, tmp_path, task, metric, extra):
    d = write_suite(str(tmp_path / "data"), n_train=24, n_valid=12)[task]
    out = tmp_path / "out"
    rc = main(["train", "--model", tiny["model"], "--task", task, "--data-dir", d,
               "--split-sizes", "16,6,8", "--steps", "4", "--batch-size", "4",
               "--eval-every", "2", "--output-dir", str(out), "--no-progress", *extra])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        assert m[when]["test"]["metric"] == metric and m[when]["test"]["n"] == 8
        assert m[when]["dev"]["n"] == 6 and 0 <= m[when]["test"][metric] <= 1
    assert [p["step"] for p in m["curve"]["dev"]] == [0, 2, 4]
    assert all(f"dev_{metric}" in p for p in m["curve"]["dev"])
    assert len(m["curve"]["loss"]) == 4
    cfg = json.loads((out / "run.json").read_text())
    assert cfg["data_dir"] == d and cfg["split_sizes"] == [16, 6, 8]
