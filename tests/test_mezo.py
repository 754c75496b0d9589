"""MeZO through its public API: estimator properties, exactness, state, errors."""

import copy
import math

import pytest
import torch
from helpers import mse_closure, regression_batch, tiny_llama, tiny_mlp, ulp

import zoengine
from zoengine import noise
from zoengine.kernels.dispatch import resolve_backend
from zoengine.kernels.keys import tensor_keys


def backends():
    out = ["reference"]
    try:
        resolve_backend("native", [torch.zeros(1)])
        out.append("native")
    except (RuntimeError, ValueError):
        pass
    return out


# ---------------------------------------------------------------- estimator properties
def _estimates(f, theta0, steps, *, n_samples=1, lr=1e-3, dist="normal", seed=0):
    """Run MeZO on a single parameter; return ĝ_t = −Δθ/lr and θ_t for every step."""
    p = torch.nn.Parameter(theta0.clone())
    opt = zoengine.MeZO([p], lr=lr, eps=1e-2, seed=seed, n_samples=n_samples, dist=dist,
                        backend="reference")
    ghat, thetas = [], []
    for _ in range(steps):
        before = p.detach().double().clone()
        opt.step(lambda: f(p))
        thetas.append(before)
        ghat.append((before - p.detach().double()) / lr)
    return torch.stack(ghat), torch.stack(thetas)


def _assert_mean_zero(resid, sigmas=5.0):
    mean = resid.mean(0)
    se = resid.std(0) / math.sqrt(resid.shape[0])
    assert torch.all(mean.abs() < sigmas * se), (mean, se)


@pytest.mark.parametrize("n_samples", [1, 4])
def test_linear_unbiased_and_second_moment(n_samples):
    d = 6
    a = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, -1.0], dtype=torch.float64)
    f = lambda p: a @ p.double()
    ghat, _ = _estimates(f, torch.zeros(d), 1500 // n_samples, n_samples=n_samples)
    _assert_mean_zero(ghat - a)
    sq = (ghat**2).sum(1)
    expected = (d + n_samples + 1) / n_samples * (a @ a)
    se = sq.std() / math.sqrt(len(sq))
    assert abs(sq.mean() - expected) < 5 * se, (sq.mean(), expected, se)
    if n_samples > 1:  # averaging n samples measurably lowers the variance below n=1's
        assert sq.mean() < (d + 2) * (a @ a) - 5 * se


def test_quadratic_unbiased_at_every_point():
    torch.manual_seed(3)
    d = 5
    m = torch.randn(d, d, dtype=torch.float64)
    A = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, dtype=torch.float64)
    f = lambda p: 0.5 * p.double() @ A @ p.double() + b @ p.double()
    ghat, thetas = _estimates(f, torch.randn(d), 1500, lr=1e-4)
    _assert_mean_zero(ghat - (thetas @ A.T + b))


def test_float64_recomputation_of_one_step():
    model = tiny_mlp()
    x, y = regression_batch()
    names = [n for n, _ in model.named_parameters()]
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    lr, eps, wd = 0.05, 1e-2, 0.1
    opt = zoengine.MeZO(model.named_parameters(), lr=lr, eps=eps, weight_decay=wd, seed=7,
                        backend="reference")
    opt.step(mse_closure(model, x, y))
    g = opt.state_dict()["state"]["zo"]["projected_grads"][0]

    keys = dict(zip(names, tensor_keys(names)))
    z = {n: noise.generate(t.numel(), seed=7, step=0, key=keys[n]).double().view(t.shape)
         for n, t in before.items()}

    def loss64(sign):
        m64 = copy.deepcopy(model).double()
        with torch.no_grad():
            for n, p in m64.named_parameters():
                p.copy_(before[n] + sign * eps * z[n])
        return torch.nn.functional.mse_loss(m64(x.double()), y.double()).item()

    g64 = (loss64(+1) - loss64(-1)) / (2 * eps)
    assert g == pytest.approx(g64, rel=1e-4, abs=1e-5)
    for n, p in model.named_parameters():
        expected = before[n] - lr * (g * z[n] + wd * before[n])
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("n_samples, cycles", [(1, 1), (3, 3)])
def test_lr_zero_restores_within_ulp_bound(backend, n_samples, cycles):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000) * 0.02)
    p.data[:10] = 0.0  # near-zero weights: the bound is in ulps of 2ε|z|, not of θ
    start = p.detach().clone()
    eps = 1e-3
    opt = zoengine.MeZO([p], lr=0.0, eps=eps, seed=1, n_samples=n_samples, backend=backend)
    opt.step(lambda: (p * p).sum())
    zmax = torch.stack([noise.generate(p.numel(), seed=1, step=0, key=tensor_keys(["#0"])[0],
                                       sample=k).abs() for k in range(n_samples)]).amax(0)
    bound = 2 * cycles * ulp(torch.maximum(start.abs(), 2 * eps * zmax))
    assert torch.all((p.detach() - start).abs() <= bound)


def test_no_grad_is_ever_allocated():
    model = tiny_mlp()
    x, y = regression_batch()
    opt = zoengine.MeZO(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.step(mse_closure(model, x, y))
    assert all(p.grad is None for p in model.parameters())


def test_tiny_llama_lowers_its_loss():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 16), generator=g)
    closure = lambda: model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        start = closure().item()
    opt = zoengine.MeZO(model.named_parameters(), lr=3e-3, eps=1e-3, seed=0)
    for _ in range(150):
        opt.step(closure)
    with torch.no_grad():
        end = closure().item()
    assert end < start - 0.05, (start, end)


# ---------------------------------------------------------------- state and API
def _run(model, opt, x, y, steps, sched=None):
    for _ in range(steps):
        opt.step(mse_closure(model, x, y))
        if sched is not None:
            sched.step()


def test_state_dict_round_trip_reproduces_trajectory_bitwise():
    x, y = regression_batch()
    a = tiny_mlp()
    opt_a = zoengine.MeZO(a.named_parameters(), lr=0.05, eps=1e-2, seed=11, n_samples=2)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    _run(a, opt_a, x, y, 6, sched_a)

    b = tiny_mlp()
    opt_b = zoengine.MeZO(b.named_parameters(), lr=0.05, eps=1e-2, seed=11, n_samples=2)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    _run(b, opt_b, x, y, 3, sched_b)
    saved = copy.deepcopy((b.state_dict(), opt_b.state_dict(), sched_b.state_dict()))

    c = tiny_mlp(seed=99)  # different weights until the checkpoint is loaded
    opt_c = zoengine.MeZO(c.named_parameters(), lr=0.05, eps=1e-2, seed=0, n_samples=2)
    sched_c = torch.optim.lr_scheduler.StepLR(opt_c, step_size=2, gamma=0.5)
    c.load_state_dict(saved[0])
    opt_c.load_state_dict(saved[1])
    sched_c.load_state_dict(saved[2])
    assert opt_c.state["zo"]["seed"] == 11 and opt_c.step_count == 3
    _run(c, opt_c, x, y, 3, sched_c)
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_named_parameters_make_z_independent_of_order():
    x, y = regression_batch()
    a, b = tiny_mlp(), tiny_mlp()
    opt_a = zoengine.MeZO(a.named_parameters(), lr=0.05, eps=1e-2)
    opt_b = zoengine.MeZO(list(b.named_parameters())[::-1], lr=0.05, eps=1e-2)
    _run(a, opt_a, x, y, 3)
    _run(b, opt_b, x, y, 3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_param_groups_scheduler_and_frozen_tensors():
    x, y = regression_batch()
    model = tiny_mlp()
    first, second = model[0], model[2]
    first.bias.requires_grad_(False)
    frozen = first.bias.detach().clone()
    w2 = second.weight.detach().clone()
    opt = zoengine.MeZO([{"params": [first.weight, first.bias]},
                         {"params": list(second.parameters()), "lr": 0.0}], lr=0.05, eps=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    _run(model, opt, x, y, 4, sched)
    assert torch.equal(first.bias, frozen)  # never perturbed, never updated
    bound = 8 * ulp(torch.maximum(w2.abs(), torch.full_like(w2, 0.1)))
    assert torch.all((second.weight - w2).abs() <= bound)  # lr=0 group: only restore drift
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 5)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(eps=0.0), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"), (dict(n_samples=0), "n_samples"), (dict(dist="cauchy"), "dist"),
    (dict(backend="cuda"), "backend"), (dict(nonfinite="ignore"), "nonfinite"),
])
def test_constructor_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}=") as err:
        zoengine.MeZO(tiny_mlp().parameters(), **kwargs)
    assert "must" in str(err.value)


def test_step_requires_a_closure():
    opt = zoengine.MeZO(tiny_mlp().parameters())
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()


def _restored(model, start, eps=1e-2, cycles=1):
    for p, s in zip(model.parameters(), start):
        bound = 2 * cycles * ulp(torch.maximum(s.abs(), torch.full_like(s, 12 * eps)))
        if not torch.all((p.detach() - s).abs() <= bound):
            return False
    return True


@pytest.mark.parametrize("bad", [torch.ones(3), "loss", None])
def test_non_scalar_loss_restores_and_raises(bad):
    model = tiny_mlp()
    start = [p.detach().clone() for p in model.parameters()]
    opt = zoengine.MeZO(model.parameters(), lr=0.1, eps=1e-2)
    with pytest.raises(ValueError, match="closure returned"):
        opt.step(lambda: bad)
    assert _restored(model, start)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_restores_then_raises_or_skips(value):
    model = tiny_mlp()
    start = [p.detach().clone() for p in model.parameters()]
    calls = iter([1.0, value, 1.0, value])
    opt = zoengine.MeZO(model.parameters(), lr=0.1, eps=1e-2)
    with pytest.raises(zoengine.NonFiniteLossError, match="non-finite"):
        opt.step(lambda: torch.tensor(next(calls)))
    assert _restored(model, start)
    skip = zoengine.MeZO(model.parameters(), lr=0.1, eps=1e-2, nonfinite="skip")
    loss = skip.step(lambda: torch.tensor(next(calls)))
    assert math.isnan(loss.item()) and skip.state["zo"]["skipped_steps"] == 1
    assert skip.step_count == 1
    assert _restored(model, start, cycles=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("fail_at", [0, 1])
def test_exception_in_closure_leaves_nothing_perturbed(fail_at):
    model = tiny_mlp()
    start = [p.detach().clone() for p in model.parameters()]
    count = {"n": 0}

    def closure():
        if count["n"] == fail_at:
            raise KeyboardInterrupt
        count["n"] += 1
        return torch.tensor(0.5)

    opt = zoengine.MeZO(model.parameters(), lr=0.1, eps=1e-2)
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert _restored(model, start)
    assert opt.step_count == 0
