"""The compiled CPU backend ("native") against the pure-PyTorch oracle (zoengine/kernels/reference.py).

Promises checked here (docs/backends.md):
- uniform and Rademacher z, and every op result built from them, are bit-identical to the oracle
  for fp32, fp16 and bf16 parameters (same fp32 arithmetic, one rounding on store);
- normal z differ from the oracle by at most NORMAL_MAX_ULP fp32 ulp (vectorised libmvec
  log/sin/cos instead of PyTorch's); op results within the per-dtype TOL table;
- results do not depend on the thread count;
- auto dispatch falls back to the reference, with a readable reason and one warning, when the
  build fails (tests/test_native_build.py: the cache folder, broken libraries, warnings).
"""

import copy

import pytest
import torch

import zoengine
from zoengine.kernels import dispatch, reference
from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import noise_blocks

native_ops = pytest.importorskip("zoengine.kernels.native_ops")
_REASON = native_ops.unavailable_reason([torch.zeros(1)])
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"native backend: {_REASON}")

torch.set_num_threads(1)

NORMAL_MAX_ULP = 8  # measured max 5 over 2**24 values (docs/backends.md)
# (rtol, atol) for op results with normal z, per parameter dtype: fp32 a few ulp of the
# operands; fp16/bf16 one ulp of the dtype (a few-ulp fp32 difference can cross a rounding tie).
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-6), torch.bfloat16: (8e-3, 1e-5)}
DTYPES = list(TOL)
DISTS = ("normal", "uniform", "rademacher")
SHAPES = [(1,), (7,), (4097,), (6, 42, 123)]


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in fp32 ulps, through the monotone integer order of the bit patterns."""
    def order(x):
        i = x.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)

    return (order(a) - order(b)).abs()


def _check(got, want, dist, dtype):
    if dist == "normal":
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    else:
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int16 if dtype != torch.float32 else torch.int32))


def _params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _masks(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = [torch.rand(s, generator=g) < 0.6 for s in shapes]
    out[0] = None  # a None entry inside the list: that tensor is unmasked
    return out


# ---------------------------------------------------------------- the noise itself
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("seed,step,sample,key", [(0, 0, 0, 0), (3, 17, 2, 0xDEADBEEF),
                                                  (2**64 - 1, 123456, 1, 12345)])
def test_z_matches_oracle(dist, seed, step, sample, key):
    n = 1 << 16
    want = noise_blocks(0, n // 4, key64=stream_key(seed, step, sample), tensor_key=key,
                        dist=dist)
    x = torch.zeros(n)  # perturb_ of zeros with scale 1 reads z itself
    native_ops.perturb_([x], [key], seed=seed, step=step, sample=sample, scale=1.0, dist=dist)
    if dist == "normal":
        assert _ulp_distance(x, want).max().item() <= NORMAL_MAX_ULP
    else:
        assert torch.equal(x, want)


@pytest.mark.parametrize("dist", DISTS)
def test_offsets_and_high_blocks(dist):
    """Odd offsets, and a tile that crosses block 2**32 (counter word 0 wraps into word 1)."""
    key64 = stream_key(5, 6, 0)
    for offset in (1, 6, 4 * (2**32 - 3) + 1):
        got = native_ops.noise(37, seed=5, step=6, key=99, dist=dist, offset=offset)
        b0 = offset // 4
        want = noise_blocks(b0, 12, key64=key64, tensor_key=99, dist=dist)
        want = want[offset - 4 * b0: offset - 4 * b0 + 37]
        if dist == "normal":
            assert _ulp_distance(got, want).max().item() <= NORMAL_MAX_ULP
        else:
            assert torch.equal(got, want)


# ---------------------------------------------------------------- the ops
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_perturb_matches_reference(dtype, dist, masked):
    params = _params(SHAPES, dtype)
    masks = _masks(SHAPES) if masked else None
    keys = [11, 0xFFFFFFFF, 7, 2**31]
    got, want = [p.clone() for p in params], [p.clone() for p in params]
    for seed, step, sample, scale in ((0, 0, 0, 1e-3), (9, 41, 3, -2e-2)):
        kw = dict(seed=seed, step=step, sample=sample, scale=scale, dist=dist, masks=masks)
        native_ops.perturb_(got, keys, **kw)
        reference.perturb_(want, keys, **kw)
    for g, w, p, m in zip(got, want, params, masks or [None] * len(params), strict=True):
        _check(g, w, dist, dtype)
        if m is not None:  # masked elements stay exactly as they were
            assert torch.equal(g[~m], p[~m])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_restore_update_matches_reference(dtype, dist, masked):
    params = _params(SHAPES, dtype, seed=2)
    masks = _masks(SHAPES) if masked else None
    keys = [3, 1, 4, 1592]
    cases = [dict(seed=1, step=0, eps=1e-3, lr=1e-2, grads=[0.7]),
             dict(seed=2, step=5, eps=1e-2, lr=3e-2, grads=[0.5, -1.25, 2.0], weight_decay=0.1),
             dict(seed=2, step=6, eps=0.0, lr=1e-1, grads=[-0.3, 0.9, 0.1], restore_sample=0)]
    for kw in cases:
        got, want = [p.clone() for p in params], [p.clone() for p in params]
        native_ops.restore_update_(got, keys, dist=dist, masks=masks, **kw)
        reference.restore_update_(want, keys, dist=dist, masks=masks, **kw)
        for g, w in zip(got, want, strict=True):
            _check(g, w, dist, dtype)


def test_float64_is_delegated_to_reference():
    p = torch.randn(100, dtype=torch.float64)
    got, want = p.clone(), p.clone()
    native_ops.perturb_([got], [1], seed=0, step=0, scale=0.1, dist="uniform")
    reference.perturb_([want], [1], seed=0, step=0, scale=0.1, dist="uniform")
    assert torch.equal(got, want)


@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_independent_of_thread_count(dist):
    shapes = [(300_001,), (5,), (70_000,)]  # several 32,768-element work units
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ps = _params(shapes, torch.float32)
            native_ops.perturb_(ps, [1, 2, 3], seed=4, step=2, scale=0.5, dist=dist)
            native_ops.restore_update_(ps, [1, 2, 3], seed=4, step=2, eps=0.25, lr=0.1,
                                       grads=[1.0, -2.0], weight_decay=0.01, dist=dist)
            results.append(ps)
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_validation_errors_match_reference():
    p = [torch.zeros(4)]
    for ops in (native_ops, reference):
        with pytest.raises(ValueError, match="keys has 2 entries"):
            ops.perturb_(p, [1, 2], seed=0, step=0, scale=1.0)
        with pytest.raises(ValueError, match="masks has"):
            ops.perturb_(p, [1], seed=0, step=0, scale=1.0, masks=[None, None])
        with pytest.raises(ValueError, match="not contiguous"):
            ops.perturb_([torch.zeros(4, 4).t()], [1], seed=0, step=0, scale=1.0)
        with pytest.raises(ValueError, match="grads is empty"):
            ops.restore_update_(p, [1], seed=0, step=0, eps=1.0, lr=1.0, grads=[])
        with pytest.raises(ValueError, match="restore_sample=2"):
            ops.restore_update_(p, [1], seed=0, step=0, eps=1.0, lr=1.0, grads=[1.0],
                                restore_sample=2)
        with pytest.raises(ValueError, match="dist='gauss'"):
            ops.perturb_(p, [1], seed=0, step=0, scale=1.0, dist="gauss")
        with pytest.raises(ValueError, match="seed=-1"):
            ops.perturb_(p, [1], seed=-1, step=0, scale=1.0)


# ---------------------------------------------------------------- build and dispatch
def test_auto_falls_back_without_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("ZOENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ZOENGINE_BACKEND", raising=False)
    t = [torch.zeros(3)]
    with pytest.warns(native_ops.NativeBuildWarning, match="'reference' backend.*no-such-cc"):
        reason = native_ops.unavailable_reason(t)
    assert reason is not None and "no-such-cc" in reason and "not found" in reason
    assert dispatch.resolve_backend(None, t) == "reference"
    with pytest.raises(RuntimeError, match="native.*cannot run.*no-such-cc"):
        dispatch.resolve_backend("native", t)
    with pytest.raises(native_ops.NativeBuildError, match="no-such-cc"):
        native_ops.perturb_(t, [1], seed=0, step=0, scale=1.0)


def test_build_is_cached(monkeypatch, tmp_path):
    """A fresh cache dir gets one library file; a second load reuses it without compiling."""
    monkeypatch.setenv("ZOENGINE_CACHE_DIR", str(tmp_path))
    assert native_ops.unavailable_reason([torch.zeros(1)]) is None
    files = sorted(tmp_path.glob("zo_native_*.so"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp*"))
    native_ops._loaded.pop(native_ops._state_key())
    monkeypatch.setattr(native_ops, "_compile", lambda *a: pytest.fail("rebuilt a cached lib"))
    assert native_ops.unavailable_reason([torch.zeros(1)]) is None


def test_auto_picks_native_on_cpu(monkeypatch):
    monkeypatch.delenv("ZOENGINE_BACKEND", raising=False)
    assert dispatch.resolve_backend(None, [torch.zeros(2)]) == "native"


# ---------------------------------------------------------------- end to end
def _tiny_run(backend, dist, steps=8):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(32, 6)
    y = torch.sin(x.sum(1, keepdim=True))
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=3, n_samples=2,
                        dist=dist, backend=backend)
    losses = [float(opt.step(lambda: torch.nn.functional.mse_loss(model(x), y)))
              for _ in range(steps)]
    return copy.deepcopy(model.state_dict()), losses


@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_mezo_native_matches_reference(dist):
    sn, ln = _tiny_run("native", dist)
    sr, lr = _tiny_run("reference", dist)
    for k in sr:
        if dist == "uniform":  # same z bit for bit and the same rounding: the same run
            assert torch.equal(sn[k], sr[k]), k
        else:
            torch.testing.assert_close(sn[k], sr[k], rtol=1e-5, atol=1e-6)
    assert ln == pytest.approx(lr, rel=1e-5)


def test_same_signatures_as_reference_and_offsets_refused():
    import inspect

    from zoengine.kernels import native_ops
    from zoengine.kernels import reference as ref

    for name in ("perturb_", "restore_update_"):
        assert inspect.signature(getattr(native_ops, name)) == inspect.signature(getattr(ref, name))
    p = torch.zeros(8)
    with pytest.raises(ValueError, match="no shard offsets"):
        native_ops.perturb_([p], [1], seed=0, step=0, scale=1.0, offsets=[4])
    native_ops.perturb_([p], [1], seed=0, step=0, scale=1.0, offsets=[0])  # whole tensor: fine
