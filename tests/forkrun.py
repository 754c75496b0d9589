"""A fork server for the CLI's kill tests: `python -m zoengine` without its ~8 CPU-s import.

tests/test_resume.py and tests/test_edges.py kill runs at named crash points
(``ZOENGINE_CRASH_AT``, zoengine/faults.py) and check what a resume does with the folder. Each
kill used to start a fresh ``python -m zoengine``: ~9 CPU-s, of which importing torch,
transformers, datasets and zoengine is ~8 and the tiny run ~0.5. Here one server process
(``ForkServer``, the session fixture ``forkserver`` in tests/conftest.py) imports them once,
without running anything, and forks one child per request. The child is what
``python [-u] -m zoengine ARGV`` (or ``python [-u] -c CODE ARGV``) would be after its imports:
its own working directory, environment (``os.environ`` replaced, so ``putenv`` too),
``sys.argv`` and ``sys.path[0]``, stdin/stdout/stderr on the caller's files or pipes, ``runpy``
running ``zoengine.__main__``, then the interpreter's exit steps (non-daemon threads joined,
``atexit`` handlers, flush) and ``os._exit`` with the code. A crash point's
``os.kill(os.getpid(), SIGKILL)`` kills that child only: a separate process, dead by a real
SIGKILL, reported as returncode -9 exactly as ``subprocess`` reports it; its files, its lock
(an ``flock``, released by the kernel) and its exit are a fresh process's.

What keeps a child equal to a fresh process:
- The server never runs a model, an optimizer step or a CLI command: every cache in zoengine
  (the native library memo, ``faults._counts``, functools caches) is empty at the fork, and no
  OpenMP/intra-op pool exists (torch's pool does not survive ``fork``; the child builds its
  own). The only threads the imports start are numpy's OpenBLAS server and pyarrow's jemalloc
  background thread, which both shut down/reset around ``fork`` by their own atfork handlers
  (as under multiprocessing's fork); the server refuses to fork if it has more threads than
  right after its imports. Its torch thread count is left at the default, so the CLI's
  ``auto_threads`` sees what a fresh process sees.
- Environment variables read at import time (``HF_HUB_OFFLINE``, ``TRITON_INTERPRET``, ...)
  were read by the server with its own environment. A request whose environment differs from
  the server's in any variable other than ``LAZY_ENV`` (read when used: ``ZOENGINE_CRASH_AT``
  and ``ZOENGINE_HANG_AT`` by ``faults.crashpoint`` when a crash point is reached,
  ``ZOENGINE_DEBUG`` when an error is caught, torch's ``TORCHINDUCTOR_CACHE_DIR``) is refused
  with ValueError rather than run with stale imports.
- torch's default generator is put back to its initial seed after the imports (a fresh
  process starts from it); ``random`` reseeds itself after a fork, numpy is reseeded from the
  OS as at a fresh start.

What differs, none of it read by the tests: the child's CPU clock starts at 0 (metrics.json's
``timing`` lacks the imports), its children share the server's string-hash seeds (e.g. the key
order of a safetensors header's metadata is the same in every child, random across fresh
processes), and it has the preloaded modules a run might not have imported.
``ZOENGINE_TESTS_FRESH_PROCESSES=1`` runs the same tests on fresh interpreters
(``FreshProcesses``) to compare.

The server is a child of the pytest process; tests/conftest.py's ``_kill_leftover_children``
exempts it (``_FORK_SERVERS``) but kills any of *its* children a test left running. It exits
when its socket closes (``close()``, or the pytest process dying), killing the children it
still has.
"""

from __future__ import annotations

import io
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time

# imported by the server before it forks (what `zoengine train|export-journal|...` imports on a
# tiny model; a module left out only costs the child its import)
PRELOAD = (
    "zoengine", "zoengine.cli", "zoengine.run.job", "zoengine.run.loop", "zoengine.run.resume",
    "zoengine.run.report", "zoengine.run.lora", "zoengine.run.kd", "zoengine.storage.folder",
    "zoengine.loading", "zoengine.tasks", "zoengine.tasks.suite", "zoengine.optim",
    "zoengine.kernels.native_ops", "zoengine.extras", "torch", "numpy", "safetensors.torch",
    "transformers", "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto", "transformers.models.llama.modeling_llama",
    "tokenizers", "datasets", "accelerate", "matplotlib", "matplotlib.pyplot", "PIL.Image",
)
# read when used, never at import: may differ between the server and a request. zoengine's
# crash points and error handler; torch's inductor reads its cache dir when it needs it (and
# sets the variable to its default then: an in-process run in the pytest process did)
LAZY_ENV = frozenset({"ZOENGINE_CRASH_AT", "ZOENGINE_HANG_AT", "ZOENGINE_DEBUG",
                      "TORCHINDUCTOR_CACHE_DIR"})
# pytest's per-phase marker: in the environment of every child, read by no library
VOLATILE_ENV = frozenset({"PYTEST_CURRENT_TEST"})

PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT
_MSG = 1 << 20


# ---- the server (python tests/forkrun.py FD MODULE...) ---------------------------------------

def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _send(sock, **msg) -> None:
    sock.send(json.dumps(msg).encode())


def _exit_code(code) -> int:
    """What the interpreter exits with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    try:
        print(code, file=sys.stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


def _child(req: dict, fds: list[int], inherited: list[int]) -> None:
    """In the forked child: become `python [-u] -m zoengine ARGV` after its imports; never
    returns."""
    code = 1
    try:
        for fd in inherited:
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)  # dup2 makes 0/1/2 inheritable, as in a fresh process
        for fd in set(fds):
            if fd > 2:
                os.close(fd)

        unbuffered = req.get("unbuffered", False)
        enc = sys.stdout.encoding  # chosen at start-up from the same locale and environment

        def stream(fd, write, errors, line_buffering):
            """The standard stream a fresh interpreter opens on ``fd`` (``-u``: unbuffered)."""
            raw = open(fd, "wb" if write else "rb", buffering=0 if write and unbuffered else -1,
                       closefd=False)
            return io.TextIOWrapper(raw, encoding=enc, errors=errors,
                                    line_buffering=line_buffering,
                                    write_through=write and unbuffered)

        sys.stdin = sys.__stdin__ = stream(0, False, "strict", False)
        sys.stdout = sys.__stdout__ = stream(1, True, sys.stdout.errors, False)
        # stderr: line-buffered even when not a terminal (Python >= 3.9), backslashreplace
        sys.stderr = sys.__stderr__ = stream(2, True, "backslashreplace", True)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        source = req.get("code")
        sys.path[0] = os.getcwd() if source is None else ""  # what `-m` / `-c` put first
        sys.argv = ["-m" if source is None else "-c", *req["argv"]]
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # from the OS, as at a fresh start
        import runpy

        try:
            if source is None:  # python -m zoengine ARGV
                runpy.run_module("zoengine", run_name="__main__", alter_sys=True)
            else:  # python -c SOURCE ARGV
                import types

                main = types.ModuleType("__main__")
                sys.modules["__main__"] = main
                exec(compile(source, "<string>", "exec"), main.__dict__)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:  # noqa: BLE001 - an uncaught exception: traceback, exit 1
            import traceback

            traceback.print_exc()
            code = 1
        # the interpreter's exit: join non-daemon threads, atexit handlers, flush
        import threading

        try:
            threading._shutdown()
        except Exception:  # noqa: BLE001
            pass
        import atexit

        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(code & 0xFF)


def serve(fd: int, preload: list[str]) -> None:
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C reaches pytest; the server follows it
    # import as `python -m` in the repository root would (tests/ is not on the path of a
    # `python -m zoengine`; nothing in the root shadows a package: .ci/check_shadowing.py)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sock = socket.socket(fileno=fd)
    for name in preload:
        importlib.import_module(name)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        torch.manual_seed(torch.initial_seed())  # the default generator as a fresh process has it
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, None)
    children: dict[int, int] = {}  # pid -> pidfd
    baseline = _threads()  # OpenBLAS's and jemalloc's (module docstring)
    _send(sock, ready=os.getpid(), threads=baseline)
    try:
        while True:
            for key, _ in sel.select():
                if key.data is not None:  # a child ended
                    pid = key.data
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    children.pop(pid, None)
                    _, status = os.waitpid(pid, 0)
                    _send(sock, pid=pid, returncode=os.waitstatus_to_exitcode(status))
                    continue
                msg, fds, _, _ = socket.recv_fds(sock, _MSG, 3)
                if not msg:  # the client closed its end: stop
                    return
                req = json.loads(msg)
                try:
                    if _threads() > baseline:
                        raise RuntimeError(f"the fork server has {_threads()} threads, "
                                           f"{baseline} after its imports; a fork would lose "
                                           "the new ones (an OpenMP pool?)")
                    if not os.path.isdir(req["cwd"]):
                        raise FileNotFoundError(2, "No such file or directory", req["cwd"])
                    # the child closes the server's socket, epoll and pidfds (the objects
                    # stay referenced in this frame, never finalized: it ends by os._exit)
                    inherited = [sock.fileno(), sel.fileno(), *children.values(), *fds]
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                except Exception as exc:  # noqa: BLE001 - the client raises it
                    for f in fds:
                        os.close(f)
                    _send(sock, tag=req["tag"], error=f"{type(exc).__name__}: {exc}",
                          missing=isinstance(exc, FileNotFoundError))
                    continue
                if pid == 0:
                    _child(req, fds, [f for f in inherited if f not in fds])
                for f in fds:
                    os.close(f)
                pidfd = os.pidfd_open(pid)
                children[pid] = pidfd
                sel.register(pidfd, selectors.EVENT_READ, pid)
                _send(sock, tag=req["tag"], pid=pid)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass


# ---- the client --------------------------------------------------------------------------------

class ForkServerError(RuntimeError):
    pass


class ForkServer:
    """One server process; ``run`` and ``popen`` are ``subprocess.run`` / ``subprocess.Popen``
    of ``[sys.executable, "-m", "zoengine", *argv]`` (``unbuffered``: ``-u``)."""

    def __init__(self, preload=PRELOAD, *, timeout: float = 300):
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.env = {k: v for k, v in os.environ.items() if k not in VOLATILE_ENV}
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                      str(theirs.fileno()), *preload],
                                     pass_fds=[theirs.fileno()], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log)
        theirs.close()
        self.pid = self.proc.pid
        self._status: dict[int, int] = {}  # pid -> returncode, not yet waited for
        self._answers: dict[int, dict] = {}  # request tag -> the server's answer
        self._abandoned: set[int] = set()  # request tags whose caller gave up
        self._orphans: set[int] = set()  # their children, killed
        self._tag = 0
        try:
            ready = self._recv(deadline=time.monotonic() + timeout)
            if ready.get("ready") != self.pid:
                raise ForkServerError(f"fork server not usable: {ready}")
        except BaseException:
            self.close()
            raise

    def _server_log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-3000:]

    def _recv(self, deadline: float | None) -> dict:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._sock.settimeout(left)
        try:
            msg = self._sock.recv(_MSG)  # TimeoutError at the deadline
        except BlockingIOError:  # a deadline already past: timeout 0, non-blocking
            raise TimeoutError from None
        finally:
            self._sock.settimeout(None)
        if not msg:
            raise ForkServerError(f"the fork server (pid {self.pid}) exited: "
                                  f"{self.proc.poll()}\n{self._server_log()}")
        return json.loads(msg)

    def _pump(self, deadline: float | None) -> None:
        """Read one message from the server and file it: a child's end, or a request's answer.
        The answer to a request its caller gave up on (an exception while waiting) names a
        child nobody will wait for: killed here."""
        msg = self._recv(deadline)
        if "returncode" in msg:
            if msg["pid"] in self._orphans:
                self._orphans.discard(msg["pid"])
            else:
                self._status[msg["pid"]] = msg["returncode"]
        elif msg.get("tag") in self._abandoned:
            self._abandoned.discard(msg["tag"])
            if "pid" in msg:
                os.kill(msg["pid"], signal.SIGKILL)
                self._orphans.add(msg["pid"])
        else:
            self._answers[msg["tag"]] = msg

    def _returncode(self, pid: int, deadline: float | None) -> int:
        """Wait for the server's word that child ``pid`` ended; TimeoutError at ``deadline``."""
        while pid not in self._status:
            self._pump(deadline)
        return self._status.pop(pid)

    def _check_env(self, env: dict) -> dict:
        env = {str(k): str(v) for k, v in env.items()}
        mine = {k: v for k, v in env.items() if k not in VOLATILE_ENV}
        changed = sorted(k for k in set(mine) | set(self.env)
                         if mine.get(k) != self.env.get(k) and k not in LAZY_ENV)
        if changed:
            raise ValueError(f"forkrun: the environment differs from the fork server's in "
                             f"{changed}, which an import may have read; run a fresh process "
                             f"(subprocess) for it, or add the variable to LAZY_ENV if zoengine "
                             f"reads it only when used")
        return env

    def popen(self, argv, *, code=None, cwd=None, env=None, stdin=None, stdout=None,
              stderr=None, text=False, unbuffered=False) -> ForkedProcess:
        """``Popen([sys.executable, ("-u"), "-m", "zoengine", *argv])``, or with ``code``
        ``Popen([sys.executable, ("-u"), "-c", code, *argv])``."""
        env = self._check_env(os.environ if env is None else env)
        cwd = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
        ours = []  # pipe ends kept here

        def fd_for(spec, fileno, write):
            if spec == subprocess.DEVNULL or (spec is None and fileno == 0):
                # stdin: pytest's is /dev/null too (its fd capture)
                f = open(os.devnull, "wb" if write else "rb")
                ours.append(("close", f))
                return f.fileno()
            if spec is None:
                return fileno  # this process's stdout/stderr, as subprocess inherits them
            if spec == PIPE:
                r, w = os.pipe()
                keep, give = (r, w) if write else (w, r)
                ours.append(("pipe", fileno, keep, give))
                return give
            return spec if isinstance(spec, int) else spec.fileno()

        fds = [fd_for(stdin, 0, False), fd_for(stdout, 1, True)]
        fds.append(fds[1] if stderr == STDOUT else fd_for(stderr, 2, True))
        self._tag += 1
        tag = self._tag
        try:
            socket.send_fds(self._sock, [json.dumps(
                {"tag": tag, "argv": [os.fspath(a) for a in argv], "cwd": cwd,
                 "env": env, "unbuffered": unbuffered, "code": code}).encode()], fds)
            deadline = time.monotonic() + 60
            try:
                while tag not in self._answers:
                    self._pump(deadline)
            except BaseException:
                self._abandoned.add(tag)
                raise
            msg = self._answers.pop(tag)
        finally:
            for o in ours:
                if o[0] == "close":
                    o[1].close()
                else:
                    os.close(o[3])
        if "error" in msg:
            for o in ours:
                if o[0] == "pipe":
                    os.close(o[2])
            raise (FileNotFoundError if msg.get("missing") else ForkServerError)(msg["error"])
        pipes = {o[1]: o[2] for o in ours if o[0] == "pipe"}
        return ForkedProcess(self, msg["pid"], pipes, text)

    def run(self, argv, *, code=None, cwd=None, env=None, capture_output=False, text=False,
            timeout=None, unbuffered=False) -> subprocess.CompletedProcess:
        if capture_output:
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        else:
            out = err = None
        try:
            p = self.popen(argv, code=code, cwd=cwd, env=env, stdout=out, stderr=err,
                           unbuffered=unbuffered)
            try:
                rc = p.wait(timeout)
            except BaseException:  # a timeout, or pytest-timeout's alarm: no child left over
                p.kill()
                p.wait()
                raise
            got = []
            for f in (out, err):
                if f is None:
                    got.append(None)
                    continue
                f.seek(0)
                data = f.read()
                got.append(data.decode(errors="replace") if text else data)
            return subprocess.CompletedProcess(["-m", "zoengine", *argv], rc, *got)
        finally:
            for f in (out, err):
                if f is not None:
                    f.close()

    def close(self) -> None:
        """End the server (it kills the children it still has) and wait for it."""
        if self._sock.fileno() >= 0:
            self._sock.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class ForkedProcess:
    """A child of the fork server, used like a ``subprocess.Popen``."""

    def __init__(self, server: ForkServer, pid: int, pipes: dict[int, int], text: bool):
        self.server, self.pid, self.returncode = server, pid, None
        self.args = ["-m", "zoengine"]
        wrap = (lambda fd, mode: open(fd, mode, encoding=None) if text
                else open(fd, mode + "b"))
        self.stdin = wrap(pipes[0], "w") if 0 in pipes else None
        self.stdout = wrap(pipes[1], "r") if 1 in pipes else None
        self.stderr = wrap(pipes[2], "r") if 2 in pipes else None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = self.server._returncode(self.pid, time.monotonic())
            except TimeoutError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                self.returncode = self.server._returncode(self.pid, deadline)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped by the server yet: the pid is still ours
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None):
        """Read stdout/stderr pipes to their end, then wait (``Popen.communicate``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.stdin is not None:
            self.stdin.close()
        streams = [s for s in (self.stdout, self.stderr) if s is not None]
        chunks = {id(s): [] for s in streams}
        sel = selectors.DefaultSelector()
        for s in streams:
            sel.register(s.fileno(), selectors.EVENT_READ, s)
        try:
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in sel.select(left):
                    s = key.data
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fd)
                    else:
                        chunks[id(s)].append(data)
        finally:
            sel.close()
        out = []  # as Popen.communicate: what the pipe still holds, read-ahead not included
        for s in (self.stdout, self.stderr):
            if s is None:
                out.append(None)
                continue
            raw = b"".join(chunks[id(s)])
            out.append(raw.decode(s.encoding) if isinstance(s, io.TextIOWrapper) else raw)
            s.close()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(left)
        return tuple(out)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s in (self.stdin, self.stdout, self.stderr):
            if s is not None:
                s.close()
        self.wait()


class FreshProcesses:
    """``ForkServer``'s interface on plain ``subprocess`` (a fresh interpreter per run): where
    ``fork``, pidfds or fd passing are missing, or with ``ZOENGINE_TESTS_FRESH_PROCESSES=1``
    (to compare, or to rule the fork server out when a kill test fails)."""

    pid = None

    @staticmethod
    def _cmd(argv, code, unbuffered):
        return [sys.executable, *(["-u"] if unbuffered else []),
                *(["-c", code] if code is not None else ["-m", "zoengine"]), *argv]

    def popen(self, argv, *, code=None, cwd=None, env=None, stdin=None, stdout=None,
              stderr=None, text=False, unbuffered=False) -> subprocess.Popen:
        return subprocess.Popen(self._cmd(argv, code, unbuffered), cwd=cwd, env=env,
                                stdin=stdin, stdout=stdout, stderr=stderr, text=text)

    def run(self, argv, *, code=None, cwd=None, env=None, capture_output=False, text=False,
            timeout=None, unbuffered=False) -> subprocess.CompletedProcess:
        return subprocess.run(self._cmd(argv, code, unbuffered), cwd=cwd, env=env,
                              capture_output=capture_output, text=text, timeout=timeout)

    def close(self) -> None:
        pass


def start() -> ForkServer | FreshProcesses:
    """A fork server where this platform has what it needs, else fresh processes."""
    usable = (hasattr(os, "fork") and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")
              and os.path.isdir("/proc/self/task"))
    if not usable or os.environ.get("ZOENGINE_TESTS_FRESH_PROCESSES") == "1":
        return FreshProcesses()
    return ForkServer()


if __name__ == "__main__":
    try:
        serve(int(sys.argv[1]), sys.argv[2:])
    finally:  # nothing to clean up: skip the interpreter's ~3 s teardown of torch & co.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
