"""Fused noisy linear (zoengine/kernels/triton_noisy_linear.py) against the noise contract, on CPU under
TRITON_INTERPRET=1, and (gpu-marked, in a fresh process) compiled on CUDA.

The interpreted kernel module is imported inside a module fixture after the variable is set,
on top of test_triton_ops' ``tops`` fixture (the interpreted triton_ops), and both are put
back afterwards.

Tolerances (y = x @ W'ᵀ + b', W' = W + scale·z·m):
  * expected value: float64 x @ W'ᵀ + b' with W', b' in fp32 from ``reference.perturb_`` on
    fp32 copies (what the kernel holds in registers);
  * |y - expected| <= REL·(|x| @ |W'|ᵀ + |b'|) + |scale|·Z_ATOL·(Σ|x| + 1) [+ one ulp of y's
    dtype for fp16/bf16 outputs]: REL = 1e-5 covers fp32 accumulation (K <= 200 here), the
    second term the few-ulp log/cos/sin differences of normal z (test_triton_ops' Z_ATOL);
  * against the materialised oracle ``noisy_linear_reference`` (W' rounded to the weight
    dtype before the matmul) add |x| @ ulp(W'_dtype)ᵀ: one ulp of the rounded weight per
    product.
"""

import importlib
import sys

import pytest
import torch
from helpers import ulp
from test_triton_ops import DISTS, Z_ATOL, _run_compiled, tops  # noqa: F401

from zoengine.kernels import reference as R
from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import noise_blocks

pytestmark = pytest.mark.interpreter

MOD = "zoengine.kernels.triton_noisy_linear"
REL = 1e-5
WKEY, BKEY = 0x9E3779B9, 0x12345678
KW = dict(seed=11, step=3, sample=2, key=WKEY, bias_key=BKEY)
SHAPES = [(5, 24, 12), (37, 70, 19)]  # (M, K, N): K % 4 == 0 (block path) and K = 70 (per element)


@pytest.fixture(scope="module")
def NL(tops):  # noqa: F811
    """zoengine/kernels/triton_noisy_linear.py imported under the interpreter (after triton_ops)."""
    saved = sys.modules.pop(MOD, None)
    try:
        mod = importlib.import_module(MOD)
        assert mod.is_interpreted()
        yield mod
    finally:
        sys.modules.pop(MOD, None)
        if saved is not None:
            sys.modules[MOD] = saved


def _case(M, K, N, wdtype, xdtype=torch.float32, masked=False, biased=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = {"x": torch.randn(M, K, generator=g).to(xdtype),
         "weight": (torch.randn(N, K, generator=g) * 0.5).to(wdtype),
         "bias": (torch.randn(N, generator=g) * 0.1).to(wdtype) if biased else None,
         "mask": torch.rand(N, K, generator=g) > 0.4 if masked else None,
         "bias_mask": (torch.rand(N, generator=g) > 0.5).float() if masked and biased else None}
    if masked:
        c["weight"] = c["weight"] * c["mask"].to(wdtype)  # pruned weights are exactly zero
    return c


def _fp32_perturbed(c, scale, dist):
    """W', b' in fp32 as the kernel holds them (reference.perturb_ on fp32 copies)."""
    w = c["weight"].float().clone()
    R.perturb_([w], [WKEY], seed=KW["seed"], step=KW["step"], sample=KW["sample"], scale=scale,
               dist=dist, masks=[c["mask"]])
    b = None
    if c["bias"] is not None:
        b = c["bias"].float().clone()
        R.perturb_([b], [BKEY], seed=KW["seed"], step=KW["step"], sample=KW["sample"],
                   scale=scale, dist=dist, masks=[c["bias_mask"]])
    return w, b


def _expected_and_tol(c, scale, dist, rel=REL):
    w, b = _fp32_perturbed(c, scale, dist)
    x = c["x"].double()
    want = x @ w.double().T
    mag = x.abs() @ w.double().abs().T
    if b is not None:
        want, mag = want + b.double(), mag + b.double().abs()
    tol = rel * mag + abs(scale) * Z_ATOL * (x.abs().sum(-1, keepdim=True) + 1)
    if c["x"].dtype != torch.float32:  # one rounding of the output to x's dtype
        tol = tol + ulp(want.to(c["x"].dtype)).double()
    return want, tol


def _run(mod, c, scale, dist, **extra):
    return mod.noisy_linear(c["x"], c["weight"], c["bias"], scale=scale, dist=dist,
                            mask=c["mask"], bias_mask=c["bias_mask"], **KW, **extra)


def _assert_within(got, want, tol, what):
    err = (got.double() - want).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} beyond tolerance, "
                           f"max err {err.max().item():.3g}, max tol {tol.max().item():.3g}")


# ---------------------------------------------------------------- z itself
@pytest.mark.parametrize("K", [24, 22], ids=["K%4=0", "K%4=2"])
@pytest.mark.parametrize("dist", DISTS)
def test_each_weight_element_gets_its_contract_z(NL, dist, K):
    """x = I, W = 0, scale = 1: y[k, n] = z[n·K + k] exactly (products with 1 and 0 are exact),
    for both noise paths (whole Philox blocks when K % 4 == 0, per element otherwise)."""
    N = 9
    y = NL.noisy_linear(torch.eye(K), torch.zeros(N, K, dtype=torch.bfloat16), key=WKEY,
                        seed=1, step=2, sample=3, scale=1.0, dist=dist)
    z = noise_blocks(0, (N * K + 3) // 4, key64=stream_key(1, 2, 3), tensor_key=WKEY,
                     dist=dist)[: N * K]
    got = y.T.reshape(-1)
    if dist == "normal":
        assert (got - z).abs().max() <= Z_ATOL
        assert (got == z).float().mean() > 0.5
    else:
        assert torch.equal(got, z)


# ---------------------------------------------------------------- against the contract
def _cases():
    for M, K, N in SHAPES:
        for wdtype in (torch.float32, torch.bfloat16):
            for dist in DISTS:
                for masked, biased in ((False, False), (True, True)):
                    tag = "mask+bias" if masked else "plain"
                    yield pytest.param((M, K, N), wdtype, dist, masked, biased,
                                       id=f"{M}x{K}x{N}-{str(wdtype)[6:]}-{dist}-{tag}")


@pytest.mark.parametrize("shape,wdtype,dist,masked,biased", list(_cases()))
def test_matches_contract(NL, shape, wdtype, dist, masked, biased):
    c = _case(*shape, wdtype, masked=masked, biased=biased)
    scale = -3e-2
    y = _run(NL, c, scale, dist)
    assert y.shape == (shape[0], shape[2]) and y.dtype == torch.float32
    want, tol = _expected_and_tol(c, scale, dist)
    _assert_within(y, want, tol, "noisy_linear vs contract")


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_activations_and_weights(NL, dtype, dist):
    """x and W in fp16/bf16: compute in fp32, one round-to-nearest-even store in x's dtype."""
    c = _case(20, 36, 17, dtype, xdtype=dtype, masked=True, biased=True, seed=4)
    y = _run(NL, c, 5e-2, dist)
    assert y.dtype == dtype
    want, tol = _expected_and_tol(c, 5e-2, dist)
    _assert_within(y, want, tol, f"{dtype} in, {dtype} out")


@pytest.mark.parametrize("dist", DISTS)
def test_bf16_weights_match_materialised_oracle_within_one_ulp(NL, dist):
    """The oracle rounds W' to bf16 before the matmul; the fused kernel keeps it in fp32."""
    c = _case(9, 44, 21, torch.bfloat16, masked=True, biased=True, seed=5)
    got = _run(NL, c, 2e-2, dist)
    ref = NL.noisy_linear_reference(c["x"], c["weight"], c["bias"], scale=2e-2, dist=dist,
                                    mask=c["mask"], bias_mask=c["bias_mask"], **KW)
    wr = c["weight"].clone()
    R.perturb_([wr], [WKEY], seed=11, step=3, sample=2, scale=2e-2, dist=dist,
               masks=[c["mask"]])
    want, tol = _expected_and_tol(c, 2e-2, dist)
    tol = tol + c["x"].double().abs() @ ulp(wr).double().T + ulp(c["bias"]).double().max()
    _assert_within(got, ref.double(), tol, "fused vs materialised")


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_zero_is_plain_linear(NL, wdtype):
    c = _case(13, 40, 11, wdtype, xdtype=wdtype, biased=True, seed=6)
    y = _run(NL, c, 0.0, "normal")
    plain = torch.nn.functional.linear(c["x"].double(), c["weight"].double(),
                                       c["bias"].double())
    tol = REL * (c["x"].double().abs() @ c["weight"].double().abs().T + 1)
    if wdtype != torch.float32:
        tol = tol + ulp(plain.to(wdtype)).double()
    _assert_within(y, plain, tol, "scale=0 vs F.linear")


def test_leading_dims_and_tf32_option(NL):
    """x (..., K) is flattened; dot_precision='tf32' runs (the interpreter ignores it)."""
    c = _case(6, 28, 10, torch.float32, biased=True, seed=7)
    flat = _run(NL, c, 1e-2, "uniform")
    x3 = c["x"].reshape(2, 3, 28)
    y3 = NL.noisy_linear(x3, c["weight"], c["bias"], scale=1e-2, dist="uniform", **KW)
    assert y3.shape == (2, 3, 10)
    assert torch.equal(y3.reshape(6, 10), flat)
    tf = _run(NL, c, 1e-2, "uniform", dot_precision="tf32")
    assert torch.equal(tf, flat)


def test_empty_and_errors(NL):
    w = torch.randn(4, 8)
    y = NL.noisy_linear(torch.zeros(0, 8), w, key=1, seed=0, step=0, scale=1.0)
    assert y.shape == (0, 4)
    kw = dict(key=1, seed=0, step=0, scale=1.0)
    with pytest.raises(ValueError, match="last dimension"):
        NL.noisy_linear(torch.zeros(3, 7), w, **kw)
    with pytest.raises(ValueError, match="not contiguous"):
        NL.noisy_linear(torch.zeros(3, 4), w.T, **kw)
    with pytest.raises(ValueError, match="float64"):
        NL.noisy_linear(torch.zeros(3, 8), w.double(), **kw)
    with pytest.raises(ValueError, match="bias_key"):
        NL.noisy_linear(torch.zeros(3, 8), w, torch.zeros(4), **kw)
    with pytest.raises(ValueError, match="dist="):
        NL.noisy_linear(torch.zeros(3, 8), w, dist="cauchy", **kw)
    with pytest.raises(ValueError, match="dot_precision"):
        NL.noisy_linear(torch.zeros(3, 8), w, dot_precision="tf32x3", **kw)
    with pytest.raises(ValueError, match="masks\\[0\\] has 3 elements"):
        NL.noisy_linear(torch.zeros(3, 8), w, mask=torch.ones(3, dtype=torch.bool), **kw)


# ---------------------------------------------------------------- compiled (subprocess)
_COMPILE_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zoengine.kernels import triton_noisy_linear as NL

assert not NL.is_interpreted(), "TRITON_INTERPRET leaked into the compile process"
sig = {"x_ptr": "*i16", "w_ptr": "*i16", "wm_ptr": "*u8", "b_ptr": "*fp32", "bm_ptr": "*u8",
       "out_ptr": "*i16", "M": "i32", "N": "i32", "K": "i32", "k_lo": "i64", "k_hi": "i64",
       "wkey": "i64", "bkey": "i64", "scale": "fp32"}
for name, prec, k4 in (("ieee_k4", "ieee", True), ("tf32_elem", "tf32", False)):
    ce = dict(X_DT=2, W_DT=2, DIST=0, K4=k4, HAS_WMASK=True, HAS_BIAS=True, HAS_BMASK=True,
              PRECISION=prec, **NL._GPU_TILES)
    sig.update({k: "constexpr" for k in ce})
    opts = dict(NL._GPU_OPTIONS)
    k = triton.compile(ASTSource(NL._noisy_linear_kernel, sig, constexprs=ce),
                       target=GPUTarget("cuda", 90, 32), options=opts)
    with open(f"{name}.ptx", "w") as f:
        f.write(k.asm["ptx"])
print("compiled")
"""


def test_kernel_compiles_for_sm90(tmp_path):
    """Both noise paths lower to PTX for an H100 (sm_90) on this CPU machine; tf32 uses
    tensor cores (wgmma), ieee does not."""
    pytest.importorskip("triton")
    _run_compiled(_COMPILE_SM90, tmp_path)
    ieee = (tmp_path / "ieee_k4.ptx").read_text()
    tf32 = (tmp_path / "tf32_elem.ptx").read_text()
    assert ".target sm_90" in ieee and ".target sm_90" in tf32
    assert "wgmma" in tf32 and "mma" not in ieee


# ---------------------------------------------------------------- real GPU
_GPU_RUN = r"""
import sys

import torch

from zoengine.kernels import triton_noisy_linear as NL

assert not NL.is_interpreted()
# cuBLAS may otherwise reduce fp16/bf16 partial sums in 16 bits (the oracle's F.linear)
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
cases = torch.load(sys.argv[1])
out = []
for c in cases:
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c["t"].items()}
    args = (dev["x"], dev["weight"], dev["bias"])
    kw = dict(c["kw"], mask=dev["mask"], bias_mask=dev["bias_mask"])
    out.append({"fused": NL.noisy_linear(*args, **kw).cpu(),
                "tf32": NL.noisy_linear(*args, dot_precision="tf32", **kw).cpu(),
                "reference": NL.noisy_linear_reference(*args, **kw).cpu()})
torch.save(out, sys.argv[2])
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (real launch)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_noisy_linear_matches_reference(dtype, tmp_path):
    """Compiled kernel on CUDA (fresh process, as every compile: test_triton_ops._run_compiled)
    against the contract and the materialised oracle, every dist, masks, both noise paths."""
    cases = []
    for (M, K, N) in ((300, 200, 130), (70, 197, 33)):
        for dist in DISTS:
            t = _case(M, K, N, dtype, xdtype=dtype, masked=True, biased=True, seed=M)
            cases.append({"t": t, "kw": dict(KW, scale=-2e-2, dist=dist)})
    torch.save(cases, tmp_path / "cases.pt")
    _run_compiled(_GPU_RUN, tmp_path, tmp_path / "cases.pt", tmp_path / "out.pt")
    for c, got in zip(cases, torch.load(tmp_path / "out.pt"), strict=True):
        dist = c["kw"]["dist"]
        want, tol = _expected_and_tol(c["t"], -2e-2, dist)
        _assert_within(got["fused"], want, tol, f"{dtype} {dist} ieee")
        _, tol32 = _expected_and_tol(c["t"], -2e-2, dist, rel=2.0**-10 + REL)
        _assert_within(got["tf32"], want, tol32, f"{dtype} {dist} tf32")
        w = c["t"]["weight"].clone()  # the oracle's W', rounded to the weight dtype
        R.perturb_([w], [WKEY], seed=11, step=3, sample=2, scale=-2e-2, dist=dist,
                   masks=[c["t"]["mask"]])
        ref_tol = (tol + c["t"]["x"].double().abs() @ ulp(w).double().T
                   + ulp(c["t"]["bias"]).double().max() + ulp(got["reference"]).double())
        _assert_within(got["fused"], got["reference"].double(), ref_tol,
                       f"{dtype} {dist} vs materialised")
