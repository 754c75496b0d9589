"""Shared test set-up: 1 thread (CI has 2 contended cores), deterministic seeds, and the same
process-wide state at the start of every test, whatever ran before it (docs/testing.md)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton)

torch.set_num_threads(1)

# Without a GPU, Triton kernels run under the interpreter. The variable must be set before
# triton.language is first imported (torch.optim imports it through torch._dynamo): a
# @triton.jit function created earlier stays compiled-only and cannot run on the CPU. The
# flip side: nothing in this process can compile for a GPU (tests/test_triton_ops.py compiles
# in a subprocess).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_THREADS = torch.get_num_threads()
_DTYPE = torch.get_default_dtype()


def _native_memo():
    """The native backend's memo of build outcomes, {state key: (lib, info, reason)}, and the
    function giving the current key; (None, None) until that module is imported."""
    mod = sys.modules.get("zoengine.kernels.native_ops")
    memo, key = getattr(mod, "_loaded", None), getattr(mod, "_state_key", None)
    return (memo, key) if isinstance(memo, dict) and callable(key) else (None, None)


def _forget_native_outcomes(before: dict | None) -> None:
    """Drop the build outcomes a test left behind, except a successful load for the default
    setting: a failure (a test that broke $CC or the compiler on purpose) or an outcome for a
    test's own cache dir must not decide what a later test gets."""
    memo, key = _native_memo()
    if memo is None:
        return
    before = before or {}
    default = key()
    for k, v in list(memo.items()):
        if before.get(k) is v:
            continue
        ok = isinstance(v, tuple) and bool(v) and v[0] is not None
        if k != default or not ok:
            memo.pop(k, None)



# fork servers (tests/forkrun.py, fixture `forkserver`): children of this process that live for
# the session on purpose. Not leftovers themselves; their children are, like this process's own.
_FORK_SERVERS: set[int] = set()


def _children() -> dict[int, bytes]:
    """{pid: start time} of this process's running (not zombie) children, and of its fork
    servers' children (a forked `python -m zoengine`), fork servers excluded; {} without
    /proc."""
    parents, out = {os.getpid(), *_FORK_SERVERS}, {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit() or int(name) in _FORK_SERVERS:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # state, ppid, ..., starttime = [19]
        if int(fields[1]) in parents and fields[0] != b"Z":
            out[int(name)] = fields[19]
    return out


def _kill_leftover_children(before: dict[int, bytes], test: str) -> None:
    """A child process that a test started and left running (a Popen not waited for, a test
    stopped by pytest-timeout) would keep a core busy for the tests after it: kill it, say so.
    A fork server's child is reaped by its server."""
    for pid, start in _children().items():
        if before.get(pid) == start:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # not ours: a fork server's child, which its server reaps
            cmd = f"forked by the fork server: {cmd}"
        warnings.warn(f"{test} left child process {pid} running ({cmd}); killed it",
                      pytest.PytestWarning, stacklevel=1)


@pytest.fixture(autouse=True)
def _same_start_state(request):
    """Each test starts from the same process state and puts back what it changed.

    In-process runs of the CLI (`zoengine train/eval`) set torch's thread count; a test may set
    environment variables (ZOENGINE_BACKEND, CC, ZOENGINE_CACHE_DIR, TRITON_INTERPRET...) or
    change directory without monkeypatch; the native backend remembers a failed build; a child
    process left running slows every later test. Any of these would make a later test's outcome
    depend on the order. (Warning filters are already restored by pytest around each test.)
    """
    env = dict(os.environ)
    cwd = os.getcwd()
    children = _children()
    memo, _ = _native_memo()
    native_before = dict(memo) if memo is not None else None
    torch.set_num_threads(_THREADS)
    torch.set_default_dtype(_DTYPE)
    torch.set_grad_enabled(True)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield
    for k in set(os.environ) - set(env):
        del os.environ[k]
    for k, v in env.items():
        if os.environ.get(k) != v:
            os.environ[k] = v
    if os.getcwd() != cwd:
        os.chdir(cwd)
    _forget_native_outcomes(native_before)
    _kill_leftover_children(children, request.node.nodeid)
    torch.set_num_threads(_THREADS)
    torch.set_default_dtype(_DTYPE)
    torch.set_grad_enabled(True)


@pytest.fixture
def no_curve_plot(monkeypatch):
    """In-process runs write curve.png with placeholder bytes instead of drawing it (~0.5
    CPU-s a run, most of a tiny run's time). The plot is drawn from the run's loss and dev
    numbers alone, never from the model or the crash/resume path, and tests/test_cli.py checks
    it is drawn (classification and LM curves); the files a run commits stay the same. For
    files with many runs whose plot is not what they test (`pytestmark = usefixtures(...)`)."""
    from zoengine.run import report

    monkeypatch.setattr(report, "plot_curve", lambda _report: b"\x89PNG placeholder")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA model folder and a tiny tweet-like task file (tests/test_cli.py builds
    them): what the CLI tests train on, in milliseconds per step."""
    from test_cli import make_tiny_model, make_tiny_task

    d = tmp_path_factory.mktemp("tiny")
    return {"model": make_tiny_model(str(d / "model")),
            "task": make_tiny_task(str(d / "task.csv"))}


@pytest.fixture(scope="session")
def forkserver():
    """`python -m zoengine ARGV` forked from one process that imported zoengine, torch and
    transformers once (tests/forkrun.py): ``forkserver.run(argv, cwd=, env=, capture_output=,
    text=, timeout=)`` and ``forkserver.popen(...)`` behave as subprocess's, and a crash point
    (``ZOENGINE_CRASH_AT``) kills the forked child with a real SIGKILL (returncode -9). Saves
    ~8 CPU-s of imports per run. One server per worker, shut down at the end of the session.
    ``ZOENGINE_TESTS_FRESH_PROCESSES=1`` (or a platform without fork/pidfds) runs each in a fresh
    interpreter instead (``forkrun.FreshProcesses``)."""
    import forkrun

    server = forkrun.start()
    if server.pid is not None:
        _FORK_SERVERS.add(server.pid)
    try:
        yield server
    finally:
        server.close()
        _FORK_SERVERS.discard(server.pid)
