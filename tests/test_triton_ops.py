"""Triton kernels (zoengine/kernels/triton_ops.py) against the reference, under TRITON_INTERPRET=1 on CPU.

The interpreter must be switched on before a ``@triton.jit`` runs, so the kernel module is
imported inside the module-scoped fixture ``tops`` after setting the variable, and the
environment and ``sys.modules`` are put back afterwards: other test modules never see it.

Tolerances (declared once, used everywhere):
  * uniform, rademacher, and the Philox words: bit-exact, every dtype;
  * normal: z uses log/cos/sin, whose last ulp differs between numpy (the interpreter) and
    torch (measured: 32 % of z differ, by <= 4 fp32 ulp, |dz| <= 7.2e-7). An op's result may
    then differ by |scale|*Z_ATOL plus one rounding step of the stored dtype (one ulp).
"""

import importlib
import inspect
import os
import subprocess
import sys

import pytest
import torch
from helpers import mse_closure, regression_batch, tiny_mlp, ulp

import zoengine
from zoengine.kernels import reference as R
from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import philox4x32

pytestmark = pytest.mark.interpreter

MOD = "zoengine.kernels.triton_ops"
Z_ATOL = 2e-6  # |z_triton - z_reference| bound for normal noise (measured max 7.2e-7)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DISTS = ["normal", "uniform", "rademacher"]
SHAPES = [(1,), (7,), (4097,), (6, 42, 123)]
KEYS = [0x0, 0x12345678, 0xFFFFFFFF, 0x9E3779B9]


@pytest.fixture(scope="module")
def tops():
    """zoengine/kernels/triton_ops.py imported under the interpreter (and tests/triton_probes.py)."""
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved = {m: sys.modules.pop(m) for m in (MOD, "triton_probes") if m in sys.modules}
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = importlib.import_module(MOD)
        probes = importlib.import_module("triton_probes")
        assert mod.is_interpreted()
        yield mod, probes
    finally:
        for m in (MOD, "triton_probes"):
            sys.modules.pop(m, None)
        sys.modules.update(saved)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


@pytest.fixture
def T(tops):
    return tops[0]


@pytest.fixture
def P(tops):
    return tops[1]


def _params(dtype, seed=0, masked=False):
    g = torch.Generator().manual_seed(seed)
    ps = [(torch.randn(s, generator=g) * 0.5).to(dtype) for s in SHAPES]
    masks = None
    if masked:  # mixed kinds: none, bool, float 0/1, bool
        masks = [None, torch.rand(SHAPES[1], generator=g) > 0.5,
                 (torch.rand(SHAPES[2], generator=g) > 0.3).float(),
                 torch.rand(SHAPES[3], generator=g) > 0.5]
        for p, m in zip(ps, masks, strict=True):
            if m is not None:
                p.mul_(m.to(dtype))  # pruned weights are exactly zero
    return ps, masks


def _assert_close(got, want, dist, scale):
    for a, b in zip(got, want, strict=True):
        if dist != "normal":
            assert torch.equal(a, b), f"{a.dtype} {tuple(a.shape)} {dist}: not bit-exact"
            continue
        a32, b32 = a.float(), b.float()
        tol = ulp(b).float() + abs(scale) * Z_ATOL  # one rounding step + the z difference
        bad = (a32 - b32).abs() > tol
        assert not bad.any(), f"{a.dtype} {tuple(a.shape)}: {int(bad.sum())} beyond tolerance"


def _assert_masked_zero(ps, masks):
    for p, m in zip(ps, masks if masks is not None else [None] * len(ps), strict=True):
        if m is not None:
            assert torch.all(p.reshape(-1)[~m.reshape(-1).bool()] == 0)


# ---------------------------------------------------------------- Philox and conversions
def test_philox_matches_tl_randint4x(P):
    g = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, 2**62, (64,), generator=g, dtype=torch.int64)
    for seed in (0, 0xFFFFFFFF, 0x0000000FCAFEB0BA, 2**63 + 12345):
        got = P.randint4x(offsets, seed)
        want = philox4x32(offsets & 0xFFFFFFFF, offsets >> 32, 0, 0,
                          seed & 0xFFFFFFFF, seed >> 32)
        assert torch.equal(got, torch.stack(want, dim=1)), hex(seed)


@pytest.mark.parametrize("stream", [0, 1])
def test_philox_stream_matches_oracle(P, stream):
    g = torch.Generator().manual_seed(2 + stream)
    blocks = torch.cat([torch.tensor([0, 1, 2**32 - 1, 2**32, 2**62 - 1]),
                        torch.randint(0, 2**62, (59,), generator=g, dtype=torch.int64)])
    for key64, tkey in ((0, 0), (stream_key(7, 3, 1), 0xFFFFFFFF), (2**64 - 1, 0x12345678)):
        got = P.philox_words(blocks, key64, tkey, stream)
        want = philox4x32(blocks & 0xFFFFFFFF, blocks >> 32, tkey, stream,
                          key64 & 0xFFFFFFFF, key64 >> 32)
        assert torch.equal(got, torch.stack(want, dim=1))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_round_to_nearest_even_store(P, dtype):
    """The kernels' 16-bit store rounds like torch (RNE), not like the interpreter's bf16 cast."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2000, generator=g) * torch.logspace(-30, 30, 2000)
    info = torch.finfo(dtype)
    ties = []
    for first in (0x0000, 0x3C00):  # subnormals, and normals near 1 (fp16) or 2**-7 (bf16)
        lo = torch.arange(first, first + 64, dtype=torch.int16).view(dtype).float()
        mid = (lo[:-1] + lo[1:]) / 2  # exact midpoints: ties go to even
        ties += [mid, -mid]
    ties = torch.cat(ties)
    special = torch.tensor([0.0, -0.0, info.max, -info.max, info.max * 1.001, info.tiny,
                            info.tiny / 3, float("inf"), float("-inf")])
    x = torch.cat([x, ties, special]).contiguous()
    got = P.f32_to_bits16(x, dtype)
    want = x.to(dtype)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    nan = P.f32_to_bits16(torch.tensor([float("nan")]), dtype)
    assert torch.isnan(nan.float()).all()


def test_normal_noise_within_declared_tolerance(T):
    """z itself (θ = 0, scale = 1): exact for most elements, within Z_ATOL for all."""
    p, q = torch.zeros(4097), torch.zeros(4097)
    T.perturb_([p], [5], seed=1, step=2, sample=3, scale=1.0)
    R.perturb_([q], [5], seed=1, step=2, sample=3, scale=1.0)
    assert (p - q).abs().max() <= Z_ATOL
    assert (p == q).float().mean() > 0.5


# ---------------------------------------------------------------- ops against the reference
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_matches_reference(T, dtype, dist, masked):
    ps, masks = _params(dtype, masked=masked)
    qs = [p.clone() for p in ps]
    kw = dict(seed=11, step=3, sample=2, scale=-2e-2, dist=dist, masks=masks)
    T.perturb_(ps, KEYS, **kw)
    R.perturb_(qs, KEYS, **kw)
    _assert_close(ps, qs, dist, kw["scale"])
    _assert_masked_zero(ps, masks)


def _restore_cases():
    for dtype in DTYPES:
        for dist in DISTS:
            for masked in (False, True):
                for sr in ((False, True) if dtype != torch.float32 else (False,)):
                    yield pytest.param(dtype, dist, masked, sr,
                                       id=f"{dtype}-{dist}-{'mask' if masked else 'nomask'}"
                                          f"{'-sr' if sr else ''}")


@pytest.mark.parametrize("dtype,dist,masked,sr", list(_restore_cases()))
def test_restore_update_matches_reference(T, dtype, dist, masked, sr):
    ps, masks = _params(dtype, seed=1, masked=masked)
    qs = [p.clone() for p in ps]
    kw = dict(seed=5, step=8, eps=1e-3, lr=1e-2, grads=[0.75, -2.0, 3.5], restore_sample=1,
              weight_decay=0.1, dist=dist, masks=masks, stochastic_rounding=sr)
    T.restore_update_(ps, KEYS, **kw)
    R.restore_update_(qs, KEYS, **kw)
    _assert_close(ps, qs, dist, kw["eps"] + kw["lr"] * 6.25)
    _assert_masked_zero(ps, masks)


def test_restore_update_single_sample_default_restore(T):
    ps, _ = _params(torch.float32, seed=2)
    qs = [p.clone() for p in ps]
    kw = dict(seed=0, step=0, eps=1e-3, lr=1e-3, grads=[-4.0], dist="uniform")
    T.restore_update_(ps, KEYS, **kw)
    R.restore_update_(qs, KEYS, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ps, qs, strict=True))


def test_perturb_then_restore_round_trip(T):
    """+eps, -2eps, restore(+eps) with lr = 0: the same drift as the reference, bit for bit."""
    ps, _ = _params(torch.bfloat16, seed=4)
    qs = [p.clone() for p in ps]
    for ops, xs in ((T, ps), (R, qs)):
        ops.perturb_(xs, KEYS, seed=1, step=1, scale=1e-3, dist="rademacher")
        ops.perturb_(xs, KEYS, seed=1, step=1, scale=-2e-3, dist="rademacher")
        ops.restore_update_(xs, KEYS, seed=1, step=1, eps=1e-3, lr=0.0, grads=[1.0],
                            dist="rademacher")
    assert all(torch.equal(a, b) for a, b in zip(ps, qs, strict=True))


# ---------------------------------------------------------------- stochastic rounding
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stochastic_rounding_is_unbiased_and_matches_reference(T, dtype):
    """θ in (1, 2) and v = θ(1 - 2**-k) lies a fixed fraction of an ulp below θ.

    RNE always returns θ (bias about -0.05 ulp); SR returns θ - ulp with probability
    (θ - v)/ulp. 8 tensors x 4096 elements (keys 0..7 give independent rounding bits): the
    standard error of the mean is <= 0.25 ulp / sqrt(32768) = 1.4e-3 ulp; we allow 6e-3 ulp
    (> 4 sigma) and check that RNE's bias (> 3e-2 ulp) would fail the same test.
    """
    mant = 10 if dtype == torch.float16 else 7
    q = 2.0**-mant  # ulp on [1, 2)
    k = mant + 4  # v = θ - θ*2**-k: 1/16 to 1/8 of an ulp below θ
    g = torch.Generator().manual_seed(6)
    ps = [(1 + torch.randint(1, 2**mant, (4096,), generator=g) * q).to(dtype) for _ in range(8)]
    v = torch.stack([p.float() * (1 - 2.0**-k) for p in ps])  # exact in fp32
    qs = [p.clone() for p in ps]
    kw = dict(seed=9, step=4, eps=0.0, lr=2.0**-k, grads=[0.0], weight_decay=1.0,
              dist="rademacher", stochastic_rounding=True)
    T.restore_update_(ps, list(range(8)), **kw)
    R.restore_update_(qs, list(range(8)), **kw)
    assert all(torch.equal(a, b) for a, b in zip(ps, qs, strict=True))
    got = torch.stack([p.float() for p in ps])
    assert torch.all((got == v.to(dtype).float()) | (got == v.to(dtype).float() - q))
    bias_sr = (got - v).mean().item() / q
    bias_rne = (v.to(dtype).float() - v).mean().item() / q
    assert abs(bias_sr) < 6e-3, bias_sr
    assert abs(bias_rne) > 3e-2, bias_rne


def test_stochastic_rounding_is_noop_for_fp32(T):
    ps, _ = _params(torch.float32, seed=3)
    qs = [p.clone() for p in ps]
    kw = dict(seed=5, step=8, eps=1e-3, lr=1e-2, grads=[1.0], dist="uniform")
    T.restore_update_(ps, KEYS, stochastic_rounding=True, **kw)
    R.restore_update_(qs, KEYS, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ps, qs, strict=True))


# ---------------------------------------------------------------- multi-tensor launch
class _CountingKernel:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_one_launch_per_call_for_all_tensors(T, monkeypatch):
    """Mixed dtypes and sizes, 6 tensors: one launch per op call; the table is built once."""
    ps = [torch.randn(s).to(d) for s, d in zip([3, 100, 1, 5000, 17, 64], DTYPES * 2, strict=True)]
    keys = list(range(100, 106))
    pk = _CountingKernel(T._perturb_kernel)
    rk = _CountingKernel(T._restore_update_kernel)
    monkeypatch.setattr(T, "_perturb_kernel", pk)
    monkeypatch.setattr(T, "_restore_update_kernel", rk)
    T.clear_table_cache()
    T.perturb_(ps, keys, seed=0, step=0, scale=1e-3, dist="uniform")
    T.perturb_(ps, keys, seed=0, step=0, scale=-2e-3, dist="uniform")
    T.restore_update_(ps, keys, seed=0, step=0, eps=1e-3, lr=1e-3, grads=[1.0, 2.0],
                      dist="uniform")
    assert (pk.launches, rk.launches) == (2, 1)
    assert len(T._TABLE_CACHE) == 1


def test_grouping_does_not_change_z(T):
    """One call over all tensors == one call per tensor (z depends on the key, not the order)."""
    ps, _ = _params(torch.float32, seed=5)
    qs = [p.clone() for p in ps]
    T.perturb_(ps, KEYS, seed=2, step=1, scale=0.1, dist="uniform")
    for q, k in zip(reversed(qs), reversed(KEYS), strict=True):
        T.perturb_([q], [k], seed=2, step=1, scale=0.1, dist="uniform")
    assert all(torch.equal(a, b) for a, b in zip(ps, qs, strict=True))


def test_writes_bump_autograd_version(T):
    """The kernels write through raw addresses; autograd must still see an in-place change."""
    p = torch.nn.Parameter(torch.zeros(10))
    before = p._version
    with torch.no_grad():
        T.perturb_([p], [1], seed=0, step=0, scale=1.0, dist="rademacher")
        T.restore_update_([p], [1], seed=0, step=0, eps=-1.0, lr=0.0, grads=[1.0],
                          dist="rademacher")
    assert p._version == before + 2
    assert torch.equal(p.detach(), torch.zeros(10))


# ---------------------------------------------------------------- API and errors
def test_same_signatures_as_reference(T):
    for name in ("perturb_", "restore_update_"):
        assert inspect.signature(getattr(T, name)) == inspect.signature(getattr(R, name))


def test_errors_are_clear(T):
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="dist="):
        T.perturb_([p], [0], seed=0, step=0, scale=1.0, dist="cauchy")
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        T.perturb_([p.to(torch.int32)], [0], seed=0, step=0, scale=1.0)
    with pytest.raises(ValueError, match="grads is empty"):
        T.restore_update_([p], [0], seed=0, step=0, eps=1.0, lr=1.0, grads=[])
    with pytest.raises(ValueError, match="masks\\[0\\] has 3 elements"):
        T.perturb_([p], [0], seed=0, step=0, scale=1.0, masks=[torch.ones(3, dtype=torch.bool)])
    T.perturb_([], [], seed=0, step=0, scale=1.0)  # nothing to do is fine


# ---------------------------------------------------------------- MeZO end to end
@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_mezo_triton_matches_reference(tops, dist):
    """3 MeZO steps (2 samples) on a tiny MLP: rademacher bit-exact, normal within 1e-5."""
    x, y = regression_batch()
    finals = {}
    for backend in ("reference", "triton"):
        model = tiny_mlp()
        opt = zoengine.MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, weight_decay=0.01,
                            seed=3, n_samples=2, dist=dist, backend=backend)
        for _ in range(3):
            opt.step(mse_closure(model, x, y))
        finals[backend] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(finals["triton"], finals["reference"], strict=True):
        if dist == "rademacher":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- compiled kernels (subprocess)
# Never compile in this process: conftest sets TRITON_INTERPRET=1 before triton is first
# imported, so triton.language's own @jit helpers are interpreter objects here and
# triton.compile() of a compiled copy of the kernels fails on them ("'block_argument' object
# has no attribute 'get_element_ty'"); a warm Triton cache used to hide that by skipping code
# generation. Each compile runs in a fresh interpreter, TRITON_INTERPRET unset, with an empty
# private TRITON_CACHE_DIR, and writes what the test then checks here.
NO_TOOLCHAIN = 3  # exit status of a child whose triton install cannot build for CUDA


def _run_compiled(code: str, workdir, *args, cache_dir=None, timeout: int = 240):
    """Run ``code`` (argv[1:] = ``args``) in a fresh Python whose Triton kernels are compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir or workdir / "triton-cache")
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode == NO_TOOLCHAIN:
        pytest.skip(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, f"child exited {out.returncode}:\n{out.stderr[-4000:]}"
    return out


_COMPILE_SM90 = r"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zoengine.kernels import triton_ops as T

assert not T.is_interpreted(), "TRITON_INTERPRET leaked into the compile process"
table = {"tab_ptr": "*i64", "prog_ptr": "*i32", "T": "i32"}
kernels = {
    "perturb": (T._perturb_kernel,
                {**table, "k_lo": "i64", "k_hi": "i64", "scale": "fp32", "DIST": "constexpr",
                 "BLOCK": "constexpr"},
                {"DIST": 1, "BLOCK": 1024}),
    "restore_update": (T._restore_update_kernel,
                       {**table, "samp_ptr": "*i64", "n": "i32", "r": "i32", "eps": "fp32",
                        "lr": "fp32", "wd": "fp32", "DIST": "constexpr", "SR": "constexpr",
                        "BLOCK": "constexpr"},
                       {"DIST": 1, "SR": True, "BLOCK": 1024}),
}
for name, (fn, sig, constexprs) in kernels.items():
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"enable_fp_fusion": False, "num_warps": 4})
    except FileNotFoundError as exc:  # a triton build without its bundled ptxas
        print(f"no CUDA toolchain in this triton install: {exc}")
        sys.exit(3)
    with open(f"{name}.ptx", "w") as f:
        f.write(k.asm["ptx"])
print("compiled", *kernels)
"""


def test_kernels_compile_for_sm90_with_separate_roundings(tmp_path):
    """Both kernels lower to PTX for an H100 (sm_90) on this CPU machine; with fp fusion off the
    parameter arithmetic has no fma (mul.rn/add.rn: two roundings, as the reference)."""
    pytest.importorskip("triton")
    _run_compiled(_COMPILE_SM90, tmp_path)
    for name in ("perturb", "restore_update"):
        ptx = (tmp_path / f"{name}.ptx").read_text()
        assert ".target sm_90" in ptx, name
        assert "fma.rn.f32" not in ptx, f"{name}: fused multiply-add (one rounding, not two)"
        assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx, name


# ---------------------------------------------------------------- real GPU
_GPU_LAUNCH = r"""
import sys

import torch

from zoengine.kernels import reference as R
from zoengine.kernels import triton_ops as T

device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
assert T.is_interpreted() == (device == "cpu")
case = torch.load(sys.argv[1])
ps = [p.to(device) for p in case["params"]]
masks = [None if m is None else m.to(device) for m in case["masks"]]
qs = [p.clone() for p in ps]
T.perturb_(ps, case["keys"], masks=masks, **case["perturb"])
R.perturb_(qs, case["keys"], masks=masks, **case["perturb"])
T.restore_update_(ps, case["keys"], masks=masks, **case["restore_update"])
R.restore_update_(qs, case["keys"], masks=masks, **case["restore_update"])
torch.save({"triton": [p.cpu() for p in ps], "reference": [q.cpu() for q in qs]}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def gpu_cache(tmp_path_factory):
    """One empty Triton cache for the real-GPU launches of this module (compiled once each)."""
    return tmp_path_factory.mktemp("triton-cache")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (real launch)")
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_launch_matches_reference(dtype, dist, tmp_path, gpu_cache):
    """Compiled kernels on CUDA against the reference on the same CUDA tensors (in a fresh
    process, like every compile: see _run_compiled)."""
    ps, masks = _params(dtype, masked=True)
    case = {"params": ps, "masks": masks, "keys": KEYS,
            "perturb": dict(seed=1, step=2, scale=1e-2, dist=dist),
            "restore_update": dict(seed=1, step=2, eps=1e-2, lr=1e-2, grads=[1.0, -0.5],
                                   dist=dist, stochastic_rounding=dtype != torch.float32)}
    torch.save(case, tmp_path / "case.pt")
    _run_compiled(_GPU_LAUNCH, tmp_path, tmp_path / "case.pt", tmp_path / "out.pt",
                  cache_dir=gpu_cache)
    out = torch.load(tmp_path / "out.pt")
    _assert_close(out["triton"], out["reference"], dist, 2e-2)
