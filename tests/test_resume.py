"""Crash-proof runs through the CLI: a run SIGKILLed at chosen points (crash points named by
ZOENGINE_CRASH_AT, not sleeps) and then resumed with ``--resume`` ends with the weights of an
uninterrupted run, bit for bit; a fine-tune ships as a journal; concurrent runs are refused."""

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from test_cli import make_tiny_model, tiny_args

from zoengine.cli import main
from zoengine.run import LOOP_STARTED

HEAD = ["--train", "head", "--steps", "24", "--batch-size", "4", "--checkpoint-every", "8"]
FULL = ["--train", "full", "--steps", "9", "--batch-size", "4", "--checkpoint-every", "4",
        "--method", "dizo", "--dizo-interval", "3"]


args = tiny_args  # the tiny model's `zoengine train` command line
# the in-process runs write curve.png without drawing it (conftest.no_curve_plot)
pytestmark = pytest.mark.usefixtures("no_curve_plot")


def _weights(out) -> dict:
    if (out / "head.safetensors").exists():
        return load_file(out / "head.safetensors")
    return load_file(out / "model" / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted runs the resumed ones must equal."""
    d = tmp_path_factory.mktemp("ref")
    out = {}
    for name, extra in (("head", HEAD), ("full", FULL)):
        assert main(args(tiny, d / name, *extra)) == 0
        out[name] = (_weights(d / name), json.loads((d / name / "metrics.json").read_text()))
    return out


def _killed(forkserver, tiny, out, extra, point):
    """`python -m zoengine train ...` killed at ``point``: a child forked from the fork server
    (tests/forkrun.py; the imports done once), dying by a real SIGKILL."""
    env = {**os.environ, "ZOENGINE_CRASH_AT": point}
    r = forkserver.run(args(tiny, out, *extra), cwd=os.path.dirname(out), env=env,
                       capture_output=True, text=True, timeout=300)
    return r


KILLS = [  # (mode, crash point): mid-step, mid-journal-write, mid-checkpoint, between renames
    ("head", "mid-step:11"),
    ("head", "loop-step:18"),
    ("head", "journal-mid-record:13"),
    ("head", "save-weights-written:2"),
    ("head", "checkpoint-between-renames:2"),
    ("head", "manifest-before-rename:2"),
    ("head", "final-file-written:1"),
    ("full", "journal-mid-record:7"),
    ("full", "save-optimizer-written:2"),
    ("full", "final-committed:1"),
]


@pytest.mark.parametrize("mode, point", KILLS)
def test_kill_then_resume_is_bit_identical(forkserver, tiny, reference, tmp_path, mode, point):
    extra = HEAD if mode == "head" else FULL
    out = tmp_path / "run"
    r = _killed(forkserver, tiny, out, extra, point)
    assert r.returncode == -9, (point, r.returncode, r.stdout[-500:], r.stderr[-500:])
    # the folder is consistent after the kill: its manifest names only matching files
    from zoengine.storage.folder import RunFolder

    with RunFolder(str(out)) as folder:
        if folder.manifest():
            folder.verify()
    weights, metrics = reference[mode]
    if point.startswith("final-committed"):  # died after the manifest named the final files
        assert _same(_weights(out), weights)  # recovery (above) finished the commit
        assert main(["train", "--resume", str(out)]) == 2  # complete: nothing to resume
        return
    assert main(args(tiny, out, *extra)) == 2  # a fresh run over it is refused
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert _same(_weights(out), weights)
    assert json.loads((out / "metrics.json").read_text())["after"] == metrics["after"]


def test_resume_refuses_a_changed_configuration(forkserver, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert _killed(forkserver, tiny, out, HEAD, "loop-step:5").returncode == -9
    assert main(["train", "--resume", str(out), "--lr", "0.5"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    threads = json.loads((out / "run.json").read_text())["threads"]  # the run's, recorded
    assert main(["train", "--resume", str(out), "--no-progress", "--threads", str(threads)]) == 0
    assert main(["train", "--resume", str(out)]) == 2  # completed: nothing to resume


def test_ship_a_finetune_as_a_journal(tiny, reference, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(args(tiny, run, *FULL)) == 0
    journal = tmp_path / "shipped.zoj"
    assert main(["export-journal", str(run), str(journal)]) == 0
    weights_bytes = sum(f.stat().st_size for f in (run / "model").iterdir())
    assert journal.stat().st_size < weights_bytes / 10  # 5 kB vs 82 kB for 9 steps of a toy
    rebuilt = tmp_path / "rebuilt"
    assert main(["apply-journal", tiny["model"], str(journal), str(rebuilt)]) == 0
    assert _same(_weights(rebuilt), reference["full"][0])
    # another base is refused: its hash differs from the run's starting weights
    other = make_tiny_model(str(tmp_path / "other"), hidden=32, layers=2)
    state = load_file(os.path.join(other, "model.safetensors"))
    first = next(iter(state))
    state[first] = state[first] + 1
    from safetensors.torch import save_file

    save_file(state, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["apply-journal", other, str(journal), str(tmp_path / "x")]) == 2
    assert "starting weights" in capsys.readouterr().err
    # a flipped byte in the run's journal is caught by the manifest
    data = bytearray((run / "journal.zoj").read_bytes())
    data[len(data) // 2] ^= 1
    (run / "journal.zoj").write_bytes(bytes(data))
    assert main(["export-journal", str(run), str(tmp_path / "bad.zoj")]) == 2


def test_a_second_run_into_the_folder_is_refused_and_the_first_completes(forkserver, tiny,
                                                                         tmp_path, capsys):
    out = tmp_path / "run"
    # `python -u -m zoengine train ...`, forked from the fork server: a separate process
    first = forkserver.popen(args(tiny, out, "--train", "head", "--steps", "400",
                                  "--batch-size", "4"),
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, unbuffered=True)
    for line in first.stdout:
        if LOOP_STARTED in line:
            break
    assert main(args(tiny, out, "--train", "head", "--steps", "3")) == 2
    assert "--output-dir" in capsys.readouterr().err
    first.communicate(timeout=300)
    assert first.returncode == 0 and (out / "metrics.json").exists()
