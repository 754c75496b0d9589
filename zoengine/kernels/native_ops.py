"""Compiled CPU backend ("native"): the ZO ops of zoengine/kernels/reference.py in C, built on first use.

``zoengine/kernels/native.c`` (plain C, no torch headers) is compiled with the system C compiler (``$CC``
if set, else ``cc``, ``gcc`` or ``clang``) into a shared library cached in a private folder
(``$ZOENGINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/zoengine``, else ``~/.cache/zoengine``, else a
per-user temp dir; zoengine/kernels/native_build.py has the rules: nothing is loaded from a folder or
file that another user could have written). The file name carries a hash of the source, the
compiler, its version, the flags and the CPU, so a change to any of them builds a new file. The
build writes to a temporary file and ``os.replace``s it, so concurrent processes never load a
half-written library. It is loaded with ctypes and called on the tensors' ``data_ptr()``; ctypes
releases the GIL for the call.

Anything that makes the build not the fast one it should be (no compiler, a compiler error, a
slower variant, a broken cached library that had to be rebuilt, a refused cache folder) is
reported once per build attempt, i.e. once per process for a given ($CC, cache dir, variant), by
a ``NativeBuildWarning`` that names the backend or variant actually used and the reason.

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
import os
import subprocess
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from zoengine.kernels import reference
from zoengine.kernels.keys import stream_key
from zoengine.kernels.native_build import (  # noqa: F401  (re-exported: the public names)
    _BASE_FLAGS,
    _VARIANTS,
    ABI_VERSION,
    NativeBuildError,
    NativeBuildWarning,
    _clean_stale_tmp,
    _compile,
    _compiler,
    _compiler_version,
    _lib_path,
    _trust_problem,
    _usable_cache_dir,
    cache_dir,
)
from zoengine.kernels.philox import DISTRIBUTIONS

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DISTS = {name: i for i, name in enumerate(DISTRIBUTIONS)}  # normal 0, uniform 1, rademacher 2
_MASK_U8, _MASK_F32 = 1, 2
# what a failed compile, load or self-test raises: the variant is given up, never the process
_LOAD_ERRORS = (OSError, subprocess.SubprocessError, NativeBuildError, AttributeError)


class _ZoTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("mask", ctypes.c_void_p), ("numel", ctypes.c_int64),
                ("key", ctypes.c_uint32), ("dtype", ctypes.c_int32),
                ("mask_type", ctypes.c_int32), ("reserved", ctypes.c_int32)]


# ---- build and load ------------------------------------------------------------------------

def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    try:
        if lib.zo_abi_version() != ABI_VERSION:
            raise NativeBuildError(f"{path} has ABI {lib.zo_abi_version()}, "
                                   f"expected {ABI_VERSION}")
        P, i64, u64, u32, i32, f32 = (ctypes.POINTER(_ZoTensor), ctypes.c_int64,
                                      ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int,
                                      ctypes.c_float)
        lib.zo_perturb.argtypes = [P, i64, u64, i32, f32, i32]
        lib.zo_restore_update.argtypes = [P, i64, ctypes.POINTER(u64), ctypes.POINTER(f32), i32,
                                          i32, f32, f32, f32, i32, i32, i32]
        lib.zo_noise.argtypes = [ctypes.c_void_p, i64, i64, u32, u64, i32]
        for fn in (lib.zo_perturb, lib.zo_restore_update, lib.zo_noise):
            fn.restype = ctypes.c_int
        _self_test(lib)
    except BaseException:
        _unload(lib)
        raise
    return lib


def _unload(lib: ctypes.CDLL) -> None:
    """dlclose a rejected library: the dynamic loader hands out the library already mapped
    under a path, so without this a rebuilt file at the same path would never be read."""
    try:
        import _ctypes

        _ctypes.dlclose(lib._handle)  # no threads outlive a call into the library
    except (ImportError, AttributeError, OSError):
        pass


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


def _load_variant(cc: list[str], cflags: list[str], ldflags: list[str], path: Path,
                  notes: list[str]) -> ctypes.CDLL:
    """The library at ``path``, loaded from the cache or built.

    A cached file that is not trusted (another owner, group/other-writable), does not load or
    fails the self-test is rebuilt once, the new file ``os.replace``-ing it (no moment without
    a complete file for concurrent processes); a library that still fails is deleted.
    """
    if os.path.lexists(path):
        try:
            problem = _trust_problem(path, "cached library")
        except OSError as exc:
            problem = f"cached library {path} cannot be inspected ({exc})"
        if problem is None:
            try:
                return _bind(path)
            except _LOAD_ERRORS as exc:
                problem = f"cached library {path} is broken ({exc})"
        notes.append(f"{problem}: deleted and rebuilt")
    try:
        _compile(cc, cflags, ldflags, path)
        return _bind(path)
    except _LOAD_ERRORS:
        try:  # never leave a library known to be bad in the cache
            os.unlink(path)
        except OSError:
            pass
        raise


def _build_and_load(notes: list[str]) -> tuple[ctypes.CDLL, dict]:
    """Load or build the best variant; what a user should know goes to ``notes``."""
    cc = _compiler()
    version = _compiler_version(cc)
    folder = _usable_cache_dir(notes)
    _clean_stale_tmp(folder)
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
            lib = _load_variant(cc, cflags, ldflags, path, notes)
        except _LOAD_ERRORS as exc:
            problems.append(f"[{name}] {exc}")
            continue
        if problems:
            notes.append(f"fell back to the slower variant {name!r}: " + "; ".join(problems))
        return lib, {"variant": name, "path": str(path), "compiler": " ".join(cc),
                     "compiler_version": version, "flags": _BASE_FLAGS + cflags + ldflags,
                     "notes": list(notes)}
    raise NativeBuildError("could not build the native CPU kernels: " + "; ".join(problems))


_lock = threading.Lock()
_loaded: dict[tuple, tuple[ctypes.CDLL | None, dict | None, str | None]] = {}


def _state_key() -> tuple:
    return (os.environ.get("CC"), str(cache_dir()), os.environ.get("ZOENGINE_NATIVE_VARIANT"))


def _reset() -> None:
    """Forget every remembered build outcome (tests): the next call builds or loads again."""
    with _lock:
        _loaded.clear()


def _warn(lib: ctypes.CDLL | None, info: dict | None, reason: str | None,
          notes: list[str]) -> None:
    if lib is None:
        head = ("native CPU kernels unavailable, so backend='auto' uses the 'reference' backend "
                f"(an order of magnitude slower): {reason}")
    elif notes:
        head = f"backend 'native' uses variant {info['variant']!r} from {info['path']}"
    else:
        return
    warnings.warn("; ".join([head, *notes]), NativeBuildWarning, stacklevel=4)


def _lib() -> ctypes.CDLL:
    """The loaded library (built on first use), or NativeBuildError saying why not.

    The outcome is remembered per ($CC, cache dir, pinned variant), so a failed build is not
    retried (nor warned about) on every call, and a test that changes either gets a fresh
    attempt. The thread that made the attempt warns once if it was not a clean success.
    """
    key = _state_key()
    notes: list[str] = []
    with _lock:
        fresh = key not in _loaded
        if fresh:
            try:
                lib, info = _build_and_load(notes)
                _loaded[key] = (lib, info, None)
            except Exception as exc:  # auto dispatch must never fail: keep the reason
                _loaded[key] = (None, None, str(exc) or type(exc).__name__)
        lib, info, reason = _loaded[key]
    if fresh:
        _warn(lib, info, reason, notes)
    if lib is None:
        raise NativeBuildError(reason)
    return lib


def build_info() -> dict:
    """How the library in use was built (variant, path, compiler, flags, notes); builds it if
    needed."""
    _lib()
    return dict(_loaded[_state_key()][1])


def unavailable_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why this backend cannot run on ``tensors``, or None if it can. Never raises, but may
    warn once (module docstring); a warnings filter that turns NativeBuildWarning into an
    error makes that error propagate, as asked."""
    try:
        devices = sorted({t.device.type for t in tensors})
        if devices and devices != ["cpu"]:
            return f"it needs CPU tensors; got devices {devices}"
        _lib()
        return None
    except NativeBuildWarning:
        raise
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
    offsets: Sequence[int] | None = None,
) -> None:
    """θ ← θ + scale·z for every tensor, z from the noise contract (in place, compiled).

    Same contract as ``reference.perturb_``: ``masks[i]`` zeroes z where it is 0.
    """
    reference.no_offsets(offsets, "native")
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
    offsets: Sequence[int] | None = None,
) -> None:
    """Restore the last perturbation and apply the update in one pass (compiled).

    Same contract as ``reference.restore_update_``: θ₁ = θ + eps·z_r, then
    θ₂ = θ₁ − lr·(Σ_k grads[k]·z_k + weight_decay·θ₁). ``stochastic_rounding=True`` on
    fp16/bf16 tensors is delegated to the reference (the C code rounds to nearest only).
    """
    reference.no_offsets(offsets, "native")
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
