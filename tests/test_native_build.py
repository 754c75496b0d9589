"""Where the native library is cached, what is trusted, and what is warned (docs/backends.md).

Promises checked here:
- a cache folder created by the build has mode 0700, and so does the per-user temp fallback;
- a cache folder owned by someone else or writable by group/others is refused: nothing in it
  is loaded, read or changed, and the build goes to the next candidate or a private mkdtemp;
- a cached library that is truncated, fails the self-test or is group/other-writable is
  replaced by one fresh build, warned about once, and the backend then matches the reference;
- a failing compiler and a fall-back to a slower variant each warn once (NativeBuildWarning),
  naming the backend or variant actually used and the compiler's last words;
- stale ``*.tmp.so`` files of killed builds are deleted, those of live builds are not.

The build outcome is memoised per ($CC, cache dir, variant): every test starts and ends with
``native_ops._reset()``.
"""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from zoengine.kernels import dispatch, native_build, reference

native_ops = pytest.importorskip("zoengine.kernels.native_ops")
_REASON = native_ops.unavailable_reason([torch.zeros(1)])
needs_native = pytest.mark.skipif(_REASON is not None, reason=f"native backend: {_REASON}")
W = native_ops.NativeBuildWarning


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch):
    native_ops._reset()
    yield
    native_ops._reset()


def _build_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, W)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _default_lib() -> Path:
    """The library the default settings load (built by the import above): its file name is
    the one a build with the same compiler and variant expects in any cache folder."""
    return Path(native_ops.build_info()["path"])


def _native_matches_reference():
    got = torch.randn(5000)
    want = got.clone()
    native_ops.perturb_([got], [7], seed=3, step=2, scale=0.5, dist="uniform")
    reference.perturb_([want], [7], seed=3, step=2, scale=0.5, dist="uniform")
    return torch.equal(got, want)


# ---------------------------------------------------------------- folders
@needs_native
def test_cache_dir_created_0700_and_own_library_trusted(monkeypatch, tmp_path):
    """Under a group-writable umask, and with a compiler that leaves its output writable by
    all, the folder is still 0700 and our own library is loaded from the cache next time."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no cc/gcc/clang to wrap")
    wrapper = tmp_path / "loose-cc"
    wrapper.write_text(f'#!/bin/sh\n"{cc}" "$@" || exit $?\n'
                       'prev=; for a; do [ "$prev" = -o ] && chmod 666 "$a"; prev=$a; done\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    cache = tmp_path / "a" / "cache"
    monkeypatch.setenv("ZOENGINE_CACHE_DIR", str(cache))
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))  # a refusal stays in here
    old = os.umask(0o002)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", W)  # a clean build is silent
            assert native_ops.unavailable_reason([torch.zeros(1)]) is None
            lib = Path(native_ops.build_info()["path"])
            native_ops._reset()
            monkeypatch.setattr(native_ops, "_compile",
                                lambda *a: pytest.fail("rebuilt a trusted cached library"))
            assert native_ops.unavailable_reason([torch.zeros(1)]) is None
    finally:
        os.umask(old)
    assert _mode(cache) == 0o700
    assert lib.parent == cache and _mode(lib) & 0o022 == 0
    assert sorted(p.name for p in cache.iterdir()) == [lib.name]


def test_user_temp_fallback_created_0700_silently(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("ZOENGINE_CACHE_DIR", str(blocker))
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    notes = []
    d = native_build._usable_cache_dir(notes)
    assert d == tmp_path / "t" / f"zoengine-{os.getuid()}"
    assert _mode(d) == 0o700 and notes == []


@needs_native
def test_world_writable_cache_dir_is_refused(monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    planted = shared / _default_lib().name  # what a build would load from there
    planted.write_bytes(b"\x7fELF planted by someone else")
    native_ops._reset()
    monkeypatch.setenv("ZOENGINE_CACHE_DIR", str(shared))
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    with pytest.warns(W) as record:
        assert native_ops.unavailable_reason([torch.zeros(1)]) is None
        assert native_ops.unavailable_reason([torch.zeros(1)]) is None
    (msg,) = _build_warnings(record)
    assert f"cache dir {shared} is writable by group/others (mode 0777)" in msg
    assert "refused" in msg
    lib = Path(native_ops.build_info()["path"])
    assert lib.parent == tmp_path / "t" / f"zoengine-{os.getuid()}"
    assert sorted(p.name for p in shared.iterdir()) == [planted.name]
    assert planted.read_bytes() == b"\x7fELF planted by someone else"
    assert _native_matches_reference()


@needs_native
def test_foreign_owned_dirs_fall_back_to_private_mkdtemp(monkeypatch, tmp_path):
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("ZOENGINE_CACHE_DIR", str(cache))
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    me = os.getuid()
    monkeypatch.setattr(native_build, "_uid", lambda: me + 1)  # every folder is someone else's
    with pytest.warns(W) as record:
        assert native_ops.unavailable_reason([torch.zeros(1)]) is None
    (msg,) = _build_warnings(record)
    assert f"cache dir {cache} is owned by uid {me}, not by this user" in msg
    assert f"zoengine-{me + 1} is owned by uid {me}" in msg
    lib = Path(native_ops.build_info()["path"])
    assert lib.parent.parent == tmp_path / "t"
    assert lib.parent.name.startswith("zoengine-native-") and _mode(lib.parent) == 0o700
    assert f"private temp dir {lib.parent}" in msg
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------- broken cached libraries
def _truncated(path: Path, good: Path):
    path.write_bytes(good.read_bytes()[:100])  # an ELF header and nothing else


def _group_writable(path: Path, good: Path):
    shutil.copyfile(good, path)
    path.chmod(0o666)


def _fails_self_test(path: Path, good: Path, monkeypatch):
    shutil.copyfile(good, path)
    real, calls = native_ops._self_test, []

    def flaky(lib):
        calls.append(1)
        if len(calls) == 1:
            raise native_ops.NativeBuildError("self-test failed for dist='normal' (simulated)")
        real(lib)

    monkeypatch.setattr(native_ops, "_self_test", flaky)


@needs_native
@pytest.mark.parametrize("damage,expect", [
    (_truncated, "is broken"),
    (_group_writable, "is writable by group/others (mode 0666)"),
    (_fails_self_test, "self-test failed for dist='normal' (simulated)"),
], ids=["truncated", "group-writable", "fails-self-test"])
def test_bad_cached_library_is_warned_deleted_and_rebuilt_once(monkeypatch, tmp_path, damage,
                                                               expect):
    good = _default_lib()
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    bad = cache / good.name
    if damage is _fails_self_test:
        damage(bad, good, monkeypatch)
    else:
        damage(bad, good)
    old_inode = bad.stat().st_ino
    stale = cache / f"{bad.stem}.{_dead_pid()}-{native_build._host_tag()}.abc.tmp.so"
    stale.write_bytes(b"left by a killed build")
    native_ops._reset()
    monkeypatch.setenv("ZOENGINE_CACHE_DIR", str(cache))
    compiles, real_compile = [], native_ops._compile
    monkeypatch.setattr(native_ops, "_compile", lambda *a: (compiles.append(a), real_compile(*a)))
    with pytest.warns(W) as record:
        for _ in range(3):
            assert native_ops.unavailable_reason([torch.zeros(1)]) is None
    (msg,) = _build_warnings(record)  # once, however often asked
    assert f"cached library {bad}" in msg and expect in msg and "deleted and rebuilt" in msg
    assert msg.startswith("backend 'native' uses variant")
    assert len(compiles) == 1 and compiles[0][3] == bad
    assert native_ops.build_info()["path"] == str(bad)
    assert bad.stat().st_ino != old_inode and bad.read_bytes()[:4] == b"\x7fELF"
    assert _mode(bad) & 0o022 == 0
    assert sorted(p.name for p in cache.iterdir()) == [bad.name]  # the stale temp file too
    assert _native_matches_reference()


# ---------------------------------------------------------------- compiler failures
@needs_native
def test_compiler_failure_warns_once_naming_reference(monkeypatch, tmp_path):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no 'false' program")
    monkeypatch.setenv("CC", false)
    monkeypatch.setenv("ZOENGINE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("ZOENGINE_BACKEND", raising=False)
    t = [torch.zeros(2)]
    with pytest.warns(W) as record:
        reason = native_ops.unavailable_reason(t)
        assert native_ops.unavailable_reason(t) == reason
        assert dispatch.resolve_backend(None, t) == "reference"
    (msg,) = _build_warnings(record)
    assert "uses the 'reference' backend" in msg and reason in msg
    assert f"{false} -O3" in msg and "failed (exit status 1): no output" in msg
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == []


@needs_native
def test_slower_variant_warns_once_naming_it(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOENGINE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("ZOENGINE_NATIVE_VARIANT", raising=False)
    real_compile = native_ops._compile

    def no_march(cc, cflags, ldflags, out):
        if "-march=native" in cflags:
            raise native_ops.NativeBuildError("cc failed (exit status 1): error: bad -march")
        real_compile(cc, cflags, ldflags, out)

    monkeypatch.setattr(native_ops, "_compile", no_march)
    with pytest.warns(W) as record:
        assert native_ops.unavailable_reason([torch.zeros(1)]) is None
        assert native_ops.unavailable_reason([torch.zeros(1)]) is None
    (msg,) = _build_warnings(record)
    used = native_ops.build_info()["variant"]
    assert used != "native-arch+libmvec"
    assert f"fell back to the slower variant {used!r}" in msg
    assert "[native-arch+libmvec] cc failed (exit status 1): error: bad -march" in msg


# ---------------------------------------------------------------- stale temp files
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid names no process now
    return proc.pid


def test_stale_tmp_files_are_cleaned_live_ones_kept(tmp_path):
    tag, dead, live = native_build._host_tag(), _dead_pid(), os.getpid()
    old = time.time() - 11 * 60
    files = {  # name: (backdated?, expected to be removed?)
        f"zo_native_0000000000000001.{dead}-{tag}.abc.tmp.so": (False, True),  # writer dead
        f"zo_native_0000000000000002.{live}-{tag}.abc.tmp.so": (False, False),  # being written
        f"zo_native_0000000000000003.{dead}-ffffffff.abc.tmp.so": (False, False),  # other host
        f"zo_native_0000000000000004.{dead}-ffffffff.abc.tmp.so": (True, True),  # too old
        f"zo_native_0000000000000005.{live}-{tag}.abc.tmp.so": (True, True),  # pid reused
        "zo_native_0000000000000006.abcdefgh.tmp.so": (False, False),  # old format, young
        "zo_native_0000000000000007.abcdefgh.tmp.so": (True, True),  # old format, old
        "zo_native_0000000000000008.so": (True, False),  # a library, not a temp file
        "other.tmp.so": (True, False),  # not ours
    }
    assert "ffffffff" != tag
    for name, (backdate, _) in files.items():
        (tmp_path / name).write_bytes(b"x")
        if backdate:
            os.utime(tmp_path / name, (old, old))
    removed = native_build._clean_stale_tmp(tmp_path)
    assert sorted(removed) == sorted(n for n, (_, gone) in files.items() if gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for n, (_, gone) in files.items() if not gone)
