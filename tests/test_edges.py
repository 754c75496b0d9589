"""The edges of "nothing lost" (issue 29; docs/reliability.md, "Edges"): a completed run is
never modified by a new run; a resume reuses the run's thread count and refuses any flag that
differs from the run's; run.json is committed in the manifest and verified; no NaN/inf is ever
written into the weights or committed; a folder where nothing was trained is taken over; the
output folder must be new, empty or a run's.

Kills are real: a child process dies with SIGKILL at a named crash point
(``ZOENGINE_CRASH_AT``), never after a guessed delay. Two killed runs are made once per module
and copied into each test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_cli import tiny_args

from zoengine.cli import main
from zoengine.optim import create
from zoengine.optim.functional import NonFiniteLossError, NonFiniteUpdateError
from zoengine.storage.folder import IntegrityError, RunFolder
from zoengine.storage.manifest import MANIFEST, file_entry, write_manifest

HEAD = ["--train", "head", "--steps", "12", "--batch-size", "4", "--checkpoint-every", "4"]
# the run the resume tests continue: not the defaults, so a flag "set back" to one is seen
KILLED = [*HEAD, "--method", "kerzoo", "--seed", "1", "--threads", "2"]
# the in-process runs write curve.png without drawing it (conftest.no_curve_plot)
pytestmark = pytest.mark.usefixtures("no_curve_plot")


def _kill(forkserver, tiny, out, extra, point):
    """`python -m zoengine train ...` killed at ``point``: a child forked from the fork server
    (tests/forkrun.py; the imports done once), dying by a real SIGKILL."""
    env = {**os.environ, "ZOENGINE_CRASH_AT": point}
    r = forkserver.run(tiny_args(tiny, out, *extra), cwd=os.path.dirname(out), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, (point, r.returncode, r.stderr[-800:])
    return out


@pytest.fixture(scope="module")
def killed(forkserver, tiny, tmp_path_factory):
    """Folders of killed runs: ``trained`` died before step 6 (5 steps journaled, a
    checkpoint at step 4); ``untrained`` died at the top of the loop, before its first step."""
    d = tmp_path_factory.mktemp("killed")
    return {"trained": _kill(forkserver, tiny, d / "trained", KILLED, "loop-step:6"),
            "untrained": _kill(forkserver, tiny, d / "untrained", HEAD, "loop-step:1")}


def _copy(killed, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(killed[name], dst)
    return dst


def _snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes (hidden ones included)."""
    out = {}
    for root, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


# ---- item 5: no NaN/inf reaches the weights ---------------------------------------------------

METHODS = [("mezo", {}), ("kerzoo", {}), ("pezo", {}), ("zo", {"noise": "rotate"}),
           ("dizo", {"projected": "all", "interval": 1})]


def _opt(name, kw, w):
    opt = create(name, [("w", w)], lr=1e-3, eps=1e-3, seed=0, **kw)
    if name == "dizo":
        opt.set_batch_source(lambda step, k: (lambda: float(w.detach().sum())))
    return opt


def _alternating(big):
    calls = []

    def closure():
        calls.append(1)
        return big if len(calls) % 2 else -big
    return closure


@pytest.mark.parametrize("name, kw", METHODS, ids=[m for m, _ in METHODS])
def test_a_step_that_would_write_nonfinite_weights_is_refused(name, kw):
    torch.manual_seed(0)
    start = torch.randn(8, 4)
    # finite losses of ±1e38: g = 1e41 overflows float32 in lr·g·z. Before: inf/NaN written
    w = torch.nn.Parameter(start.clone())
    opt = _opt(name, kw, w)
    with pytest.raises(NonFiniteUpdateError, match="not applied"):
        opt.step(_alternating(1e38))
    assert torch.isfinite(w).all() and opt.step_count == 0
    # restored exactly as after a NaN loss (the same passes: +εz, −2εz, +εz), i.e. to the
    # in-place restore drift of a perturbation, never updated
    ref = torch.nn.Parameter(start.clone())
    ref_opt = _opt(name, kw, ref)
    with pytest.raises(NonFiniteLossError):
        ref_opt.step(lambda: float("nan"))
    assert torch.equal(w, ref)
    assert torch.allclose(w, start, rtol=0, atol=1e-6)
    # an lr the arithmetic cannot hold is refused before the weights are touched: bit-exact
    w2 = torch.nn.Parameter(start.clone())
    opt2 = _opt(name, kw, w2)
    opt2.param_groups[0]["lr"] = 1e308
    with pytest.raises(NonFiniteUpdateError, match="weights were not changed"):
        opt2.step(lambda: float(w2.detach().sum()))
    assert torch.equal(w2, start)
    # sane values still step
    w3 = torch.nn.Parameter(start.clone())
    _opt(name, kw, w3).step(lambda: float((w3.detach() ** 2).sum()))
    assert torch.isfinite(w3).all() and not torch.equal(w3, start)


def test_dizo_never_says_restored_over_nonfinite_weights():
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = _opt("dizo", {"projected": "all", "interval": 1}, w)
    opt.set_batch_source(lambda step, k: (lambda: float("nan")))
    with torch.no_grad():
        w[0, 0] = float("nan")  # the caller's weights were already broken
    with pytest.raises(NonFiniteLossError, match="NOT finite"):
        opt.step(lambda: 1.0)


def test_write_final_refuses_nonfinite_weights(tmp_path):
    from safetensors.torch import save, save_file

    run = str(tmp_path / "run")
    good = save({"w": torch.ones(3)})
    with RunFolder(run) as f:
        f.write_final({"head.safetensors": good, "metrics.json": b"{}"},
                      weights="head.safetensors")
        before = _snapshot(run)

        def model(path):  # a model folder with one NaN in its second file
            os.makedirs(path)
            save_file({"a": torch.ones(2)}, os.path.join(path, "a.safetensors"))
            save_file({"b": torch.tensor([1.0, float("nan")])},
                      os.path.join(path, "b.safetensors"))

        for weights, content in (("head.safetensors", save({"w": torch.tensor([float("inf")])})),
                                 ("model", model)):
            with pytest.raises(ValueError, match=r"NaN/inf") as err:
                f.write_final({weights: content, "metrics.json": b"{}"}, weights=weights)
            assert weights in str(err.value)
            assert _snapshot(run) == before  # no temp left, the committed outputs unchanged
        f.verify()


def test_lr_1e308_commits_no_nonfinite_model(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(tiny_args(tiny, out, "--train", "head", "--steps", "3", "--lr", "1e308"))
    err = capsys.readouterr().err
    assert rc == 2 and "--lr" in err and "1e+308" in err, err
    assert not (out / "head.safetensors").exists() and not (out / "metrics.json").exists()
    # nothing was trained: the folder is not a run to protect (item 7)
    assert main(tiny_args(tiny, out, "--train", "head", "--steps", "3")) == 0
    assert "taking over" in capsys.readouterr().out


# ---- item 1: a completed run is never modified by a new run -----------------------------------

def test_a_fresh_run_never_modifies_a_completed_run(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny, out, "--train", "head", "--steps", "4")) == 0
    before = _snapshot(out)
    capsys.readouterr()
    # the same command again (the default --output-dir repeats too), or another configuration
    for extra in (["--train", "head", "--steps", "4"], ["--train", "head", "--steps", "9"]):
        assert main(tiny_args(tiny, out, *extra)) == 2
        err = capsys.readouterr().err
        assert "--output-dir" in err and "completed run" in err, err
        assert _snapshot(out) == before  # journal, run.json, manifest, outputs: all unchanged
    RunFolder(str(out)).verify()
    assert main(["export-journal", str(out), str(tmp_path / "j.zoj")]) == 0


# ---- item 2: the thread count is recorded and reused ------------------------------------------

def test_resume_reuses_the_recorded_thread_count(tiny, killed, tmp_path, capsys):
    out = _copy(killed, "trained", tmp_path)
    assert json.loads((out / "run.json").read_text())["threads"] == 2
    assert main(["train", "--resume", str(out), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "bit-identical" in err and "2" in err, err
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["torch_threads"] == 2
    # a run without --threads records the count it used (the load-average default), not null
    fresh = tmp_path / "fresh"
    assert main(tiny_args(tiny, fresh, "--train", "head", "--steps", "2")) == 0
    recorded = json.loads((fresh / "run.json").read_text())["threads"]
    assert isinstance(recorded, int) and recorded >= 1


# ---- item 3: run.json is in the manifest, verified, and has no unknown key --------------------

def test_run_json_is_in_the_manifest_and_verified(killed, tmp_path, capsys):
    out = _copy(killed, "trained", tmp_path)
    body = RunFolder(str(out)).verify()
    assert body["files"]["run.json"] == file_entry(str(out / "run.json"))
    original = (out / "run.json").read_bytes()
    # one changed digit: batch_size 4 -> 5. Before: resumed with other weights, exit 0
    (out / "run.json").write_bytes(original.replace(b'"batch_size": 4', b'"batch_size": 5'))
    with pytest.raises(IntegrityError, match="run.json"):
        RunFolder(str(out)).verify()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and "corrupted" in err, err
    # a renamed key, the manifest made to match: refused naming the key, not dropped
    renamed = original.replace(b'"batch_size"', b'"batchsize"')
    (out / "run.json").write_bytes(renamed)
    body["files"]["run.json"] = file_entry(str(out / "run.json"))
    write_manifest(str(out), body)
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown keys ['batchsize']" in err, err


RUN_JSON_KILL = r"""
import os, signal, sys
import zoengine.storage.folder as folder
real = folder.write_manifest
def write_then_die(path, body, **kw):
    real(path, body, **kw)
    if body.get("pending", {}).get("staged", {}).get("run.json"):
        os.kill(os.getpid(), signal.SIGKILL)  # named by the manifest, not yet renamed
folder.write_manifest = write_then_die
with folder.RunFolder(sys.argv[1]) as f:
    f.write_run_config(sys.argv[2].encode())
"""


def test_a_kill_inside_the_run_json_commit_rolls_forward(killed, tmp_path):
    out = _copy(killed, "trained", tmp_path)
    new = (out / "run.json").read_text().replace('"steps": 12', '"steps": 13')
    r = subprocess.run([sys.executable, "-c", RUN_JSON_KILL, str(out), new],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-800:]
    assert [n for n in os.listdir(out) if n.startswith(".run.json.tmp-")]
    with RunFolder(str(out)) as f:  # recovery finishes the rename
        f.verify()
        data, verified = f.read_run_config()
    assert verified and data.decode() == new
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


# ---- item 8: a flag given beside --resume must equal the run's --------------------------------

@pytest.mark.parametrize("flag, value, ran", [
    ("--method", "mezo", "'kerzoo'"),
    ("--seed", "0", "1"),
    ("--batch-size", "16", "4"),
    ("--lr", "0.5", "0.0001"),
    ("--output-dir", "elsewhere", "--resume"),
])
def test_resume_refuses_a_flag_that_differs_from_the_run(killed, tmp_path, capsys, flag,
                                                         value, ran):
    out = _copy(killed, "trained", tmp_path)
    before = _snapshot(out)
    assert main(["train", "--resume", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and value in err and ran in err, err
    assert _snapshot(out) == before


def test_resume_steps_may_not_go_below_the_steps_done(killed, tmp_path, capsys):
    out = _copy(killed, "trained", tmp_path)
    assert main(["train", "--resume", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--steps 2" in err and "5 steps" in err and ">= 5" in err, err
    assert not (out / "metrics.json").exists()
    # the run's own values, and more steps, are accepted
    assert main(["train", "--resume", str(out), "--method", "kerzoo", "--seed", "1",
                 "--batch-size", "4", "--steps", "14", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["steps"] == 14 and len(m["curve"]["loss"]) == 14


# ---- item 7: a folder where nothing was trained is taken over ---------------------------------

@pytest.mark.parametrize("journal", ["none", "empty", "torn-header"])
def test_a_folder_where_nothing_was_trained_is_taken_over(tiny, killed, tmp_path, capsys,
                                                          journal):
    out = _copy(killed, "untrained", tmp_path)
    assert not (out / "journal.zoj").exists()  # died before its first step
    if journal == "empty":  # disk full while the header was written
        (out / "journal.zoj").write_bytes(b"")
    elif journal == "torn-header":
        (out / "journal.zoj").write_bytes((killed["trained"] / "journal.zoj").read_bytes()[:30])
    if journal != "none":  # --resume starts it from step 0 (before: "bad magic")
        resumed = tmp_path / "resumed"
        shutil.copytree(out, resumed)
        assert main(["train", "--resume", str(resumed), "--no-progress"]) == 0
        assert "holds no step" in capsys.readouterr().out
    # a fresh run takes it over and says so (before: "continue it with --resume")
    assert main(tiny_args(tiny, out, "--train", "head", "--steps", "3")) == 0
    log = capsys.readouterr().out
    assert log.count("taking over the folder of a run that never committed a step") == 1, log
    assert json.loads((out / "metrics.json").read_text())["config"]["steps"] == 3


def test_a_folder_with_journaled_steps_is_not_taken_over(tiny, killed, tmp_path, capsys):
    out = _copy(killed, "trained", tmp_path)
    before = _snapshot(out)
    del before[".zoengine.lock"]  # the dead run's lock: taken over and released
    assert main(tiny_args(tiny, out, *HEAD)) == 2
    assert "interrupted run (5 journaled steps" in capsys.readouterr().err
    assert _snapshot(out) == before


# ---- item 9: the output folder -------------------------------------------------------------------

def test_output_dir_must_be_new_empty_or_a_run(tiny, tmp_path, capsys, monkeypatch):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    write_manifest(str(pruned), {"kind": "model", "generation": 1, "files": {}})
    monkeypatch.chdir(user)
    for value, says in (("", "empty"), ("   ", "empty"), ("/", "root"), (".", "notes.txt"),
                        (str(user), "notes.txt"), (str(pruned), "zoengine model folder")):
        assert main(tiny_args(tiny, value, "--train", "head", "--steps", "2")) == 2
        err = capsys.readouterr().err
        assert "--output-dir" in err and says in err, (value, err)
        # "", blanks and "/" are refused by the flag's own check (at parse time), the others
        # when the folder is looked at, with what is allowed
        assert value.strip() in ("", "/") or "allowed:" in err, (value, err)
    assert sorted(os.listdir(user)) == ["notes.txt"]
    assert sorted(os.listdir(pruned)) == [MANIFEST]
    # an empty existing folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(tiny_args(tiny, empty, "--train", "head", "--steps", "2")) == 0
