"""Compiled CPU backend ("native"): the ZO ops of kernels/reference.py in C, built on first use.

``kernels/native.c`` (plain C, no torch headers) is compiled with the system C compiler (``$CC``
if set, else ``cc``, ``gcc`` or ``clang``) into a shared library cached under
``$ZOENGINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/zoengine``, else ``~/.cache/zoengine`` (a
per-user temp dir if that is not writable); the file
name carries a hash of the source, the compiler, its version, the flags and the CPU, so a change
to any of them builds a new file. The build writes to a temporary file and ``os.replace``s it,
so concurrent processes never load a half-written library. It is loaded with ctypes and called on
the tensors' ``data_ptr()``; ctypes releases the GIL for the call.

Semantics and rounding are those of the reference (same signatures, same validation errors):
fp32 arithmetic with each operation rounded separately (``-ffp-contract=off``), one rounding to
the parameter dtype on store. fp32, fp16 and bf16 parameters are handled in C (fp16/bf16 are
converted with round-to-nearest-even on store, bit-identical to ``Tensor.copy_``); other dtypes
(e.g. float64) are delegated to the reference implementation.

Uniform and Rademacher values are bit-identical to the oracle. Normal values use glibc's
vectorised ``logf``/``sinf``/``cosf`` (libmvec) instead of PyTorch's, so they differ from the
oracle by a few ulp (docs/backends.md has the measured bound); where libmvec is missing the build
falls back to scalar libm (slower, same bound).

The ops split the elements of all tensors of a call into units of 32,768 and run them on
``torch.get_num_threads()`` threads; each element's result depends only on its own inputs, so
results do not depend on the thread count.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from zoengine.kernels import reference
from zoengine.kernels.philox import DISTRIBUTIONS
from zoengine.seeds import stream_key

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
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DISTS = {name: i for i, name in enumerate(DISTRIBUTIONS)}  # normal 0, uniform 1, rademacher 2
_MASK_U8, _MASK_F32 = 1, 2


class _ZoTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("mask", ctypes.c_void_p), ("numel", ctypes.c_int64),
                ("key", ctypes.c_uint32), ("dtype", ctypes.c_int32),
                ("mask_type", ctypes.c_int32), ("reserved", ctypes.c_int32)]


class NativeBuildError(RuntimeError):
    """The native library could not be built or loaded; the message says why."""


# ---- build and load ------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where built libraries are kept (see the module docstring)."""
    if os.environ.get("ZOENGINE_CACHE_DIR"):
        return Path(os.environ["ZOENGINE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zoengine"


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


def _cpu_fingerprint() -> str:
    """-march=native code is only valid on this CPU: the library name must depend on it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _usable_cache_dir() -> Path:
    """cache_dir(), or a per-user temp dir when it cannot be created or written."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK | os.X_OK):
            return d
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"zoengine-{uid}"


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
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [*cc, *_BASE_FLAGS, *cflags, str(_SOURCE), "-o", tmp, *ldflags]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise NativeBuildError(f"{' '.join(cmd)} failed: {' | '.join(tail)}")
        os.replace(tmp, out)  # atomic: other processes see the old name or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.zo_abi_version() != ABI_VERSION:
        raise NativeBuildError(f"{path} has ABI {lib.zo_abi_version()}, expected {ABI_VERSION}")
    P, i64, u64, u32, i32, f32 = (ctypes.POINTER(_ZoTensor), ctypes.c_int64, ctypes.c_uint64,
                                  ctypes.c_uint32, ctypes.c_int, ctypes.c_float)
    lib.zo_perturb.argtypes = [P, i64, u64, i32, f32, i32]
    lib.zo_restore_update.argtypes = [P, i64, ctypes.POINTER(u64), ctypes.POINTER(f32), i32, i32,
                                      f32, f32, f32, i32, i32, i32]
    lib.zo_noise.argtypes = [ctypes.c_void_p, i64, i64, u32, u64, i32]
    for fn in (lib.zo_perturb, lib.zo_restore_update, lib.zo_noise):
        fn.restype = ctypes.c_int
    _self_test(lib)
    return lib


def _self_test(lib: ctypes.CDLL) -> None:
    """Guard against a miscompiled library: 70 values of each dist against the oracle."""
    from zoengine.kernels.philox import noise_blocks

    key64, tkey = stream_key(7, 3, 1), 0x9E3779B9
    for dist, tol in (("normal", 1e-5), ("uniform", 0.0), ("rademacher", 0.0)):
        out = torch.empty(70)
        lib.zo_noise(out.data_ptr(), 70, 6, tkey, key64, _DISTS[dist])
        want = noise_blocks(1, 19, key64=key64, tensor_key=tkey, dist=dist)[2:72]
        if not torch.allclose(out, want, rtol=tol, atol=tol):
            raise NativeBuildError(f"self-test failed for dist={dist!r}: max difference "
                                   f"{(out - want).abs().max().item():.3g}")


def _build_and_load() -> tuple[ctypes.CDLL, dict]:
    cc = _compiler()
    try:
        proc = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"the C compiler {' '.join(cc)!r} cannot run: {exc}") from exc
    lines = (proc.stdout or proc.stderr or "").strip().splitlines()
    version = lines[0] if lines else ""
    folder = _usable_cache_dir()
    only = os.environ.get("ZOENGINE_NATIVE_VARIANT")  # pin one variant (tests, debugging)
    variants = [v for v in _VARIANTS if not only or v[0] == only]
    if not variants:
        raise NativeBuildError(f"ZOENGINE_NATIVE_VARIANT={only!r}: must be one of "
                               f"{[v[0] for v in _VARIANTS]}")
    candidates = [(name, cf, lf, _lib_path(folder, cc, version, cf, lf))
                  for name, cf, lf in variants]
    # a library built earlier (by any process) wins; otherwise build, best variant first
    ordered = ([c for c in candidates if c[3].exists()] +
               [c for c in candidates if not c[3].exists()])
    problems = []
    for name, cflags, ldflags, path in ordered:
        try:
            if not path.exists():
                _compile(cc, cflags, ldflags, path)
            lib = _bind(path)
            return lib, {"variant": name, "path": str(path), "compiler": " ".join(cc),
                         "compiler_version": version, "flags": _BASE_FLAGS + cflags + ldflags}
        except (OSError, subprocess.SubprocessError, NativeBuildError, AttributeError) as exc:
            problems.append(f"[{name}] {exc}")
    raise NativeBuildError("could not build the native CPU kernels: " + "; ".join(problems))


_lock = threading.Lock()
_loaded: dict[tuple, tuple[ctypes.CDLL | None, dict | None, str | None]] = {}


def _state_key() -> tuple:
    return (os.environ.get("CC"), str(cache_dir()), os.environ.get("ZOENGINE_NATIVE_VARIANT"))


def _lib() -> ctypes.CDLL:
    """The loaded library (built on first use), or NativeBuildError saying why not.

    The outcome is remembered per ($CC, cache dir, pinned variant), so a failed build is not retried on every
    call, and a test that changes either gets a fresh attempt.
    """
    key = _state_key()
    with _lock:
        if key not in _loaded:
            try:
                lib, info = _build_and_load()
                _loaded[key] = (lib, info, None)
            except Exception as exc:  # auto dispatch must never fail: keep the reason
                _loaded[key] = (None, None, str(exc) or type(exc).__name__)
        lib, _, reason = _loaded[key]
    if lib is None:
        raise NativeBuildError(reason)
    return lib


def build_info() -> dict:
    """How the library in use was built (variant, path, compiler, flags); builds it if needed."""
    _lib()
    return dict(_loaded[_state_key()][1])


def unavailable_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why this backend cannot run on ``tensors``, or None if it can. Never raises."""
    try:
        devices = sorted({t.device.type for t in tensors})
        if devices and devices != ["cpu"]:
            return f"it needs CPU tensors; got devices {devices}"
        _lib()
        return None
    except Exception as exc:
        return str(exc) or type(exc).__name__


# ---- the ops ---------------------------------------------------------------------------------

def _split(params, keys, masks):
    """(native tensor array, its length, keep-alive list, (params, keys, masks) left to the
    reference) after the per-tensor checks."""
    arr = (_ZoTensor * len(params))()
    n, keep = 0, []
    ref_p, ref_k, ref_m = [], [], []
    for i, (p, key) in enumerate(zip(params, keys, strict=True)):
        m = None if masks is None else masks[i]
        if p.device.type != "cpu":
            raise ValueError(f"params[{i}] is on {p.device}: the native backend needs CPU tensors")
        if m is not None and m.numel() != p.numel():
            raise ValueError(f"masks[{i}] has {m.numel()} elements for a tensor of {p.numel()}")
        if p.dtype not in _DTYPES:
            ref_p.append(p)
            ref_k.append(key)
            ref_m.append(m)
            continue
        if p.numel() == 0:
            continue
        t = arr[n]
        t.data, t.numel, t.key, t.dtype = p.data_ptr(), p.numel(), int(key) & 0xFFFFFFFF, _DTYPES[p.dtype]
        if m is not None:
            m = m.detach().reshape(-1)
            if m.device.type != "cpu":
                raise ValueError(f"masks[{i}] is on {m.device}: the native backend needs CPU masks")
            if m.dtype in (torch.bool, torch.uint8):
                m, t.mask_type = m.contiguous().view(torch.uint8), _MASK_U8
            else:
                m, t.mask_type = m.to(torch.float32).contiguous(), _MASK_F32
            t.mask = m.data_ptr()
            keep.append(m)
        n += 1
    return arr, n, keep, (ref_p, ref_k, ref_m if masks is not None else None)


def _check_dist(dist: str) -> int:
    if dist not in _DISTS:
        raise ValueError(f"dist={dist!r}: must be one of {DISTRIBUTIONS}")
    return _DISTS[dist]


def perturb_(
    params: Sequence[torch.Tensor],
    keys: Sequence[int],
    *,
    seed: int,
    step: int,
    sample: int = 0,
    scale: float,
    dist: str = "normal",
    masks: Sequence[torch.Tensor | None] | None = None,
) -> None:
    """θ ← θ + scale·z for every tensor, z from the noise contract (in place, compiled).

    Same contract as ``reference.perturb_``: ``masks[i]`` zeroes z where it is 0.
    """
    reference._check_lists(params, keys, masks)  # the reference's checks, in its order
    key64 = stream_key(seed, step, sample)
    d = _check_dist(dist)
    arr, n, keep, (rp, rk, rm) = _split(params, keys, masks)
    lib = _lib()
    if n:
        rc = lib.zo_perturb(arr, n, key64, d, float(scale), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native zo_perturb failed with code {rc}")
    if rp:
        reference.perturb_(rp, rk, seed=seed, step=step, sample=sample, scale=scale,
                           dist=dist, masks=rm)
    del keep


def restore_update_(
    params: Sequence[torch.Tensor],
    keys: Sequence[int],
    *,
    seed: int,
    step: int,
    eps: float,
    lr: float,
    grads: Sequence[float],
    restore_sample: int | None = None,
    weight_decay: float = 0.0,
    dist: str = "normal",
    masks: Sequence[torch.Tensor | None] | None = None,
    stochastic_rounding: bool = False,
) -> None:
    """Restore the last perturbation and apply the update in one pass (compiled).

    Same contract as ``reference.restore_update_``: θ₁ = θ + eps·z_r, then
    θ₂ = θ₁ − lr·(Σ_k grads[k]·z_k + weight_decay·θ₁). ``stochastic_rounding=True`` on
    fp16/bf16 tensors is delegated to the reference (the C code rounds to nearest only).
    """
    if stochastic_rounding and any(p.dtype in (torch.float16, torch.bfloat16) for p in params):
        reference.restore_update_(params, keys, seed=seed, step=step, eps=eps, lr=lr,
                                  grads=grads, restore_sample=restore_sample,
                                  weight_decay=weight_decay, dist=dist, masks=masks,
                                  stochastic_rounding=True)
        return
    reference._check_lists(params, keys, masks)
    n = len(grads)
    r = reference.restore_index(grads, restore_sample)
    key64s = (ctypes.c_uint64 * n)(*[stream_key(seed, step, k) for k in range(n)])
    d = _check_dist(dist)
    gs = (ctypes.c_float * n)(*[float(g) for g in grads])
    arr, nt, keep, (rp, rk, rm) = _split(params, keys, masks)
    lib = _lib()
    if nt:
        rc = lib.zo_restore_update(arr, nt, key64s, gs, n, r, float(eps), float(lr),
                                   float(weight_decay), int(weight_decay != 0.0), d,
                                   torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"native zo_restore_update failed with code {rc}")
    if rp:
        reference.restore_update_(rp, rk, seed=seed, step=step, eps=eps, lr=lr, grads=grads,
                                  restore_sample=restore_sample, weight_decay=weight_decay,
                                  dist=dist, masks=rm)
    del keep


def noise(numel: int, *, seed: int, step: int, key: int, sample: int = 0,
          dist: str = "normal", offset: int = 0) -> torch.Tensor:
    """Elements ``[offset, offset + numel)`` of one stream as fp32 (one thread; tests, benchmarks)."""
    d = _check_dist(dist)
    out = torch.empty(numel, dtype=torch.float32)
    if numel:
        _lib().zo_noise(out.data_ptr(), numel, offset, int(key) & 0xFFFFFFFF,
                        stream_key(seed, step, sample), d)
    return out
