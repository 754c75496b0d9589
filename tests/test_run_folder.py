"""The run folder is always consistent (docs/reliability.md): the manifest names only complete,
matching files; a kill at any crash point, a full disk or a flipped byte never loses the last
good save; one live run per folder; eval and prune refuse what they must not trust or destroy.

Kills are real SIGKILLs at named crash points (``ZOENGINE_CRASH_AT``), never a guessed delay:
one helper process imports torch once, then forks a child per crash point and reports how each
child died.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import types

import pytest
import torch
from test_cli import ROOT, tiny_args

from zoengine.cli import main
from zoengine.storage import checkpoint as checkpoint_mod
from zoengine.storage import fsio, lock
from zoengine.storage import manifest as manifest_mod
from zoengine.storage.folder import FolderError, IntegrityError, LockedError, RunFolder, SaveError
from zoengine.storage.manifest import MANIFEST, file_entry, read_manifest, write_manifest
from zoengine.storage.modeldir import recover_model_dir, verify_model_dir, write_model_dir

TESTS = os.path.dirname(os.path.abspath(__file__))


# ---- what the scenarios save ------------------------------------------------------------------

def _tensors(v: int) -> dict:
    return {"w": torch.full((3, 4), float(v)), "b": torch.arange(3.0) + v}


def _opt(v: int) -> dict:
    return {"state": {"zo": {"step": v, "seed": 7}}, "param_groups": [{"lr": 0.1 * v}],
            "buf": torch.ones(2) * v}


def _extra(v: int) -> dict:
    return {"rng": [v, v + 1], "note": f"step {v}", "loss": [0.5, float("inf")]}


def _save(f: RunFolder, v: int) -> str:
    with open(f.journal_path, "ab") as j:
        j.write(bytes([v]) * 100)  # a stand-in journal: 100 bytes per "record"
    return f.save_checkpoint(v, _tensors(v), _opt(v), _extra(v), journal_records=v)


def _model_writer(v: int):
    def write(path: str) -> None:
        os.makedirs(os.path.join(path, "sub"))
        with open(os.path.join(path, "a.txt"), "w") as fh:
            fh.write(f"v{v}")
        with open(os.path.join(path, "sub", "b.bin"), "wb") as fh:
            fh.write(bytes([v]) * 1000)
    return write


def _final_v1(f: RunFolder) -> None:
    f.write_final({"model": _model_writer(1), "head.safetensors": b"head v1",
                   "metrics.json": json.dumps({"version": 1}).encode()}, weights="model",
                  keep_checkpoint=True)


def _final_v2(f: RunFolder) -> None:
    f.write_final({"model": _model_writer(2), "curve.png": b"png v2",
                   "metrics.json": json.dumps({"version": 2}).encode()}, weights="model")


# ---- scenarios: (prepare, crash phase); the helper process imports this module --------------

def _prep_checkpoint(d):
    with RunFolder(d) as f:
        _save(f, 1)


def _crash_checkpoint(d):
    with RunFolder(d) as f:
        _save(f, 2)


def _prep_final(d):
    with RunFolder(d) as f:
        _save(f, 1)
        _final_v1(f)


def _crash_final(d):
    with RunFolder(d) as f:
        _save(f, 2)
        _final_v2(f)


def _prep_model(d):
    write_model_dir(d, _model_writer(1))


def _crash_model(d):
    write_model_dir(d, _model_writer(2))


def _prep_atomic(d):
    os.makedirs(d)
    fsio.atomic_write(os.path.join(d, "f.txt"), b"v1")


def _crash_atomic(d):
    fsio.atomic_write(os.path.join(d, "f.txt"), b"v2")


SCENARIOS = {"checkpoint": (_prep_checkpoint, _crash_checkpoint),
             "final": (_prep_final, _crash_final), "model": (_prep_model, _crash_model),
             "atomic": (_prep_atomic, _crash_atomic)}

# (scenario, crash point, the version a reader must find after the kill)
CRASHES = [
    ("checkpoint", "save-weights-written", 1),
    ("checkpoint", "save-optimizer-written", 1),
    ("checkpoint", "save-files-written", 1),
    ("checkpoint", "checkpoint-between-renames", 1),
    ("checkpoint", "manifest-before-rename", 1),
    ("checkpoint", "manifest-renamed", 2),
    ("checkpoint", "checkpoint-committed", 2),
    # final: manifest #1 is checkpoint 2's, #2 the commit of the final outputs, #3 the cleanup
    ("final", "final-file-written:1", 1),
    ("final", "final-file-written:3", 1),
    ("final", "manifest-before-rename:2", 1),
    ("final", "manifest-renamed:2", 2),
    ("final", "final-committed", 2),
    ("final", "final-between-renames", 2),
    ("final", "final-renamed", 2),
    ("final", "manifest-before-rename:3", 2),
    ("final", "manifest-renamed:3", 2),
    ("model", "model-files-written", 1),
    ("model", "manifest-before-rename", 1),
    ("model", "model-between-renames", 2),
    ("model", "model-renamed", 2),
    ("atomic", "atomic-write-before-rename", 1),
]

HELPER = r"""
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import test_run_folder as t
died = {}
for job in json.loads(sys.argv[2]):
    prepare, crash = t.SCENARIOS[job["scenario"]]
    prepare(job["folder"])
    pid = os.fork()
    if pid == 0:
        os.environ["ZOENGINE_CRASH_AT"] = job["point"]
        try:
            crash(job["folder"])
        except BaseException:
            traceback.print_exc()
            os._exit(3)
        os._exit(0)  # the crash point never fired
    _, status = os.waitpid(pid, 0)
    died[job["folder"]] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
print("RESULT " + json.dumps(died), flush=True)
"""


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Every CRASHES entry run once: {(scenario, point): (folder, how its child died)}."""
    base = tmp_path_factory.mktemp("crash")
    jobs = [{"scenario": s, "point": p, "folder": str(base / f"{i:02d}-{s}")}
            for i, (s, p, _) in enumerate(CRASHES)]
    env = {k: v for k, v in os.environ.items() if k != "ZOENGINE_CRASH_AT"}
    r = subprocess.run([sys.executable, "-c", HELPER, TESTS, json.dumps(jobs)], cwd=base,
                       env=env, capture_output=True, text=True, timeout=240)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout + r.stderr
    died = json.loads(lines[-1][len("RESULT "):])
    return {(j["scenario"], j["point"]): (j["folder"], died[j["folder"]], r.stderr)
            for j in jobs}


def _no_temps(top: str) -> list[str]:
    return [os.path.join(r, n) for r, ds, fs in os.walk(top) for n in ds + fs if ".tmp-" in n]


def _check_checkpoint(d: str, want: int) -> None:
    reader = RunFolder(d)  # before any recovery: a reader trusts the manifest alone
    reader.verify()
    step, tensors, opt, extra = reader.load_checkpoint()
    assert step == want and extra == _extra(want)
    assert all(torch.equal(tensors[k], v) for k, v in _tensors(want).items())
    assert torch.equal(opt["buf"], _opt(want)["buf"]) and opt["state"] == _opt(want)["state"]
    assert reader.verify_journal() == want
    with RunFolder(d) as f:  # takes the dead child's lock over, removes its leftovers
        assert os.listdir(os.path.join(d, "checkpoints")) == [f"step-{want:08d}"]
        assert _no_temps(d) == []
        assert f.load_checkpoint()[0] == want
    assert not os.path.exists(os.path.join(d, lock.LOCK_NAME))


def _check_final(d: str, want: int) -> None:
    reader = RunFolder(d)
    body = reader.verify()
    with open(os.path.join(reader.final_weights(), "a.txt")) as fh:
        weights_version = fh.read()
    with open(reader.verify_file("metrics.json")) as fh:
        metrics_version = json.load(fh)["version"]
    assert (weights_version, metrics_version) == (f"v{want}", want), body
    with RunFolder(d) as f:
        f.verify()
        assert read_manifest(d).get("pending") is None and _no_temps(d) == []
        with open(os.path.join(d, "metrics.json")) as fh:
            assert json.load(fh)["version"] == want
        with open(os.path.join(d, "model", "a.txt")) as fh:
            assert fh.read() == f"v{want}"
        assert os.path.exists(os.path.join(d, "head.safetensors")) == (want == 1)
        assert os.path.exists(os.path.join(d, "curve.png")) == (want == 2)
        ck = f.load_checkpoint()  # v1 kept its checkpoint (step 2 by then); v2 dropped it
        assert (ck[0] if ck else None) == (2 if want == 1 else None)


def _check_model(d: str, want: int) -> None:
    recover_model_dir(d)
    assert verify_model_dir(d)
    with open(os.path.join(d, "a.txt")) as fh:
        assert fh.read() == f"v{want}"
    parent = os.path.dirname(d)
    assert [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(d)}.")] == []


def _check_atomic(d: str, want: int) -> None:
    with open(os.path.join(d, "f.txt"), "rb") as fh:
        assert fh.read() == f"v{want}".encode()
    fsio.clean_stale_temps(d)
    assert os.listdir(d) == ["f.txt"]


@pytest.mark.parametrize("scenario, point, want", CRASHES,
                         ids=[f"{s}-{p}" for s, p, _ in CRASHES])
def test_kill_at_each_crash_point_leaves_a_consistent_folder(crashed, scenario, point, want):
    d, signal_number, log = crashed[(scenario, point)]
    assert signal_number == 9, f"the child was not killed at {point}: {signal_number}\n{log}"
    {"checkpoint": _check_checkpoint, "final": _check_final, "model": _check_model,
     "atomic": _check_atomic}[scenario](d, want)


def test_every_crash_point_in_the_sources_is_tested():
    import re

    names = set()
    for mod in ("fsio", "manifest", "checkpoint", "commit", "folder", "modeldir"):
        with open(os.path.join(ROOT, "zoengine", "storage", f"{mod}.py")) as fh:
            names |= set(re.findall(r'crashpoint\("([^"]+)"\)', fh.read()))
    tested = {p.partition(":")[0] for _, p, _ in CRASHES}
    assert names and names == tested, names ^ tested


# ---- manifest, checksums, integrity -----------------------------------------------------------

def test_manifest_round_trip(tmp_path):
    d = str(tmp_path / "run")
    with RunFolder(d) as f:
        assert f.load_checkpoint() is None and f.manifest() is None
        rel = _save(f, 3)
        body = f.manifest()
        assert body["state"] == "checkpoint" and body["checkpoint"]["step"] == 3
        assert body["checkpoint"]["journal_records"] == 3 and body["journal"]["size"] == 100
        for name in ("weights.safetensors", "optimizer.pt", "state.json"):
            path = os.path.join(d, rel, name)
            assert body["files"][f"{rel}/{name}"] == file_entry(path)
        step, tensors, opt, extra = RunFolder(d).load_checkpoint()  # a fresh reader
        assert step == 3 and extra == _extra(3) and torch.equal(tensors["w"], _tensors(3)["w"])
        assert torch.equal(opt["buf"], _opt(3)["buf"])
        _save(f, 4)  # the previous checkpoint is deleted once the new one is named
        assert os.listdir(os.path.join(d, "checkpoints")) == ["step-00000004"]
        _final_v1(f)
        body = f.verify()
        assert body["state"] == "complete" and body["final"]["weights"] == "model"
        assert set(body["files"]) >= {"model/a.txt", "model/sub/b.bin", "metrics.json",
                                      "head.safetensors"}
        assert f.final_weights() == os.path.join(d, "model")
    assert sorted(os.listdir(d)) == ["checkpoints", "head.safetensors", "journal.zoj",
                                     MANIFEST, "metrics.json", "model"]


def _flip(path: str, at: int | None = None) -> None:
    with open(path, "r+b") as fh:
        data = fh.read()
        i = len(data) // 2 if at is None else at
        fh.seek(i)
        fh.write(bytes([data[i] ^ 0x01]))


@pytest.mark.parametrize("target", ["weights.safetensors", "optimizer.pt", "state.json",
                                    "metrics.json", "model/sub/b.bin", "journal.zoj"])
def test_a_flipped_byte_is_an_error_naming_the_file(tmp_path, target):
    d = str(tmp_path / "run")
    with RunFolder(d) as f:
        rel = _save(f, 1)
        _final_v1(f)
    in_checkpoint = target in ("weights.safetensors", "optimizer.pt", "state.json")
    path = os.path.join(d, f"{rel}/{target}" if in_checkpoint else target)
    _flip(path, at=10 if target == "journal.zoj" else None)
    with pytest.raises(IntegrityError) as e:
        RunFolder(d).verify()
    assert path in str(e.value) and "corrupted" in str(e.value)
    if in_checkpoint:
        with pytest.raises(IntegrityError, match="corrupted") as e:
            RunFolder(d).load_checkpoint()
        assert path in str(e.value)


def test_a_truncated_file_is_an_error_naming_the_file(tmp_path):
    d = str(tmp_path / "run")
    with RunFolder(d) as f:
        rel = _save(f, 1)
    path = os.path.join(d, rel, "optimizer.pt")
    os.truncate(path, os.path.getsize(path) - 7)
    with pytest.raises(IntegrityError, match="truncated") as e:
        RunFolder(d).load_checkpoint()
    assert path in str(e.value)


def test_a_damaged_manifest_trusts_nothing(tmp_path):
    d = str(tmp_path / "run")
    with RunFolder(d) as f:
        _save(f, 1)
    text = open(os.path.join(d, MANIFEST)).read().replace('"step": 1', '"step": 9')
    open(os.path.join(d, MANIFEST), "w").write(text)
    with pytest.raises(IntegrityError, match="checksum") as e:
        RunFolder(d).load_checkpoint()
    assert MANIFEST in str(e.value)


def test_nonfinite_weights_are_neither_saved_nor_resumed(tmp_path):
    d = str(tmp_path / "run")
    with RunFolder(d) as f:
        rel = _save(f, 1)
        bad = _tensors(2)
        bad["w"][1, 2] = float("nan")
        with pytest.raises(ValueError, match="'w' holds 1 NaN/inf"):
            f.save_checkpoint(2, bad, _opt(2), _extra(2))
        assert f.load_checkpoint()[0] == 1
        # a checkpoint whose file holds inf (written by hand, its manifest entry matching)
        from safetensors.torch import save_file

        path = os.path.join(d, rel, "weights.safetensors")
        save_file({"w": torch.tensor([1.0, float("inf")])}, path)
        body = f.manifest()
        body["files"][f"{rel}/weights.safetensors"] = file_entry(path)
        write_manifest(d, body)
        with pytest.raises(IntegrityError, match="tensor 'w' holds 1 NaN/inf") as e:
            f.load_checkpoint()
        assert path in str(e.value)


@pytest.mark.parametrize("stage", ["weights", "optimizer", "state", "manifest", "final"])
def test_disk_full_mid_save_keeps_the_previous_save(tmp_path, monkeypatch, stage):
    d = str(tmp_path / "run")
    f = RunFolder(d).acquire()
    _save(f, 1)
    _final_v1(f)
    before = read_manifest(d)

    def full(path, *args, **kwargs):
        with open(path, "wb") as fh:  # half written, then the disk is full
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = {"weights": (checkpoint_mod, "_save_tensors"),
              "optimizer": (checkpoint_mod, "_save_optimizer"),
              "state": (checkpoint_mod, "write_bytes"), "manifest": (manifest_mod, "write_bytes"),
              "final": (fsio, "write_bytes")}
    monkeypatch.setattr(*target[stage], lambda *a, **k: full(a[1] if stage in (
        "weights", "optimizer") else a[0]))
    with pytest.raises(SaveError) as e:
        if stage == "final":
            _final_v2(f)
        else:
            _save(f, 2)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "disk is full" in msg and d in msg
    assert ("the outputs the folder held before are intact" if stage == "final" else
            "the previous checkpoint (step 1) is intact") in msg
    monkeypatch.undo()
    assert read_manifest(d) == before and _no_temps(d) == []
    assert os.listdir(os.path.join(d, "checkpoints")) == ["step-00000001"]
    assert f.load_checkpoint()[0] == 1 and f.verify()["final"]["weights"] == "model"
    f.release()


# ---- start-up: read-only folder, lock, temps of live processes --------------------------------

def test_unwritable_output_folder_is_refused_before_training(tiny, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("user data")
    with pytest.raises(FolderError) as e:  # a folder under a file cannot exist
        RunFolder(str(blocker / "out")).acquire()
    assert e.value.flag == "--output-dir" and str(blocker / "out") in str(e.value)
    with pytest.raises(FolderError, match="existing file"):
        RunFolder(str(blocker)).acquire()
    assert blocker.read_text() == "user data"
    rc = main(tiny_args(tiny, blocker / "out", "--steps", "2"))
    out = capsys.readouterr()
    assert rc == 2 and "--output-dir" in out.err and str(blocker / "out") in out.err
    assert "loading model" not in out.out  # refused before any work


def test_read_only_file_system_is_refused_at_start(tmp_path, monkeypatch):
    """Root ignores chmod (CI runs as root), so the file system's answer is simulated where
    the probe asks it: os.open of a new file in the folder fails with EROFS."""
    d = str(tmp_path / "ro")
    os.makedirs(d)

    class ReadOnlyOS:
        def __getattr__(self, name):
            return getattr(os, name)

        def open(self, path, flags, mode=0o777):
            if str(path).startswith(d) and flags & (os.O_WRONLY | os.O_RDWR):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return os.open(path, flags, mode)

    monkeypatch.setattr(fsio, "os", ReadOnlyOS())
    with pytest.raises(FolderError, match="not writable") as e:
        RunFolder(d).acquire()
    assert d in str(e.value) and "Read-only file system" in str(e.value)
    assert os.listdir(d) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0555 folder anyway")
def test_read_only_folder_by_permissions_is_refused(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(FolderError, match="not writable"):
            RunFolder(str(d)).acquire()
    finally:
        d.chmod(0o755)


HOLDER = r"""
import sys
from zoengine.storage.folder import RunFolder
f = RunFolder(sys.argv[1]).acquire()
print("HELD", flush=True)
sys.stdin.readline()
f.release()
print("RELEASED", flush=True)
"""


def test_a_second_run_is_refused_while_the_first_lives(tiny, tmp_path, capsys):
    d = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-c", HOLDER, d], cwd=tmp_path, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "HELD"  # waits for the event, no sleep
        with pytest.raises(LockedError) as e:
            RunFolder(d).acquire()
        assert f"pid {p.pid} on host {socket.gethostname()}" in str(e.value)
        assert e.value.flag == "--output-dir"
        assert main(tiny_args(tiny, d, "--steps", "2")) == 2
        assert "in use by another zoengine run" in capsys.readouterr().err
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "RELEASED"
    finally:
        p.stdin.close()
        p.wait(timeout=60)
    with RunFolder(d):  # free again
        pass


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    dead = _dead_pid()
    (d / lock.LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    said = []
    with RunFolder(str(d), log=said.append):
        assert json.loads((d / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert said and f"pid {dead}" in said[0]
    assert not (d / lock.LOCK_NAME).exists()


def test_without_flock_the_pid_and_host_decide(tmp_path, monkeypatch):
    import fcntl

    def no_flock(*_a):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    d = tmp_path / "run"
    d.mkdir()
    lockfile = d / lock.LOCK_NAME
    live = os.getppid()
    for owner, refused in [({"pid": live, "host": socket.gethostname()}, True),
                           ({"pid": 1, "host": "another-host"}, True),
                           ({"pid": _dead_pid(), "host": socket.gethostname()}, False)]:
        lockfile.write_text(json.dumps(owner))
        if refused:
            with pytest.raises(LockedError, match=f"pid {owner['pid']} on host {owner['host']}"):
                RunFolder(str(d)).acquire()
            assert json.loads(lockfile.read_text()) == owner
        else:
            f = RunFolder(str(d)).acquire()
            with pytest.raises(LockedError, match="this process"):  # it is ours now
                RunFolder(str(d)).acquire()
            f.release()
            assert not lockfile.exists()


def test_temps_of_a_live_process_are_never_deleted(tmp_path):
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    live, dead = os.getppid(), _dead_pid()
    keep = [d / f".metrics.json.tmp-{live}", d / "checkpoints" / f".step-00000003.tmp-{live}"]
    gone = [d / f".metrics.json.tmp-{dead}", d / f".model.tmp-{dead}.g4", d / f"model.old-{dead}",
            d / "checkpoints" / f".step-00000002.tmp-{dead}", d / "checkpoints" / "step-00000001"]
    for p in keep + gone:
        p.mkdir() if "step-" in p.name or "model" in p.name else p.write_text("x")
    with RunFolder(str(d)):
        assert all(p.exists() for p in keep)
        assert not any(p.exists() for p in gone)


def test_default_output_folder_names_method_and_seed():
    from zoengine.run.config import RunConfig

    task = types.SimpleNamespace(kind="classification")
    dirs = {RunConfig(task="sentiment", method=m, seed=s).resolved(task).output_dir
            for m in ("mezo", "dizo") for s in (0, 1)}
    assert os.path.join("outputs", "sentiment-head-dizo-s1") in dirs and len(dirs) == 4


# ---- eval and prune ---------------------------------------------------------------------------

def _eval(tiny, weights):
    return main(["eval", "--model", tiny["model"], "--task", tiny["task"], "--options",
                 "negative,positive", "--template", "Tweet: {text} Sentiment:",
                 "--weights", str(weights)])


def _head_bytes(value: float) -> bytes:
    from safetensors.torch import save

    rows = torch.zeros(2, 32)
    rows[1, 3] = value
    return save({"head_rows": rows, "head_bias": torch.zeros(2)})


def test_eval_refuses_nan_weights_and_corrupted_runs(tiny, tmp_path, capsys):
    head = tmp_path / "head.safetensors"
    head.write_bytes(_head_bytes(float("nan")))
    assert _eval(tiny, head) != 0
    err = capsys.readouterr().err
    assert "NaN/inf" in err and str(head) in err and "'head_rows'" in err
    run = str(tmp_path / "run")
    with RunFolder(run) as f:
        f.write_final({"head.safetensors": _head_bytes(0.5), "metrics.json": b"{}"},
                      weights="head.safetensors")
    assert _eval(tiny, run) == 0  # verified, finite: scored
    capsys.readouterr()
    _flip(os.path.join(run, "head.safetensors"))
    assert _eval(tiny, run) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "corrupted" in err and "head.safetensors" in err
    with RunFolder(run) as f:  # write_final refuses to commit it (tests/test_edges.py) ...
        with pytest.raises(ValueError, match="NaN/inf"):
            f.write_final({"head.safetensors": _head_bytes(float("inf")),
                           "metrics.json": b"{}"}, weights="head.safetensors")
        # ... so a run holding one is made by hand, its manifest naming the file
        path = os.path.join(run, "head.safetensors")
        with open(path, "wb") as fh:
            fh.write(_head_bytes(float("inf")))
        body = f.manifest()
        body["files"]["head.safetensors"] = file_entry(path)
        write_manifest(run, body)
    assert _eval(tiny, run) != 0
    assert "NaN/inf" in capsys.readouterr().err


def _prune(tiny, out):
    return main(["prune", "--model", tiny["model"], "--method", "magnitude",
                 "--output-dir", str(out)])


def test_prune_refuses_a_file_and_a_foreign_folder(tiny, tmp_path, capsys):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("keep me")
    assert _prune(tiny, user_file) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and str(user_file) in err
    assert user_file.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["notes.txt"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "data.csv").write_text("a,b")
    assert _prune(tiny, foreign) == 2
    assert "did not write" in capsys.readouterr().err
    assert os.listdir(foreign) == ["data.csv"]


def test_prune_replaces_its_own_output(tiny, tmp_path):
    out = tmp_path / "pruned"
    assert _prune(tiny, out) == 0
    assert read_manifest(str(out))["kind"] == "model" and verify_model_dir(str(out))
    first = read_manifest(str(out))["generation"]
    assert _prune(tiny, out) == 0  # its own output: replaced as a whole
    assert read_manifest(str(out))["generation"] == first + 1
    assert [n for n in os.listdir(tmp_path) if n != "pruned"] == []


def test_a_reader_racing_a_commit_retries_on_the_new_manifest(tmp_path, monkeypatch):
    """A reader that read the manifest just before a live writer's commit finds files that no
    longer match it; it reads the new manifest instead of reporting corruption."""
    from zoengine.storage import folder as folder_mod

    d = str(tmp_path / "run")
    writer = RunFolder(d).acquire()
    _final_v1(writer)
    real, calls = folder_mod.verify_under, []

    def commit_then_verify(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            _final_v2(writer)  # lands between the reader's manifest read and its file reads
        return real(*args, **kwargs)

    monkeypatch.setattr(folder_mod, "verify_under", commit_then_verify)
    path = RunFolder(d).final_weights()
    assert len(calls) == 2 and open(os.path.join(path, "a.txt")).read() == "v2"
    writer.release()
