"""Every preset and allowed combination through the same optimizer contract."""

import copy
import math

import pytest
import torch
from helpers import CONFIGS, ulp

NAMES = sorted(CONFIGS)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _closure(model):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 6, generator=g), torch.randn(12, 1, generator=g)
    return lambda: torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("name", NAMES)
def test_closure_required_and_no_grad(name):
    model = _model()
    opt = CONFIGS[name](model.named_parameters(), lr=1e-2, eps=1e-2)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    for _ in range(2):
        loss = opt.step(_closure(model))
    assert math.isfinite(loss.item())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    a = _model()
    oa = CONFIGS[name](a.named_parameters(), lr=1e-2, eps=1e-2, seed=3, n_samples=2)
    for _ in range(4):
        oa.step(_closure(a))
    b = _model()
    ob = CONFIGS[name](b.named_parameters(), lr=1e-2, eps=1e-2, seed=3, n_samples=2)
    for _ in range(2):
        ob.step(_closure(b))
    saved = copy.deepcopy((b.state_dict(), ob.state_dict()))
    c = _model()
    oc = CONFIGS[name](c.named_parameters(), lr=1e-2, eps=1e-2, seed=0, n_samples=2)
    c.load_state_dict(saved[0])
    oc.load_state_dict(saved[1])
    for _ in range(2):
        oc.step(_closure(c))
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


@pytest.mark.parametrize("name", NAMES)
def test_lr_zero_restore_bound(name):
    p = torch.nn.Parameter(torch.randn(3000) * 0.02)
    start = p.detach().clone()
    eps = 1e-3
    opt = CONFIGS[name]([p], lr=0.0, eps=eps)
    opt.step(lambda: (p * p).sum())
    # |r z| <= 5.9 (normal cut) or sqrt(3)·pool scale: bound with a 2ε·6 floor
    bound = 2 * ulp(torch.maximum(start.abs(), torch.full_like(start, 2 * eps * 6.0)))
    assert torch.all((p.detach() - start).abs() <= bound)


@pytest.mark.parametrize("name", NAMES)
def test_linear_objective_unbiased(name):
    """E[ĝ] = a for f = aᵀθ: every configuration promises it (the pool up to its O(1/√N)
    autocorrelation, bounded below by the 4,099-number pool)."""
    d, lr, steps = 5, 1e-3, 800
    a = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(d))
    opt = CONFIGS[name]([p], lr=lr, eps=1e-2, seed=2)
    g = []
    for _ in range(steps):
        before = p.detach().double().clone()
        opt.step(lambda: a @ p.double())
        g.append((before - p.detach().double()) / lr)
    g = torch.stack(g)
    se = g.std(0) / math.sqrt(steps)
    slack = 6 / math.sqrt(4099) * a.abs().sum() if "pool" in name else 0.0
    assert torch.all((g.mean(0) - a).abs() < 5 * se + slack), (g.mean(0), se)
