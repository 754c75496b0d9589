"""Arithmetic precision and the returned loss: float64 weights are perturbed and updated in
float64 (max(fp32, dtype)); step() returns the mean of the 2n evaluations in the closure's dtype
and device."""

import math

import pytest
import torch
from helpers import tiny_mlp

import zoengine
from zoengine import noise
from zoengine.kernels.dispatch import resolve_backend
from zoengine.kernels.keys import tensor_keys
from zoengine.kernels.reuse import RotateSource


def _native_ok():
    try:
        resolve_backend("native", [torch.zeros(1)])
        return True
    except (RuntimeError, ValueError):
        return False


FP64_CONFIGS = {
    "mezo-reference": lambda ps, **kw: zoengine.MeZO(ps, backend="reference", **kw),
    "mezo-auto": lambda ps, **kw: zoengine.MeZO(ps, **kw),  # native delegates fp64
    "mezo-native": lambda ps, **kw: zoengine.MeZO(ps, backend="native", **kw),
    "pezo-pool": lambda ps, **kw: zoengine.PeZO(ps, pool_size=4099, **kw),
    "pezo-rotate": lambda ps, **kw: zoengine.PeZO(ps, reuse="rotate", lanes=7, **kw),
}


def _fp64_param(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter((torch.randn(n, generator=g) * 0.02).double())
    p.data[:10] = 0.0
    return p


@pytest.mark.parametrize("name", sorted(FP64_CONFIGS))
def test_fp64_lr_zero_drift_is_fp64_rounding(name):
    if name == "mezo-native" and not _native_ok():
        pytest.skip("native backend unavailable")
    p = _fp64_param()
    start = p.detach().clone()
    opt = FP64_CONFIGS[name]([p], lr=0.0, eps=1e-3, n_samples=2)
    for _ in range(100):
        opt.step(lambda: (p * p).sum())
    # fp32 arithmetic drifted by ~4e-7 here; fp64 rounding over 100 steps is ~1e-16 each
    assert float((p.detach() - start).abs().max()) <= 1e-12


def _z(name, opt, p):
    """z of step 0, sample 0, in float64, as the kernels regenerate it."""
    if name.startswith("mezo"):
        key = tensor_keys(["#0"])[0]
        return noise.generate(p.numel(), seed=0, step=0, key=key).double()
    if name == "pezo-pool":
        zo = opt.state["zo"]
        q = zo["pool"]
        return (q[torch.arange(p.numel()) % q.numel()] * zo["pool_scale"]).double()
    return RotateSource(7, "adaptive").values(0, p.numel(), seed=0, step=0, sample=0,
                                              device="cpu").double()


@pytest.mark.parametrize("name", sorted(FP64_CONFIGS))
def test_fp64_update_of_1e9_is_applied(name):
    if name == "mezo-native" and not _native_ok():
        pytest.skip("native backend unavailable")
    g = torch.Generator().manual_seed(3)
    n, eps, lr = 1000, 1e-3, 1e-10
    a = torch.randn(n, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(1.0 + torch.rand(n, generator=g, dtype=torch.float64))
    before = p.detach().clone()
    opt = FP64_CONFIGS[name]([p], lr=lr, eps=eps)
    opt.step(lambda: a @ p)
    z = _z(name, opt, p)
    g64 = float(a @ z)  # the exact directional derivative of a linear loss
    gk = opt.state["zo"]["projected_grads"][0]
    assert gk == pytest.approx(g64, rel=1e-9)
    expected = before - lr * gk * z
    step = (before - expected).abs()
    assert 1e-10 < float(step.median()) < 1e-8  # ~1e-9: far below fp32's ulp at 1-2 (1.2e-7)
    # within a few fp64 ulps (perturb/restore rounding): fp32 arithmetic would lose it all
    assert float((p.detach() - expected).abs().max()) <= 4e-15


# ---------------------------------------------------------------- the returned loss
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_loss_is_the_mean_of_the_evaluations_in_the_closure_dtype(dtype):
    model = tiny_mlp()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    seen = []

    def closure():
        out = model(x).double().pow(2).mean()
        seen.append(float(out))
        return out.to(dtype)

    opt = zoengine.MeZO(model.parameters(), lr=1e-3, eps=1e-2, n_samples=3)
    loss = opt.step(closure)
    assert loss.dtype == dtype and loss.device == x.device and loss.dim() == 0
    exact = sum(float(torch.tensor(v, dtype=torch.float64).to(dtype)) for v in seen) / len(seen)
    assert len(seen) == 6
    assert float(loss) == float(torch.tensor(exact, dtype=torch.float64).to(dtype))


def test_python_float_closure_gives_float64():
    p = torch.nn.Parameter(torch.ones(3))
    opt = zoengine.MeZO([p], lr=1e-3)
    loss = opt.step(lambda: float(p.sum()))
    assert loss.dtype == torch.float64 and loss.device.type == "cpu"


def test_skipped_step_returns_nan_of_the_closure_dtype():
    p = torch.nn.Parameter(torch.ones(3))
    opt = zoengine.MeZO([p], lr=1e-3, nonfinite="skip")
    values = iter([1.0, float("nan")])
    loss = opt.step(lambda: torch.tensor(next(values), dtype=torch.bfloat16))
    assert loss.dtype == torch.bfloat16 and math.isnan(float(loss))
    assert opt.state["zo"]["skipped_steps"] == 1
