"""torchrun's edges: a rank that dies outside a step, a rank that hangs, a launcher killed.
Each failure must say in words which rank, which phase and what the output folder holds, lose
nothing, and leave the folder unlocked (docs/reliability.md, "torchrun").

Reproduced with the same hooks before the fix: rank 1 SIGKILLed at model load made rank 0 print
gloo's "RuntimeError: [.../pair.cc:553] Connection closed by peer ... GLHF!" (under torchrun,
rank 0 was SIGTERMed without a word); a rank dying at the final barrier made torchrun SIGTERM
rank 0 in the middle of its final commit (no outputs); a hung rank stalled the others for
ZOENGINE_DIST_TIMEOUT (600 s) and their error named no rank; a SIGKILLed torchrun left both
ranks training, rank 0 holding the folder's lock (still after 20 s).

The ranks of the first three tests are forked from the fork server (tests/forkrun.py: no
8 CPU-s import per rank) and form their group over env:// (MASTER_ADDR, RANK, WORLD_SIZE) as
torchrun's would, with no launcher to stop the survivors, as for ranks on other hosts. The
launcher test runs the real torchrun. Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from zoengine.run import LOOP_STARTED

# read by zoengine and torch.distributed when a run starts, never at import: a forked rank may
# differ from the fork server in them
LAUNCH_ENV = frozenset({"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                        "ZOENGINE_DIST_TIMEOUT", "ZOENGINE_STEP_TIMEOUT"})
RUN = ["--train", "head", "--steps", "6", "--batch-size", "4", "--checkpoint-every", "2",
       "--threads", "1"]


def _until(condition, seconds: float, what: str):
    """Poll ``condition()`` until it is truthy; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {seconds} s")
        time.sleep(0.05)


@pytest.fixture
def launch(forkserver, monkeypatch):
    """``launch(args, **env)``: 2 ranks of ``zoengine ARGS`` forked from the fork server;
    returns their ForkedProcess objects (stdout and stderr in one pipe each)."""
    import forkrun
    from test_distributed import _free_port

    monkeypatch.setattr(forkrun, "LAZY_ENV", forkrun.LAZY_ENV | LAUNCH_ENV)

    def start(args, **extra):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WORLD_SIZE": "2", "ZOENGINE_DIST_TIMEOUT": "20", **extra}
        return [forkserver.popen(args, cwd=tempfile.gettempdir(), text=True,
                                 env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for r in range(2)]
    return start


def _lock_free(out) -> bool:
    return not os.path.exists(os.path.join(out, ".zoengine.lock"))


def _said(text: str) -> None:
    """A failure said in words: no traceback, no gloo source path."""
    assert "Traceback" not in text and "GLHF" not in text and ".cc:" not in text, text


def test_a_rank_dying_at_model_load_is_named_not_a_gloo_error(tiny, launch, tmp_path):
    """Rank 1 is SIGKILLed as it starts loading the model; rank 0 loads, reaches the barrier
    before the optimizer and stops, naming rank 1 (its pid), the phase and the folder."""
    from test_cli import tiny_args

    from zoengine.run.admission import check_fresh_or_resumable
    from zoengine.storage.folder import RunFolder

    out = tmp_path / "run"
    r0, r1 = launch(tiny_args(tiny, out, *RUN), ZOENGINE_CRASH_AT="model-load:1@1")
    text = r0.communicate(timeout=120)[0]
    assert r1.wait(timeout=60) == -9
    assert r0.returncode == 1, text
    assert (f"rank 0 of 2 stopped while loading the model: rank 1 (pid {r1.pid}, this host) "
            "stopped first") in text, text
    assert "holds no trained step: run the same command again" in text, text
    _said(text)
    assert _lock_free(out)
    with RunFolder(str(out)) as folder:  # not blocked: a fresh run may take it over
        check_fresh_or_resumable(folder, resume=False)


def test_a_rank_dying_at_the_final_barrier_leaves_a_complete_folder(tiny, launch, tmp_path):
    """Rank 1 is SIGKILLed at the final barrier while rank 0 writes the outputs: rank 0
    finishes the commit, then stops at the barrier (exit 1, not a silent success), saying
    that rank 1 stopped and that the folder holds the complete run."""
    from test_cli import tiny_args

    from zoengine.storage.folder import RunFolder

    out = tmp_path / "run"
    r0, r1 = launch(tiny_args(tiny, out, *RUN), ZOENGINE_CRASH_AT="final-barrier:1@1")
    text = r0.communicate(timeout=120)[0]
    assert r1.wait(timeout=60) == -9
    assert r0.returncode == 1, text
    assert ("rank 0 of 2 stopped while at the final barrier, after writing the outputs: "
            f"rank 1 (pid {r1.pid}, this host) stopped first") in text, text
    assert f"{out} holds the complete run" in text and "nothing to resume" in text, text
    _said(text)
    assert _lock_free(out)
    body = RunFolder(str(out)).verify()  # every file the manifest names, by SHA-256
    assert body["state"] == "complete"
    assert len(json.loads((out / "metrics.json").read_text())["curve"]["loss"]) == 6


@pytest.mark.parametrize("hung", [1, 0])
def test_a_hung_rank_is_named_within_the_step_timeout(tiny, launch, tmp_path, hung):
    """Rank ``hung`` hangs (alive, sockets open) before its third step. The other rank's loss
    all-reduce gives up after ZOENGINE_STEP_TIMEOUT=3 s, a probe of 3 s more finds the hung
    rank not answering, and the other stops naming it, well before the 20 s of
    ZOENGINE_DIST_TIMEOUT. The hung rank then gets SIGTERM (what torchrun sends it) and stops
    in words too; the folder is not locked and resumes from its 2 steps."""
    from test_cli import tiny_args

    from zoengine.run.resume import steps_done

    out, other = tmp_path / "run", 1 - hung
    t0 = time.monotonic()
    procs = launch(tiny_args(tiny, out, *RUN), ZOENGINE_HANG_AT=f"loop-step:3@{hung}",
                   ZOENGINE_STEP_TIMEOUT="3")
    text = procs[other].communicate(timeout=120)[0]
    assert procs[other].returncode == 1, text
    assert time.monotonic() - t0 < 60  # bounded by the step timeout, not the 600 s default
    assert (f"rank {other} of 2 stopped while training: rank {hung} did not answer within 3 s "
            "(ZOENGINE_STEP_TIMEOUT), nor within 3 s after: it hangs") in text, text
    assert "holds an interrupted run (2 journaled steps" in text, text
    _said(text)
    assert _running(procs[hung].pid)  # still hanging
    os.kill(procs[hung].pid, signal.SIGTERM)
    said = procs[hung].communicate(timeout=60)[0]
    assert procs[hung].returncode == 128 + signal.SIGTERM, said
    assert f"rank {hung} of 2 stopped by SIGTERM while training" in said, said
    _said(said)
    assert _lock_free(out) and steps_done(str(out)) == 2


def test_sigterm_stops_a_single_process_run_in_words(tiny, forkserver, tmp_path):
    """No torchrun: SIGTERM after the first checkpoint stops `zoengine train` as Ctrl-C does,
    exit 143, saying the phase and what the folder holds; the lock is released."""
    from test_cli import tiny_args

    from zoengine.storage.manifest import read_manifest

    out = tmp_path / "run"
    p = forkserver.popen(tiny_args(tiny, out, "--train", "head", "--steps", "1000000",
                                   "--batch-size", "4", "--checkpoint-every", "2",
                                   "--threads", "1"),
                         cwd=tempfile.gettempdir(), text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        _until(lambda: (read_manifest(str(out)) or {}).get("checkpoint"), 120, "checkpoint")
        os.kill(p.pid, signal.SIGTERM)
        text = p.communicate(timeout=60)[0]
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, text
    assert "zoengine train: stopped by SIGTERM while training. " in text, text
    assert f"{out} holds an interrupted run" in text and f"--resume {out}" in text, text
    _said(text)
    assert _lock_free(out)


def _children(pid: int) -> list[int]:
    """The running (not zombie) children of ``pid``."""
    out = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if name.isdigit() and int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(name))
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG: Linux")
def test_killing_the_launcher_stops_every_rank_and_frees_the_folder(tiny, tmp_path,
                                                                    no_curve_plot):
    """`torchrun` is SIGKILLed after the run's first checkpoint. Each rank asked the kernel for
    SIGTERM at its parent's death, stops as on Ctrl-C (saying that the launcher died) and
    releases the lock; `--resume` (one process) then completes the run."""
    from test_cli import tiny_args
    from test_distributed import _free_port

    from zoengine.cli import main
    from zoengine.run.resume import steps_done
    from zoengine.storage.manifest import read_manifest

    out = tmp_path / "run"
    args = tiny_args(tiny, out, "--train", "head", "--steps", "1000000", "--batch-size", "4",
                     "--checkpoint-every", "3", "--threads", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), "-m", "zoengine", *args]
    p = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    ranks = []
    try:
        _until(lambda: any(LOOP_STARTED in x for x in lines) or p.poll() is not None, 180,
               "step loop")
        _until(lambda: (read_manifest(str(out)) or {}).get("checkpoint") or p.poll(), 60,
               "checkpoint")
        assert p.poll() is None, "".join(lines)
        ranks = _children(p.pid)
        assert len(ranks) == 2, ranks
        p.kill()
        p.wait()
        _until(lambda: not any(_running(r) for r in ranks), 60, "end of the orphaned ranks")
    finally:
        for r in ranks:  # a failed test leaves no orphan behind
            if _running(r):
                os.kill(r, signal.SIGKILL)
    reader.join(30)
    text = "".join(lines)
    for rank in (0, 1):
        assert (f"rank {rank} of 2 stopped by SIGTERM while training (the launcher, pid "
                f"{p.pid}, has died") in text, text
    assert "holds an interrupted run" in text and f"--resume {out}" in text, text
    _said(text)
    assert _lock_free(out)
    done = steps_done(str(out))
    assert done >= 3
    assert main(["train", "--resume", str(out), "--no-progress", "--steps", str(done + 2)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranks"] == 1 and len(metrics["curve"]["loss"]) == done + 2


def test_sigterm_interrupts_except_inside_a_held_commit():
    """The mechanism under the launcher test: inside ``sigterm_interrupts`` a SIGTERM raises
    ``Terminated`` (a KeyboardInterrupt); inside ``hold_sigterm`` it waits for the block's end;
    after, the previous handler is back."""
    from zoengine.run.stops import Terminated, hold_sigterm, sigterm_interrupts

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_interrupts():
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)
    with sigterm_interrupts():
        finished = False
        with pytest.raises(Terminated):
            with hold_sigterm():
                signal.raise_signal(signal.SIGTERM)
                finished = True  # the commit goes on
        assert finished
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Terminated, KeyboardInterrupt)


def test_fault_hooks_and_timeouts_are_checked(monkeypatch):
    """``@R`` limits a fault hook to rank R; a timeout that is not a number of seconds > 0 is
    refused naming its variable."""
    from zoengine import faults
    from zoengine.run.ranks import env_seconds

    monkeypatch.setattr(faults, "_counts", {})
    monkeypatch.setenv("ZOENGINE_HANG_AT", "x:2@1")
    monkeypatch.setenv("RANK", "0")
    assert not faults._fires("ZOENGINE_HANG_AT", "x") and not faults._fires("ZOENGINE_HANG_AT", "x")
    monkeypatch.setenv("RANK", "1")
    assert not faults._fires("ZOENGINE_HANG_AT", "x") and faults._fires("ZOENGINE_HANG_AT", "x")
    monkeypatch.setenv("ZOENGINE_STEP_TIMEOUT", "7.5")
    assert env_seconds("ZOENGINE_STEP_TIMEOUT", 300) == 7.5
    for bad in ("0", "-1", "x", "inf", "nan"):
        monkeypatch.setenv("ZOENGINE_STEP_TIMEOUT", bad)
        with pytest.raises(ValueError, match="ZOENGINE_STEP_TIMEOUT"):
            env_seconds("ZOENGINE_STEP_TIMEOUT", 300)
