"""Distillation from the dense model (zoengine/tasks/distill.py, docs/distillation.md): the
top-k teacher cache on disk and the (k+1)-bucket KL."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

import zoengine
from zoengine.tasks import distill
from zoengine.tasks.distill import (
    KDBatch,
    KDCacheError,
    TeacherCache,
    build_teacher_cache,
    cache_file_bytes,
    cache_nbytes,
    kd_batch_loss,
    kd_loss,
    mixed_loss,
    topk_targets,
)

torch.set_num_threads(2)
V, N, SEQ, K, BS = 128, 6, 12, 8, 4


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(vocab=V, seed=0)


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, V, (N, SEQ), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def caches(teacher, blocks, tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    return {dt: build_teacher_cache(teacher, blocks, str(root / f"cache-{dt}"), k=K,
                                    batch_size=BS, dtype=dt, progress=False)
            for dt in (torch.float32, torch.float16)}


@torch.no_grad()
def _teacher_logits(model, blocks):
    """The teacher's logits at positions 0..seq-2, in the cache's batch partition."""
    return torch.cat([model(input_ids=blocks[i:i + BS]).logits[:, :-1]
                      for i in range(0, len(blocks), BS)])


def _batch_from_logits(z, k, temperature=1.0):
    ids, vals, rest, lse = topk_targets(z, k, temperature=temperature)
    return KDBatch(torch.zeros(z.shape[0], z.shape[1] + 1, dtype=torch.long), ids, vals, rest,
                   lse, temperature)


def _bucket_kl64(z, s, k, tau=1.0):
    """(k+1)-bucket KL(teacher ‖ student) recomputed in float64 from the full distributions."""
    p, q = torch.softmax(z.double() / tau, -1), torch.softmax(s.double() / tau, -1)
    ids = z.topk(k, dim=-1).indices
    pb = torch.cat([p.gather(-1, ids), (1 - p.gather(-1, ids).sum(-1, keepdim=True))], -1)
    qb = torch.cat([q.gather(-1, ids), (1 - q.gather(-1, ids).sum(-1, keepdim=True))], -1)
    return (pb * (pb.log() - qb.log())).sum(-1).mean()


# ---- the cache reproduces the teacher ---------------------------------------------------------

def test_fp32_cache_reproduces_the_teachers_topk_exactly(teacher, blocks, caches):
    cache = caches[torch.float32]
    z = _teacher_logits(teacher, blocks)
    b = cache.batch(range(N))
    assert torch.equal(b.input_ids, blocks)
    assert b.ids.shape == (N, SEQ - 1, K) and b.logits.shape == (N, SEQ - 1, K)
    vals = z.topk(K, dim=-1).values
    assert torch.equal(b.logits, vals)  # bit for bit
    assert torch.equal(z.gather(-1, b.ids), vals)  # the ids are those of the values
    z64 = z.double()
    rest = z64.scatter(-1, b.ids, -math.inf).logsumexp(-1)
    assert torch.allclose(b.lse_rest.double(), rest, atol=1e-5, rtol=0)
    assert torch.allclose(b.lse_all.double(), z64.logsumexp(-1), atol=1e-5, rtol=0)
    assert cache.header["vocab_size"] == V and cache.header["positions"] == SEQ - 1


def test_fp16_cache_is_the_teachers_topk_within_fp16_rounding(teacher, blocks, caches):
    b = caches[torch.float16].batch(range(N))
    vals = _teacher_logits(teacher, blocks).topk(K, dim=-1).values
    assert torch.equal(b.logits, vals.half().float())  # round to nearest, nothing else
    assert ((b.logits - vals).abs() <= vals.abs() * 2.0**-11 + 2.0**-24).all()
    assert torch.equal(b.ids, caches[torch.float32].batch(range(N)).ids)
    assert caches[torch.float16].arrays["logits"].dtype == np.float16


def test_batch_reads_any_blocks_in_any_order(caches, blocks):
    cache = caches[torch.float32]
    b = cache.batch([4, 1, 4])
    assert torch.equal(b.input_ids, blocks[[4, 1, 4]])
    assert b.ids.dtype == torch.int64 and b.logits.dtype == torch.float32
    assert torch.equal(b.logits[0], b.logits[2])
    with pytest.raises(IndexError):
        cache.batch([N])


# ---- the loss ---------------------------------------------------------------------------------

@torch.no_grad()
def test_kd_is_zero_for_the_teacher_and_positive_for_another_model(teacher, caches):
    idx = list(range(N))
    assert float(kd_batch_loss(teacher, caches[torch.float32].batch(idx))) <= 1e-6
    assert abs(float(kd_batch_loss(teacher, caches[torch.float16].batch(idx)))) <= 1e-4
    other = float(kd_batch_loss(tiny_llama(vocab=V, seed=1), caches[torch.float32].batch(idx)))
    assert other > 1e-3 and math.isfinite(other)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_matches_a_float64_bucket_kl_on_random_logits(tau):
    g = torch.Generator().manual_seed(0)
    z, s = torch.randn(3, 5, 50, generator=g) * 3, torch.randn(3, 5, 50, generator=g) * 3
    got = kd_loss(s, _batch_from_logits(z, 7, tau))
    assert got.dtype == torch.float32 and got.dim() == 0
    ref = _bucket_kl64(z, s, 7, tau)
    assert abs(float(got) - float(ref)) <= 1e-6 + 1e-5 * float(ref)
    full = F.kl_div(torch.log_softmax(s.double() / tau, -1), torch.log_softmax(z.double() / tau,
                    -1), log_target=True, reduction="none").sum(-1).mean()
    assert float(ref) <= float(full) + 1e-12  # data processing: the buckets lose information


def test_kd_with_k_equal_to_the_vocabulary_is_the_full_kl():
    g = torch.Generator().manual_seed(1)
    z, s = torch.randn(2, 6, 40, generator=g) * 2, torch.randn(2, 6, 40, generator=g) * 2
    batch = _batch_from_logits(z, 40)
    assert torch.isinf(batch.lse_rest).all()  # the rest bucket is empty
    full = F.kl_div(torch.log_softmax(s.double(), -1), torch.log_softmax(z.double(), -1),
                    log_target=True, reduction="none").sum(-1).mean()
    got = kd_loss(s, batch)
    assert torch.isfinite(got) and abs(float(got) - float(full)) <= 1e-5
    # logits with the last position (B, T+1, V) are accepted: it is dropped
    assert float(kd_loss(torch.cat([s, s[:, :1]], 1), batch)) == float(got)


def test_kd_refuses_another_temperature_and_wrong_shapes(caches):
    b = caches[torch.float32].batch([0])
    with pytest.raises(KDCacheError, match="temperature"):
        kd_loss(torch.zeros(1, SEQ - 1, V), b, temperature=2.0)
    with pytest.raises(ValueError, match="student logits"):
        kd_loss(torch.zeros(1, SEQ + 1, V), b)


def test_mixed_loss_weights_kd_and_lm(teacher, caches):
    b = caches[torch.float32].batch([0, 2])
    student = tiny_llama(vocab=V, seed=1)
    with torch.no_grad():
        logits = student(input_ids=b.input_ids).logits
        hf = student(input_ids=b.input_ids, labels=b.input_ids).loss
    kd, lm = kd_loss(logits, b), mixed_loss(logits, None, b, kd_weight=0.0)
    assert torch.allclose(lm, hf, atol=1e-6)
    assert torch.equal(mixed_loss(logits, b.input_ids, b, kd_weight=1.0), kd)
    assert torch.allclose(mixed_loss(logits, None, b, kd_weight=0.3), 0.3 * kd + 0.7 * lm)
    for bad in (-0.1, 1.5, float("nan"), "x", None):
        with pytest.raises(ValueError, match="--kd-weight"):
            mixed_loss(logits, None, b, kd_weight=bad)


# ---- what is refused --------------------------------------------------------------------------

def test_a_cache_of_other_blocks_is_refused(caches, blocks):
    path = caches[torch.float32].path
    assert len(TeacherCache.open(path, blocks)) == N
    other = blocks.clone()
    other[2, 5] = (other[2, 5] + 1) % V
    with pytest.raises(KDCacheError, match="other tokens"):
        TeacherCache.open(path, other)
    with pytest.raises(KDCacheError, match="other tokens"):
        TeacherCache.open(path, blocks[[1, 0, 2, 3, 4, 5]])  # order matters too


def _copy(cache, dst):
    import shutil

    shutil.copytree(cache.path, dst)
    return str(dst)


def test_truncated_or_corrupt_files_are_refused(caches, tmp_path):
    cache = caches[torch.float16]
    path = _copy(cache, tmp_path / "trunc")
    with open(os.path.join(path, "logits.npy"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, "logits.npy")) - 10)
    with pytest.raises(KDCacheError, match="logits.npy.*truncated"):
        TeacherCache.open(path)
    path = _copy(cache, tmp_path / "flip")
    with open(os.path.join(path, "ids.npy"), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(KDCacheError, match="ids.npy is corrupt"):
        TeacherCache.open(path)
    path = _copy(cache, tmp_path / "header")
    with open(os.path.join(path, "header.json"), "w") as f:
        f.write('{"format": "zoengine-kd-cache", "version": 1, "k": ')
    with pytest.raises(KDCacheError, match="header"):
        TeacherCache.open(path)
    path = _copy(cache, tmp_path / "nohead")  # what a builder killed before its rename holds
    os.remove(os.path.join(path, "header.json"))
    with pytest.raises(KDCacheError, match="no teacher cache"):
        TeacherCache.open(path)


def test_a_crash_mid_build_leaves_no_cache(teacher, blocks, tmp_path, monkeypatch):
    forward, calls = teacher.forward, []

    def dies_after_one_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("killed mid-build")
        return forward(*args, **kwargs)

    monkeypatch.setattr(teacher, "forward", dies_after_one_batch)
    path = str(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_teacher_cache(teacher, blocks, path, k=K, batch_size=BS, progress=False)
    assert len(calls) == 2 and not teacher.training
    assert os.listdir(tmp_path) == []  # neither the cache nor its temp
    with pytest.raises(KDCacheError, match="no teacher cache"):
        TeacherCache.open(path)


def test_an_existing_cache_is_not_overwritten_unless_asked(teacher, blocks, tmp_path):
    path = str(tmp_path / "c")
    build_teacher_cache(teacher, blocks, path, k=2, batch_size=BS, progress=False)
    with pytest.raises(KDCacheError, match="exists"):
        build_teacher_cache(teacher, blocks, path, k=4, batch_size=BS, progress=False)
    cache = build_teacher_cache(teacher, blocks[:3], path, k=4, batch_size=BS, progress=False,
                                overwrite=True)
    assert cache.k == 4 and len(TeacherCache.open(path, blocks[:3])) == 3
    assert sorted(os.listdir(tmp_path)) == ["c"]
    with pytest.raises(KDCacheError, match="kd-top-k"):
        build_teacher_cache(teacher, blocks, str(tmp_path / "d"), k=V + 1, progress=False)


# ---- size and training --------------------------------------------------------------------------

@pytest.mark.parametrize("dt,b", [(torch.float16, 2), (torch.float32, 4)])
def test_disk_size_is_the_computed_size(caches, dt, b):
    cache = caches[dt]
    assert cache.nbytes == N * (SEQ - 1) * (K * (4 + b) + 8) + N * SEQ * 4
    assert cache.nbytes == cache_nbytes(N, SEQ, K, dt)
    files = cache.header["files"]
    assert {n: f["bytes"] for n, f in files.items()} == cache_file_bytes(N, SEQ, K, dt)
    on_disk = sum(os.path.getsize(os.path.join(cache.path, f)) for f in os.listdir(cache.path))
    header = os.path.getsize(os.path.join(cache.path, "header.json"))
    assert cache.disk_bytes == on_disk == sum(f["bytes"] for f in files.values()) + header
    with open(os.path.join(cache.path, "header.json")) as f:
        assert json.load(f)["nbytes"] == cache.nbytes
    assert "MiB" in cache.describe() and cache.header["build_s"] >= 0
    assert 0 < cache.header["topk_mass"] <= 1


def test_smollm2_worked_number_in_the_docs():
    assert cache_nbytes(256, 128, 64, torch.float16) == 12_875_776


def test_mezo_steps_on_the_kd_loss(caches, teacher):
    cache = caches[torch.float32]
    student = tiny_llama(vocab=V, seed=1)
    opt = zoengine.MeZO(student.parameters(), lr=1e-3, eps=1e-3, seed=0)
    rng = np.random.RandomState(0)
    for _ in range(4):
        batch = cache.batch(rng.randint(0, N, 2))  # read once: both evaluations see it
        loss = opt.step(lambda b=batch: kd_batch_loss(student, b))
        assert math.isfinite(float(loss))
    # lr = 0: a step leaves the model (and so the loss) as it was, up to the restore's rounding
    frozen = zoengine.MeZO(student.parameters(), lr=0.0, eps=1e-3, seed=1)
    batch = cache.batch([0, 3])
    with torch.no_grad():
        before = float(kd_batch_loss(student, batch))
        frozen.step(lambda: kd_batch_loss(student, batch))
        after = float(kd_batch_loss(student, batch))
    assert after == pytest.approx(before, rel=1e-5, abs=1e-7)


def test_cache_layout_module_constants():
    assert distill.FORMAT == "zoengine-kd-cache" and distill.HEADER == "header.json"
