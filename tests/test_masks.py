"""The optimizers' sparsity-mask hook: pruned zeros stay exactly zero for every method."""

import copy

import pytest
import torch
from helpers import CONFIGS

import zoengine
from zoengine.optim import ZO

BACKENDS = ["reference", "native"]


def _pruned_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        w = m[0].weight
        w[w.abs() < w.abs().median()] = 0.0  # 50 % unstructured
        w2 = m[2].weight.view(-1, 4)  # 2:4 on the head
        idx = w2.abs().argsort(dim=1)[:, :2]
        w2.scatter_(1, idx, 0.0)
    return m


def _closure(m):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
    return lambda: torch.nn.functional.mse_loss(m(x), y)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zeros_stay_exactly_zero_for_every_method(name):
    m = _pruned_model()
    zeros = {n: p.detach() == 0 for n, p in m.named_parameters()}
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = CONFIGS[name](m.named_parameters(), lr=0.05, eps=1e-2, masks="zeros",
                        weight_decay=0.1)
    for _ in range(5):
        opt.step(_closure(m))
    for n, p in m.named_parameters():
        assert torch.all(p[zeros[n]] == 0), n
        assert torch.all(p[~zeros[n]] != start[n][~zeros[n]]), n  # the others do move
    head = m[2].weight.view(-1, 4)
    assert torch.all((head != 0).sum(1) <= 2)  # still a valid 2:4 pattern


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_dict_by_name_and_by_tensor(backend):
    m = _pruned_model()
    keep = torch.rand(8, 8) > 0.5
    with torch.no_grad():
        m[0].weight[~keep] = 0.0
    before = m[0].weight.detach().clone()
    opt = zoengine.MeZO(m.named_parameters(), lr=0.05, eps=1e-2, backend=backend,
                        masks={"0.weight": keep})
    for _ in range(3):
        opt.step(_closure(m))
    assert torch.equal(m[0].weight[~keep], before[~keep])
    opt2 = zoengine.MeZO(m.parameters(), lr=0.05, masks={m[0].weight: keep}, backend=backend)
    opt2.step(_closure(m))
    assert torch.all(m[0].weight[~keep] == 0)


def test_masks_round_trip_through_state_dict():
    a = _pruned_model()
    oa = ZO(a.named_parameters(), lr=0.05, eps=1e-2, masks="zeros")
    for _ in range(2):
        oa.step(_closure(a))
    b = copy.deepcopy(a)
    saved = copy.deepcopy(oa.state_dict())
    ob = ZO(b.named_parameters(), lr=0.05, eps=1e-2)  # no masks given: they come from the state
    ob.load_state_dict(saved)
    for _ in range(3):
        oa.step(_closure(a))
        ob.step(_closure(b))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_bad_masks_are_named():
    m = _pruned_model()
    with pytest.raises(ValueError, match="masks="):
        zoengine.MeZO(m.parameters(), masks="ones")
    with pytest.raises(ValueError, match="shape"):
        zoengine.MeZO(m.named_parameters(), masks={"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not among"):
        zoengine.MeZO(m.named_parameters(), masks={"nope": torch.ones(8, 8, dtype=torch.bool)})


def test_stochastic_rounding_is_validated_and_reaches_the_kernel(monkeypatch):
    """The option travels to restore_update_ (whose rounding is tested in test_triton_ops)."""
    from zoengine.kernels import reference

    with pytest.raises(ValueError, match="stochastic_rounding"):
        zoengine.PeZO([torch.nn.Parameter(torch.zeros(4))], stochastic_rounding=True)
    seen = []
    real = reference.restore_update_

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stochastic_rounding", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "restore_update_", spy)
    for sr in (False, True):
        q = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
        opt = zoengine.MeZO([q], lr=1e-3, stochastic_rounding=sr, backend="reference")
        opt.step(lambda q=q: q.double().sum())
    assert seen == [False, True]
