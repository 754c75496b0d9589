"""KerZOO kernels and bias cancellation; PeZO scaling, reuse law, pointer and budget."""

import copy
import math
import warnings

import pytest
import sympy as sp
import torch

import zoengine
from zoengine.kernels.keys import stream_key
from zoengine.kernels.reuse import RotateSource, lane_uniform, pool_stride
from zoengine.optim.estimators import KERNELS, kernel_weight


# ------------------------------------------------------------------ KerZOO kernel moments
def _sym_kernel(order, a):
    r = sp.Symbol("r")
    x = r / a
    poly = sum(sp.Rational(c.numerator, c.denominator) * x ** (2 * i)
               for i, c in enumerate(KERNELS[order]))
    return r, x * poly / a


@pytest.mark.parametrize("order", [1, 3, 5])
@pytest.mark.parametrize("a", [sp.Integer(1), sp.Rational(1, 2)])
def test_kernel_moments_exact(order, a):
    r, K = _sym_kernel(order, a)
    E = lambda expr: sp.integrate(expr, (r, -a, a)) / (2 * a)
    assert E(K) == 0 and E(r * K) == 1
    if order >= 3:
        assert E(r**3 * K) == 0
    else:
        assert E(r**3 * K) != 0
    if order == 5:
        assert E(r**5 * K) == 0
    for v in (0.1, -0.37, 0.49):
        assert kernel_weight(v * float(a), order, float(a)) == pytest.approx(
            float(K.subs(r, v * a)), rel=1e-12)


def test_literature_order5_constant_fails_the_moment_condition():
    r = sp.Symbol("r")
    K = sp.Rational(195, 64) * r * (99 * r**4 - 126 * r**2 + 35)
    assert sp.integrate(r * K, (r, -1, 1)) / 2 == sp.Rational(13, 7)


# ------------------------------------------------------------------ bias on a cubic
C = torch.tensor([1.0, -2.0, 1.5], dtype=torch.float64)


def _cubic_residuals(opt_factory, steps, eps, lr=1e-4):
    p = torch.nn.Parameter(torch.tensor([0.5, -0.3, 0.2]))
    opt = opt_factory([p], lr=lr, eps=eps)
    res = []
    for _ in range(steps):
        before = p.detach().double().clone()
        opt.step(lambda: (C * p.double() ** 3).sum())
        ghat = (before - p.detach().double()) / lr
        res.append(ghat - 3 * C * before**2)
    return torch.stack(res)


def test_kerzoo_cancels_the_eps2_bias_that_mezo_carries():
    eps, steps = 0.3, 5000
    bias = 3 * eps**2 * C  # MeZO's E[ĝ] − ∇f for Gaussian z (E z⁴ = 3)
    ker = _cubic_residuals(lambda ps, **kw: zoengine.KerZOO(ps, seed=1, **kw), steps, eps)
    se = ker.std(0) / math.sqrt(steps)
    assert torch.all(ker.mean(0).abs() < 4 * se), (ker.mean(0), se)
    assert torch.any(bias.abs() > 5 * se)  # the test could see MeZO's bias if it were there
    mezo = _cubic_residuals(lambda ps, **kw: zoengine.MeZO(ps, seed=1, **kw), 2000, eps)
    se_m = mezo.std(0) / math.sqrt(2000)
    assert torch.all((mezo.mean(0) - bias).abs() < 4 * se_m), (mezo.mean(0), bias, se_m)
    assert torch.all(mezo.mean(0).abs() > 4 * se_m)


def test_kerzoo_without_kernel_is_mezo_bit_for_bit():
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = copy.deepcopy(a)
    x = torch.randn(8, 5)
    oa = zoengine.MeZO(a.named_parameters(), lr=0.05, eps=1e-2, seed=4)
    ob = zoengine.KerZOO(b.named_parameters(), lr=0.05, eps=1e-2, seed=4, kernel_order=None)
    for _ in range(5):
        oa.step(lambda: a(x).pow(2).mean())
        ob.step(lambda: b(x).pow(2).mean())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_kerzoo_clip_bounds_the_projected_gradient():
    p = torch.nn.Parameter(torch.ones(50))
    opt = zoengine.KerZOO([p], lr=1e-3, eps=1e-2, clip=0.5)
    for _ in range(10):
        opt.step(lambda: 100 * p.sum())
        assert abs(opt.state["zo"]["projected_grads"][0]) <= 0.5


# ------------------------------------------------------------------ PeZO
def test_pool_adaptive_scaling_gives_unit_second_moment():
    opt = zoengine.PeZO([torch.nn.Parameter(torch.zeros(7))], pool_size=1000)
    zo = opt.state["zo"]
    z = zo["pool"].double() * zo["pool_scale"]
    assert (z**2).mean().item() == pytest.approx(1.0, abs=1e-9)
    static = zoengine.PeZO([torch.nn.Parameter(torch.zeros(7))], pool_size=1000,
                           scaling="static")
    assert static.state["zo"]["pool_scale"] == pytest.approx(math.sqrt(3))


def test_rotate_lanes_and_adaptive_windows():
    n = 5
    src = RotateSource(lanes=n, scaling="static")
    vals = src.values(0, 40, seed=3, step=2, sample=0, device="cpu")
    key64 = stream_key(3, 2, 0)
    for j in (0, 7, 13, 39):
        c, i = divmod(j, n)
        lane_val = lane_uniform(torch.tensor([c]), (i + c) % n, key64)[0] * math.sqrt(3)
        assert vals[j].item() == pytest.approx(lane_val.item(), rel=1e-6)
    ada = RotateSource(lanes=n, scaling="adaptive", window=64)
    z = ada.values(0, 256, seed=3, step=2, sample=0, device="cpu").double()
    assert (z.view(4, 64) ** 2).mean(1).sub(1).abs().max() < 1e-5
    # a slice equals the same coordinates of a larger request
    assert torch.equal(ada.values(70, 100, seed=3, step=2, sample=0, device="cpu"),
                       ada.values(0, 256, seed=3, step=2, sample=0, device="cpu")[70:100])


def _pool_law(opt, d):
    """Exact mean of (aᵀz)z over a full pointer cycle: C a, C_jk = mean_p s²Q[p+j]Q[p+k]."""
    zo = opt.state["zo"]
    q = zo["pool"].double() * zo["pool_scale"]
    n = q.numel()
    idx = (torch.arange(n).unsqueeze(1) + torch.arange(d).unsqueeze(0)) % n  # (pointer, j)
    z = q[idx]
    return z.T @ z / n


@pytest.mark.parametrize("pool_size", [5, 257])
def test_pool_reuse_follows_the_aliasing_law(pool_size):
    d, lr = 6, 1e-3
    a = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, -1.0], dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(d))
    opt = zoengine.PeZO([p], lr=lr, eps=1e-2, pool_size=pool_size)
    ghats = []
    for _ in range(pool_size):  # gcd(6, N) = 1: the pointer visits every offset once
        before = p.detach().double().clone()
        opt.step(lambda: a @ p.double())
        ghats.append((before - p.detach().double()) / lr)
    C = _pool_law(opt, d)
    torch.testing.assert_close(torch.stack(ghats).mean(0), C @ a, rtol=2e-3, atol=2e-3)
    if pool_size < d:  # coordinates j and j+N are the same number: aliased, biased
        assert C[0, pool_size].item() == pytest.approx(1.0, abs=1e-9)
    else:  # N >= d: no aliasing, C -> I as N grows
        assert (C - torch.eye(d, dtype=torch.float64)).abs().max() < 6 / math.sqrt(pool_size)


def _pool_offsets(opt, steps):
    """The pointer at the start of each of ``steps`` steps (one sample per step)."""
    p = opt.param_groups[0]["params"][0]
    out = []
    for _ in range(steps):
        out.append(opt.state["zo"]["pool_pointer"])
        opt.step(lambda: p.sum())
    return out


@pytest.mark.parametrize("d, n", [(6, 3), (8, 64), (12, 36), (9, 9)])
def test_pool_pointer_visits_every_offset_whatever_d(d, n):
    # gcd(d, N) > 1 used to cycle through N / gcd(N, d) offsets (d ≡ 0 mod N: one, forever)
    opt = zoengine.PeZO([torch.nn.Parameter(torch.zeros(d))], pool_size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seen = _pool_offsets(opt, n)
    assert sorted(seen) == list(range(n))
    stride = pool_stride(d, n)
    assert math.gcd(stride, n) == 1 and d <= stride < d + n
    assert all(math.gcd(s, n) > 1 for s in range(d, stride))  # the smallest such stride
    assert (seen[1] - seen[0]) % n == stride % n


def _independent_ratio(err, a, n_steps):
    """‖mean ĝ − a‖² over its value for independent unit-variance uniform z (E z⁴ = 9/5):
    about 1 for an unbiased estimate, N / (offsets visited) when the pointer cycles early."""
    d = a.numel()
    return float(err @ err) / ((d - 0.2) * float(a @ a) / n_steps)


@pytest.mark.parametrize("d", [8, 3072])
def test_pool_run_is_unbiased_and_every_perturbation_distinct(d):
    """N = 4096: advancing by d would visit 512 (d = 8) or 4 (d = 3072) offsets; the coprime
    stride visits all 4096, and the mean estimate on a linear loss is unbiased."""
    n, lr, eps = 4096, 1e-3, 1e-3
    a = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = zoengine.PeZO([p], lr=lr, eps=eps, pool_size=n, seed=0)
    zo = opt.state["zo"]
    seen, total = set(), torch.zeros(d, dtype=torch.float64)
    step = {}

    def closure():
        if "z" not in step:  # θ + εz: the perturbation's first 4 numbers, as pool integers
            z = (p.detach()[:4] - step["before"][:4]) / eps / zo["pool_scale"] * 2**24
            step["z"] = tuple(z.round().long().tolist())
        return a @ p

    for _ in range(n):
        step.clear()
        step["before"] = before = p.detach().clone()
        opt.step(closure)
        seen.add(step["z"])
        total += (before - p.detach()) / lr
    assert len(seen) == n  # N steps, N distinct perturbations
    assert _independent_ratio(total / n - a, a, n) < 3.0
    # the test can fail: the old advance by d gives a ratio of 5-20 (d = 8), ~1000 (d = 3072)
    q = zo["pool"].double() * zo["pool_scale"]
    idx = ((torch.arange(n) * d).unsqueeze(1) + torch.arange(d).unsqueeze(0)) % n
    z = q[idx]
    old = (z * (z @ a).unsqueeze(1)).mean(0) - a
    assert _independent_ratio(old, a, n) > 4.0


def test_pool_and_pointer_resume_identically():
    x = torch.randn(16, 4)
    def run(model, opt, steps):
        for _ in range(steps):
            opt.step(lambda: model(x).pow(2).mean())
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 2)
    b = copy.deepcopy(a)
    oa = zoengine.PeZO(a.parameters(), lr=0.05, eps=1e-2, pool_size=37, seed=5)
    run(a, oa, 6)
    ob = zoengine.PeZO(b.parameters(), lr=0.05, eps=1e-2, pool_size=37, seed=5)
    run(b, ob, 3)
    saved = copy.deepcopy((b.state_dict(), ob.state_dict()))
    c = torch.nn.Linear(4, 2)
    oc = zoengine.PeZO(c.parameters(), lr=0.05, eps=1e-2, pool_size=37, seed=99)
    c.load_state_dict(saved[0])
    oc.load_state_dict(saved[1])
    assert oc.state["zo"]["pool_pointer"] == (3 * 10) % 37
    run(c, oc, 3)
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_rng_budget_for_hwsim():
    p = torch.nn.Parameter(torch.zeros(100))
    pool = zoengine.PeZO([p], pool_size=64).rng_budget()
    assert pool["numbers_generated_per_step"] == 0 and pool["numbers_reused_per_step"] == 300
    assert pool["numbers_generated_once"] == 64 and pool["philox_blocks_per_step"] == 0
    assert pool["pool_stride"] == 101 and pool["pool_period"] == 64
    rot = zoengine.PeZO([p], reuse="rotate", lanes=8).rng_budget()
    # adaptive lanes generate a whole 16,384-number window per pass, one Philox block each
    assert rot["numbers_generated_per_step"] == 3 * 16384 and rot["lanes"] == 8
    assert rot["philox_blocks_per_step"] == 3 * 16384 and rot["numbers_reused_per_step"] == 0
    static = zoengine.PeZO([p], reuse="rotate", lanes=8, scaling="static").rng_budget()
    assert static["numbers_generated_per_step"] == 300 == static["philox_blocks_per_step"]
    mezo = zoengine.MeZO([p], n_samples=2).rng_budget()
    assert mezo["numbers_used_per_step"] == 100 * 7
    assert mezo["philox_blocks_per_step"] == 25 * 7 and mezo["numbers_generated_per_step"] == 700


@pytest.mark.parametrize("kwargs, name", [
    (dict(reuse="ring"), "reuse"), (dict(dist="normal"), "dist"), (dict(pool_size=0), "pool_size"),
    (dict(lanes=0), "lanes"), (dict(scaling="dynamic"), "scaling"),
])
def test_pezo_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        zoengine.PeZO([torch.nn.Parameter(torch.zeros(3))], **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(kernel_order=2), "kernel_order"), (dict(r_range=0.0), "r_range"), (dict(clip=-1.0), "clip"),
])
def test_kerzoo_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        zoengine.KerZOO([torch.nn.Parameter(torch.zeros(3))], **kwargs)
