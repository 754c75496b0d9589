"""Distillation from the dense model (``--objective kd`` / ``kd+lm``): a top-k teacher cache on
disk and the (k+1)-bucket KL to it (docs/distillation.md).

Before pruning, one teacher forward over the recovery blocks stores, for each position
t = 0 .. seq-2 of each block (those that predict a token of the block, as the LM loss; the last
has no target and is not stored): ``ids`` (n, seq-1, k) int32, the top-k token ids; ``logits``
(n, seq-1, k) fp16/fp32, their raw logits z; ``lse_rest`` (n, seq-1) float32, log Σ_{v ∉ top-k}
exp(z_v/τ) (−inf when k = V); ``lse_all`` (n, seq-1) float32, log Σ_v exp(z_v/τ); and ``tokens``
(n, seq) int32, the blocks. Each is a ``.npy`` file, memory-mapped when read, beside
``header.json`` (vocab, k, dtype, τ, shapes, per-file bytes and SHA-256, the blocks' SHA-256,
the model name, the build time), built under ``.<name>.tmp-<pid>`` (the run folder's cleaner
removes those of dead processes) and renamed into place once fsynced: a crash leaves no cache
that opens. Training reads a batch from disk per step; the teacher is never resident.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zoengine.hashing import sha256_file
from zoengine.tasks.data import TaskError

FORMAT, VERSION, HEADER = "zoengine-kd-cache", 1, "header.json"
_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


class KDCacheError(TaskError):
    """A teacher cache that cannot be built, opened or used (names ``--objective``)."""

    def __init__(self, message: str):
        super().__init__("--objective", message)


def _np_dtype(dtype) -> np.dtype:
    if dtype in _DTYPES or dtype in ("float16", "float32"):
        return np.dtype(_DTYPES.get(dtype, dtype))
    raise KDCacheError(f"cache dtype {dtype!r}: use torch.float16 or torch.float32")


def _layout(n_blocks: int, seq_len: int, k: int, dtype) -> dict:
    """{file stem: (numpy dtype, shape)} of a cache."""
    t, i32, f32 = seq_len - 1, np.dtype(np.int32), np.dtype(np.float32)
    return {"tokens": (i32, (n_blocks, seq_len)), "ids": (i32, (n_blocks, t, k)),
            "logits": (_np_dtype(dtype), (n_blocks, t, k)), "lse_rest": (f32, (n_blocks, t)),
            "lse_all": (f32, (n_blocks, t))}


def cache_nbytes(n_blocks: int, seq_len: int, k: int, dtype=torch.float16) -> int:
    """Payload bytes: n·(seq−1)·(k·(4 + b) + 8) + n·seq·4, b = 2 (fp16) or 4 (fp32)."""
    return sum(dt.itemsize * math.prod(s) for dt, s in _layout(n_blocks, seq_len, k,
                                                               dtype).values())


def cache_file_bytes(n_blocks: int, seq_len: int, k: int, dtype=torch.float16) -> dict:
    """Exact size of each ``.npy`` file (payload + its NPY header), without ``header.json``."""
    out = {}
    for name, (dt, shape) in _layout(n_blocks, seq_len, k, dtype).items():
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dt),
                                                   "fortran_order": False, "shape": shape})
        out[name] = len(buf.getvalue()) + dt.itemsize * math.prod(shape)
    return out


def blocks_sha256(blocks) -> str:
    """SHA-256 of the blocks' shape and their ids as little-endian int64 (order matters)."""
    a = np.ascontiguousarray(torch.as_tensor(blocks).cpu().numpy().astype("<i8"))
    h = hashlib.sha256(f"{tuple(a.shape)}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


@torch.no_grad()
def topk_targets(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0):
    """(ids, logits, lse_rest, lse_all) of (..., V) logits: the top-k ids and raw logits, and
    the log-sum-exp of z/τ over the rest and over all, in float32. The rest is computed by
    masking the top-k to −inf (never as log(e^all − e^top), which cancels); all = rest ⊕ top."""
    z = teacher_logits.float()
    if not 1 <= k <= z.shape[-1]:
        raise KDCacheError(f"--kd-top-k {k}: must be in [1, vocab size {z.shape[-1]}]")
    vals, ids = z.topk(k, dim=-1)
    rest = (z / temperature if temperature != 1.0 else z).scatter(-1, ids, -math.inf).logsumexp(-1)
    return ids, vals, rest, torch.logaddexp(rest, (vals / temperature).logsumexp(-1))


def _check_blocks(blocks) -> torch.Tensor:
    blocks = torch.as_tensor(blocks)
    if (blocks.dim() != 2 or blocks.dtype not in (torch.int64, torch.int32)
            or blocks.shape[0] < 1 or blocks.shape[1] < 2):
        raise KDCacheError(f"blocks must be an (n_blocks >= 1, seq >= 2) integer tensor (token t "
                           f"predicts t+1), got {tuple(blocks.shape)} {blocks.dtype}")
    return blocks.long()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    with contextlib.suppress(OSError):  # folders on some file systems
        os.fsync(fd)
    os.close(fd)


def _commit(tmp: str, path: str, header: dict) -> None:
    """header.json last, fsync, rename to ``path`` (an old cache: moved aside, then removed)."""
    with open(os.path.join(tmp, HEADER), "w") as f:
        json.dump(header, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)
    old = tmp + ".old" if os.path.exists(path) else None
    if old:
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _fill(model, blocks, arrays, *, k, batch_size, temperature, progress) -> float:
    """Run the teacher over every block into the memmaps; returns the mean top-k mass."""
    from tqdm.auto import tqdm

    device, mass = next(model.parameters()).device, 0.0
    for i in tqdm(range(0, len(blocks), batch_size), desc="teacher cache", unit="batch",
                  disable=not progress, dynamic_ncols=True):
        b = blocks[i:i + batch_size]
        logits = model(input_ids=b.to(device)).logits[:, :-1]
        ids, vals, rest, lse = (x.cpu() for x in topk_targets(logits, k, temperature=temperature))
        if arrays["logits"].dtype == np.float16 and float(vals.abs().max()) > 65504:
            raise KDCacheError("teacher logits exceed the fp16 range: build the cache with "
                               "dtype=torch.float32")
        j = i + len(b)
        arrays["ids"][i:j], arrays["logits"][i:j] = ids.numpy(), vals.numpy()  # cast on store
        arrays["lse_rest"][i:j], arrays["lse_all"][i:j] = rest.numpy(), lse.numpy()
        mass += float((1.0 - torch.exp(rest.double() - lse.double())).sum())
    return mass / (blocks.shape[0] * (blocks.shape[1] - 1))


def _write_arrays(model, blocks, tmp, *, k, dtype, **kw) -> dict:
    """Create and fill the ``.npy`` files in ``tmp``; returns the header's entries for them."""
    layout = _layout(blocks.shape[0], blocks.shape[1], k, dtype)
    arrays = {name: np.lib.format.open_memmap(os.path.join(tmp, name + ".npy"), mode="w+",
                                              dtype=dt, shape=shape)
              for name, (dt, shape) in layout.items()}
    arrays["tokens"][:] = blocks.numpy()
    t0 = time.perf_counter()
    stats = {"topk_mass": _fill(model, blocks, arrays, k=k, **kw),
             "build_s": time.perf_counter() - t0}
    for a in arrays.values():
        a.flush()
    del arrays, a
    files = {}
    for name, (dt, shape) in layout.items():
        f = os.path.join(tmp, name + ".npy")
        _fsync(f)
        files[name] = {"dtype": dt.name, "shape": list(shape), "bytes": os.path.getsize(f),
                       "sha256": sha256_file(f)[1]}
    return {"files": files, **stats}


def build_teacher_cache(model, blocks, path: str, *, k: int = 64, batch_size: int = 8,
                        dtype=torch.float16, temperature: float = 1.0, progress: bool = True,
                        overwrite: bool = False) -> TeacherCache:
    """Run ``model`` (no grad, eval mode, restored after) over ``blocks`` (n_blocks, seq), one
    forward per ``batch_size`` blocks (``header["build_s"]``), and write the top-k cache to the
    folder ``path`` atomically; returns it opened. ids/logits are the raw logits' top-k (the
    same at any τ > 0); ``lse_rest`` / ``lse_all`` are of z/τ: a cache serves one τ."""
    blocks, cfg = _check_blocks(blocks), getattr(model, "config", None)
    n, seq = blocks.shape
    vocab = int(getattr(cfg, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
    if not 1 <= k <= vocab:
        raise KDCacheError(f"--kd-top-k {k}: must be in [1, vocab size {vocab}]")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise KDCacheError(f"temperature {temperature}: must be a positive number")
    if os.path.exists(path) and not overwrite:
        raise KDCacheError(f"{path} exists: open it with TeacherCache.open, or pass "
                           "overwrite=True to rebuild it")
    header = {"format": FORMAT, "version": VERSION, "vocab_size": vocab, "k": int(k),
              "n_blocks": int(n), "seq_len": int(seq), "positions": int(seq - 1),
              "dtype": _np_dtype(dtype).name, "temperature": float(temperature),
              "blocks_sha256": blocks_sha256(blocks),
              "model": getattr(cfg, "_name_or_path", None) or None,
              "nbytes": cache_nbytes(n, seq, k, dtype)}
    parent, base = os.path.split(os.path.abspath(path))
    tmp, was_training = os.path.join(parent, f".{base}.tmp-{os.getpid()}"), model.training
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        model.eval()
        with torch.no_grad():
            header.update(_write_arrays(model, blocks, tmp, k=k, dtype=dtype, progress=progress,
                                        batch_size=batch_size, temperature=temperature))
        _commit(tmp, path, header)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    return TeacherCache.open(path, verify=False)


@dataclass
class KDBatch:
    """The cached targets of some blocks: ``input_ids`` (B, seq); ``ids`` (B, T, k) int64;
    ``logits`` (B, T, k), ``lse_rest`` and ``lse_all`` (B, T) float32; T = seq − 1."""

    input_ids: torch.Tensor
    ids: torch.Tensor
    logits: torch.Tensor
    lse_rest: torch.Tensor
    lse_all: torch.Tensor
    temperature: float = 1.0

    def to(self, device) -> KDBatch:
        return KDBatch(self.input_ids.to(device), self.ids.to(device), self.logits.to(device),
                       self.lse_rest.to(device), self.lse_all.to(device), self.temperature)


def _read_header(path: str) -> dict:
    f = os.path.join(path, HEADER)
    if not os.path.isdir(path) or not os.path.exists(f):
        raise KDCacheError(f"{path}: no teacher cache here ({HEADER} missing); it is written "
                           "last, so a build that did not finish leaves none")
    keys = ("k", "n_blocks", "seq_len", "dtype", "temperature", "blocks_sha256", "files")
    try:
        with open(f) as fh:
            h = json.load(fh)
        good = h.get("format") == FORMAT and h.get("version") == VERSION
        why = "" if good and all(x in h for x in keys) else "another format, or fields missing"
    except (OSError, ValueError, AttributeError) as exc:
        why = str(exc)
    if why:
        raise KDCacheError(f"{f}: not a readable {FORMAT} v{VERSION} header ({why}): delete "
                           f"{path} to rebuild it")
    return h


def _open_array(path: str, name: str, dt, shape, meta: dict, verify: bool) -> np.ndarray:
    f = os.path.join(path, name + ".npy")
    where = f"teacher cache {path}: {name}.npy"
    size = os.path.getsize(f) if os.path.exists(f) else "no"
    if size != meta.get("bytes"):
        raise KDCacheError(f"{where} has {size} bytes, the header says {meta.get('bytes')}: "
                           "missing, truncated or replaced; delete the folder to rebuild it")
    if verify and sha256_file(f)[1] != meta.get("sha256"):
        raise KDCacheError(f"{where} is corrupt (its SHA-256 differs from the header's); "
                           "delete the folder to rebuild the cache")
    try:
        a = np.load(f, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise KDCacheError(f"{where} is not a readable .npy file ({exc})") from exc
    if a.dtype != dt or a.shape != tuple(shape):
        raise KDCacheError(f"{where} is {a.dtype} {a.shape}, expected {dt} {tuple(shape)}")
    return a


@dataclass
class TeacherCache:
    """An opened teacher cache: ``header`` and memory-mapped ``arrays`` (module docstring)."""

    path: str
    header: dict
    arrays: dict

    @classmethod
    def open(cls, path: str, blocks=None, *, verify: bool = True) -> TeacherCache:
        """Memory-map the cache at ``path``. Refuses (``KDCacheError``) a missing, truncated or
        corrupt file (``verify`` checks each file's SHA-256: one read of the cache), and, when
        ``blocks`` is given, a cache built on other blocks."""
        h = _read_header(path)
        layout = _layout(h["n_blocks"], h["seq_len"], h["k"], h["dtype"])
        arrays = {name: _open_array(path, name, dt, shape, h["files"].get(name, {}), verify)
                  for name, (dt, shape) in layout.items()}
        if blocks is not None and blocks_sha256(_check_blocks(blocks)) != h["blocks_sha256"]:
            raise KDCacheError(f"teacher cache {path} was built on other tokens (blocks SHA-256 "
                               "differs): delete it, or pass the blocks it was built on")
        return cls(os.path.abspath(path), h, arrays)

    def __len__(self) -> int:
        return self.header["n_blocks"]

    k = property(lambda self: self.header["k"])
    temperature = property(lambda self: self.header["temperature"])
    nbytes = property(lambda self: self.header["nbytes"], doc="payload bytes (cache_nbytes)")

    @property
    def disk_bytes(self) -> int:
        """Bytes of every file in the folder, header.json included."""
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path))

    def batch(self, block_indices, device=None) -> KDBatch:
        """The targets of these blocks (read from disk now; any order, repeats allowed)."""
        idx = np.asarray(torch.as_tensor(block_indices).cpu(), dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"block index out of range [0, {len(self)})")
        a = {name: torch.from_numpy(np.array(m[idx])) for name, m in self.arrays.items()}
        out = KDBatch(a["tokens"].long(), a["ids"].long(), a["logits"].float(), a["lse_rest"],
                      a["lse_all"], self.temperature)
        return out if device is None else out.to(device)

    def describe(self) -> str:
        """One line for the run's report."""
        h = self.header
        return (f"KD cache: {h['n_blocks']} blocks x {h['positions']} positions, top-{h['k']} "
                f"{h['dtype']} of vocab {h['vocab_size']}, {self.disk_bytes / 2**20:.2f} MiB, "
                f"built in {h['build_s']:.1f} s; top-k mass {100 * h['topk_mass']:.1f}%")


def _align(student_logits: torch.Tensor, t: int) -> torch.Tensor:
    if student_logits.dim() != 3 or student_logits.shape[1] not in (t, t + 1):
        raise ValueError(f"student logits {tuple(student_logits.shape)}: expected (B, {t}, V) "
                         f"or (B, {t + 1}, V) (the last position is dropped)")
    return student_logits[:, :t].float()


def kd_loss(student_logits: torch.Tensor, cache_batch: KDBatch, *,
            temperature: float | None = None) -> torch.Tensor:
    """Mean over positions of KL(p_teacher ‖ p_student) on k+1 buckets (the teacher's top-k
    tokens and one bucket for the rest of the vocabulary); a 0-dim float32 tensor.

    Teacher: softmax([z_1/τ, …, z_k/τ, lse_rest]), i.e. p_i = e^{z_i/τ − lse_all} and
    p_rest = e^{lse_rest − lse_all} (renormalised, so an fp16 cache still sums to 1).
    Student (logits s, (B, T, V) or (B, T+1, V) with the last position dropped):
    log q_i = s_i/τ − LSE(s/τ), log q_rest = LSE_{v ∉ top-k}(s/τ) − LSE(s/τ) (the rest by masking
    the k ids to −inf: stable). The KL between these two (k+1)-bucket distributions is exact;
    since both are the same deterministic coarsening of the vocabulary, it lower-bounds the full
    KL (data-processing inequality) and equals it when k = V. No τ² factor is applied.
    """
    tau = cache_batch.temperature if temperature is None else float(temperature)
    if tau != cache_batch.temperature:
        raise KDCacheError(f"temperature {tau}: the cache's rest bucket was computed at "
                           f"{cache_batch.temperature}; rebuild the cache for another one")
    b = cache_batch.to(student_logits.device)
    s = _align(student_logits, b.ids.shape[1]) / tau
    t_log = torch.log_softmax(torch.cat([b.logits / tau, b.lse_rest[..., None]], -1), -1)
    s_rest = s.scatter(-1, b.ids, -math.inf).logsumexp(-1, keepdim=True)
    s_log = torch.cat([s.gather(-1, b.ids), s_rest], -1) - s.logsumexp(-1, keepdim=True)
    p = t_log.exp()
    return torch.where(p > 0, p * (t_log - s_log), torch.zeros_like(p)).sum(-1).mean()


def lm_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, Hugging Face's convention: ``labels`` (B, seq) is the block;
    position t of the logits ((B, seq−1, V) or (B, seq, V)) predicts labels[:, t+1]; mean over
    the targets that are not −100 (equals ``model(input_ids=b, labels=b).loss``)."""
    if labels.dim() != 2:
        raise ValueError(f"labels {tuple(labels.shape)}: expected (B, seq)")
    s = _align(student_logits, labels.shape[1] - 1)
    return F.cross_entropy(s.flatten(0, 1), labels[:, 1:].to(s.device).flatten(), ignore_index=-100)


def check_kd_weight(kd_weight) -> float:
    """``--kd-weight`` as a float in [0, 1], or a ``ConfigError`` (a ValueError) naming it:
    ``RunConfig``'s check of the flag (``zoengine.checks.PROBABILITY``)."""
    from zoengine.checks import PROBABILITY

    return float(PROBABILITY("--kd-weight", kd_weight))


def mixed_loss(student_logits: torch.Tensor, labels, cache_batch: KDBatch, *, kd_weight: float,
               temperature: float | None = None) -> torch.Tensor:
    """w·kd_loss + (1 − w)·lm_cross_entropy, w = ``kd_weight`` in [0, 1]; a term whose weight
    is 0 is not computed. ``labels=None`` uses the batch's own blocks."""
    w = check_kd_weight(kd_weight)
    labels = cache_batch.input_ids if labels is None else labels
    out = w * kd_loss(student_logits, cache_batch, temperature=temperature) if w > 0 else 0.0
    if w < 1:
        out = out + (1.0 - w) * lm_cross_entropy(student_logits, labels)
    return out


def kd_batch_loss(model, cache_batch: KDBatch, *, kd_weight: float = 1.0) -> torch.Tensor:
    """One forward of ``model`` on the batch's blocks and its ``mixed_loss``: the closure body
    of ``--objective kd`` (kd_weight 1) and ``kd+lm``. Read the batch once per step, outside
    the closure, so the step's evaluations see the same positions."""
    b = cache_batch.to(next(model.parameters()).device)
    return mixed_loss(model(input_ids=b.input_ids).logits, b.input_ids, b, kd_weight=kd_weight)

