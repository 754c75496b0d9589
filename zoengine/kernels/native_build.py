"""Building and caching the native CPU library (used by zoengine/kernels/native_ops.py).

Where the library is kept: ``$ZOENGINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/zoengine``, else
``~/.cache/zoengine``; if that cannot be created or written, the per-user temp dir
``<tmp>/zoengine-<uid>``. A folder that is created here gets mode 0700.

Privacy rule: a library is loaded only from a folder that is owned by this user and not
writable by group or others, and a cached library file must be a regular file with the same
owner and mode rule. A cache folder that breaks the rule is refused (nothing in it is read,
written or deleted, and a warning says how to fix it); the next candidate is tried, and when
none is usable the library is built into a fresh ``tempfile.mkdtemp`` folder (private by
construction, removed at exit), so the fast backend stays available at the cost of one build
per process. A cached file that breaks the rule inside a private folder is replaced by a build.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

ABI_VERSION = 1
_SOURCE = Path(__file__).with_name("native.c")
_BASE_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno",
               "-fno-strict-aliasing"]
# Tried in order; the first that compiles, loads and passes the self-test is used.
_VARIANTS = (
    ("native-arch+libmvec", ["-march=native", "-fopenmp-simd"], ["-lmvec", "-lm", "-lpthread"]),
    ("generic+libmvec", ["-fopenmp-simd"], ["-lmvec", "-lm", "-lpthread"]),
    ("generic+libm", ["-DZO_NO_MVEC"], ["-lm", "-lpthread"]),
)
_COMPILE_TIMEOUT_S = 300
# A build's temp file lives at most _COMPILE_TIMEOUT_S (the compiler is killed then and the
# file removed); one twice that old belongs to a build that was killed before its clean-up.
_STALE_TMP_S = 2 * _COMPILE_TIMEOUT_S


class NativeBuildError(RuntimeError):
    """The native library could not be built or loaded; the message says why."""


class NativeBuildWarning(RuntimeWarning):
    """The native build failed, fell back to a slower variant, or found its cache unusable."""


# ---- where ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where built libraries are kept (see the module docstring)."""
    if os.environ.get("ZOENGINE_CACHE_DIR"):
        return Path(os.environ["ZOENGINE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zoengine"


def _uid() -> int | None:
    """This process's user id (None where the OS has none: no owner checks then)."""
    return os.getuid() if hasattr(os, "getuid") else None


def _user_temp_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"zoengine-{_uid() if _uid() is not None else 'user'}"


def _trust_problem(path: Path, what: str) -> str | None:
    """Why a library must not be loaded from ``path`` (a cache folder or a cached file), or None.

    The folder may be a symlink we own to a folder we own (``~/.cache`` set-ups); a file must
    be a regular file. Nobody but us (and root) may be able to change either.
    """
    uid = _uid()
    link, st = os.lstat(path), os.stat(path)
    if what == "cache dir" and not stat.S_ISDIR(st.st_mode):
        return f"{what} {path} is not a directory"
    if what != "cache dir" and not stat.S_ISREG(link.st_mode):
        return f"{what} {path} is not a regular file"
    for s in (link, st):
        if uid is not None and s.st_uid != uid:
            return f"{what} {path} is owned by uid {s.st_uid}, not by this user (uid {uid})"
    if uid is not None and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{what} {path} is writable by group/others "
                f"(mode {stat.S_IMODE(st.st_mode):04o})")
    return None


def _writable_dir(d: Path) -> bool:
    """Create ``d`` with mode 0700 if missing; whether it exists and is writable."""
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            d.mkdir(mode=0o700)
            os.chmod(d, 0o700)  # exactly 0700 whatever the umask
        except FileExistsError:
            pass
        return d.is_dir() and os.access(d, os.W_OK | os.X_OK)
    except OSError:
        return False


def _usable_cache_dir(notes: list[str] | None = None) -> Path:
    """The folder to build into and load from (module docstring); refusals go to ``notes``."""
    notes = [] if notes is None else notes
    unwritable = []
    for d in (cache_dir(), _user_temp_dir()):
        if not _writable_dir(d):
            unwritable.append(str(d))  # said only if no folder is usable: a normal set-up
            continue
        try:
            problem = _trust_problem(d, "cache dir")
        except OSError as exc:
            problem = f"cache dir {d} cannot be inspected ({exc})"
        if problem is None:
            return d
        notes.append(f"{problem}: refused, nothing is loaded from it (fix: chown to this user "
                     "and chmod 700, or set ZOENGINE_CACHE_DIR)")
    d = Path(tempfile.mkdtemp(prefix="zoengine-native-"))  # mode 0700, ours, new
    atexit.register(shutil.rmtree, d, True)
    why = f" ({', '.join(unwritable)} not writable)" if unwritable else ""
    notes.append(f"built in the private temp dir {d} instead{why}; it is removed at exit, so "
                 "every process builds again")
    return d


# ---- stale temp files ------------------------------------------------------------------------

@functools.cache
def _host_tag() -> str:
    """Names this machine, boot and pid namespace: a pid in a temp file name means something
    only where this tag matches (a cache folder can be shared by hosts or containers)."""
    parts = [platform.node()]
    for probe in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                  lambda: str(os.stat("/proc/self/ns/pid").st_ino)):
        try:
            parts.append(probe())
        except OSError:
            pass
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, as another user
        return True
    return True


def _clean_stale_tmp(folder: Path, now: float | None = None) -> list[str]:
    """Delete ``zo_native_*.tmp.so`` files left by killed builds; returns their names.

    A build's temp file is named ``<lib>.<pid>-<host tag>.<random>.tmp.so``. It is deleted
    when its writer is certainly gone: the pid is dead *and* the host tag is ours (a pid from
    another machine or pid namespace says nothing here), or it is older than _STALE_TMP_S (no
    live build runs that long, whoever wrote it). A temp file of a live build on this host
    is never touched: its pid is alive and it is younger than the compiler timeout.
    """
    now = time.time() if now is None else now
    removed = []
    for p in folder.glob("zo_native_*.tmp.so"):
        parts = p.name.split(".")
        pid, _, tag = parts[1].partition("-") if len(parts) == 5 else ("", "", "")
        try:
            dead = tag == _host_tag() and pid.isdigit() and not _pid_alive(int(pid))
            if dead or now - p.lstat().st_mtime > _STALE_TMP_S:
                p.unlink()
                removed.append(p.name)
        except OSError:  # gone already (another process cleaned it) or not ours to delete
            continue
    return removed


# ---- build -----------------------------------------------------------------------------------

def _compiler() -> list[str]:
    cc = os.environ.get("CC")
    if cc:  # respected as given: no silent fallback to another compiler
        cmd = shlex.split(cc)
        if not cmd or shutil.which(cmd[0]) is None:
            raise NativeBuildError(f"the C compiler $CC={cc!r} was not found")
        return cmd
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise NativeBuildError("no C compiler found (tried $CC, cc, gcc, clang); install gcc or "
                           "set CC, or use backend='reference'")


def _compiler_version(cc: list[str]) -> str:
    try:
        proc = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"the C compiler {' '.join(cc)!r} cannot run: {exc}") from exc
    lines = (proc.stdout or proc.stderr or "").strip().splitlines()
    return lines[0] if lines else ""


def _cpu_fingerprint() -> str:
    """-march=native code is only valid on this CPU: the library name must depend on it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _lib_path(folder: Path, cc: list[str], version: str, cflags: list[str],
              ldflags: list[str]) -> Path:
    h = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(cc).encode(), version.encode(),
                 " ".join(cflags + ldflags).encode(), platform.machine().encode(),
                 _cpu_fingerprint().encode() if "-march=native" in cflags else b"",
                 str(ABI_VERSION).encode()):
        h.update(part)
        h.update(b"\0")
    return folder / f"zo_native_{h.hexdigest()[:16]}.so"


def _compile(cc: list[str], cflags: list[str], ldflags: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{out.stem}.{os.getpid()}-{_host_tag()}.",
                               suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [*cc, *_BASE_FLAGS, *cflags, str(_SOURCE), "-o", tmp, *ldflags]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            said = " | ".join(tail) if tail else "no output"
            raise NativeBuildError(f"{' '.join(cmd)} failed (exit status {proc.returncode}): "
                                   f"{said}")
        os.chmod(tmp, 0o755)  # whatever the linker left: the loader refuses go-w files
        os.replace(tmp, out)  # atomic: other processes see the old name or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
