"""KerZOO's open questions as options: the unscaled-kernel reading (``rescale_kernel=False``)
and its exact moments, the shrinking-r schedule (a pure function of the step: resume and
journal replay bit-exact), and the default-lr warning that states the variance factor."""

import copy
import json
import math
import warnings
from fractions import Fraction as F

import pytest
import sympy as sp
import torch
from helpers import regression_batch, tiny_mlp

import zoengine
from zoengine import journal as J
from zoengine.optim import create
from zoengine.optim.estimators import (
    KERNELS,
    kernel_moments,
    kernel_weight,
    scalar_uniform,
    scheduled_r_range,
)

torch.set_num_threads(1)

HALF, THREE_HALVES = F(1, 2), F(3, 2)


def _sympy_moments(order: int, rescale: bool) -> dict:
    """The moments by symbolic integration over r ~ U(-a, a), a symbolic: an independent
    check of kernel_moments."""
    r, a = sp.Symbol("r"), sp.Symbol("a", positive=True)
    x = r / a if rescale else r
    k = x * sum(sp.Rational(c.numerator, c.denominator) * x ** (2 * i)
                for i, c in enumerate(KERNELS[order]))
    k = k / a if rescale else k
    e = lambda f: sp.integrate(sp.expand(f), (r, -a, a)) / (2 * a)  # noqa: E731
    return {"E[K]": e(k), "E[rK]": e(r * k), "E[r3K]": e(r**3 * k), "E[r5K]": e(r**5 * k),
            "E[r2K2]": e(r**2 * k**2)}, a


@pytest.mark.parametrize("order", [1, 3, 5])
@pytest.mark.parametrize("rescale", [True, False])
def test_kernel_moments_are_exact(order, rescale):
    symbolic, a = _sympy_moments(order, rescale)
    for value in (F(1), HALF, THREE_HALVES, F(7, 10)):
        exact = {n: sp.Rational(v.numerator, v.denominator)
                 for n, v in kernel_moments(order, value, rescale=rescale).items()}
        at = sp.Rational(value.numerator, value.denominator)
        assert exact == {n: sp.nsimplify(v.subs(a, at)) for n, v in symbolic.items()}


def test_the_moments_table_of_the_docs():
    """docs/methods/kerzoo.md's table, value for value."""
    m = lambda o, a=1, s=True: kernel_moments(o, a, rescale=s)  # noqa: E731
    for order, var in ((1, F(9, 5)), (3, F(25, 4)), (5, F(11025, 832))):
        for a in (1, HALF, THREE_HALVES):  # rescaled: E[rK] = 1 and E[r²K²] for every a
            assert m(order, a)["E[rK]"] == 1 and m(order, a)["E[r2K2]"] == var
            assert m(order, a)["E[K]"] == 0 and (order == 1 or m(order, a)["E[r3K]"] == 0)
        assert m(order, 1, False) == m(order, 1, True)  # a = 1: the two readings agree
    assert m(1, HALF)["E[r3K]"] == F(3, 20)
    assert m(3, HALF)["E[r5K]"] == F(-5, 336)
    half3 = m(3, HALF, False)  # the research dossier's numbers for the unscaled order 3 on ½
    assert (half3["E[rK]"], half3["E[r3K]"]) == (F(79, 64), F(45, 256))
    assert half3["E[r2K2]"] == F(10225, 4096) and half3["E[r5K]"] == F(655, 21504)
    assert m(1, HALF, False)["E[rK]"] == F(1, 4) and m(1, HALF, False)["E[r2K2]"] == F(9, 80)
    half5 = m(5, HALF, False)
    assert (half5["E[rK]"], half5["E[r3K]"]) == (F(10501, 4096), F(5355, 16384))
    assert half5["E[r2K2]"] == F(2050396425, 218103808)
    three3 = m(3, THREE_HALVES, False)
    assert (three3["E[rK]"], three3["E[r3K]"]) == (F(-801, 64), F(-6075, 256))  # climbs
    assert three3["E[r2K2]"] == F(2934225, 4096)
    assert m(5, THREE_HALVES, False)["E[rK]"] == F(401661, 4096)
    for a in (HALF, F(1), F(6, 5), THREE_HALVES):  # unscaled order 3: zero at a² = 25/21
        assert m(3, a, False)["E[rK]"] == F(25, 4) * a**2 - F(21, 4) * a**4


def _cubic(d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
    return theta, c


@pytest.mark.parametrize("rescale", [True, False])
def test_rescale_kernel_weights_the_difference_by_the_chosen_reading(rescale):
    """g = (ℓ₊ − ℓ₋)/(2ε)·w with w = K(r/a)/a (rescaled) or K(r) (unscaled), r = a·U from the
    contract, every step; the perturbation is θ ± ε r u."""
    theta, c = _cubic()
    a, eps, seed = 0.5, 1e-2, 3
    opt = zoengine.KerZOO([theta], lr=1e-3, eps=eps, r_range=a, rescale_kernel=rescale,
                          seed=seed, kernel_order=3, backend="reference")
    for t in range(4):
        losses = []

        def f(losses=losses):
            losses.append(float((c * theta.detach() ** 3).sum()))
            return losses[-1]
        opt.step(f)
        r = a * scalar_uniform(seed, t, 0)
        w = kernel_weight(r, 3, a) if rescale else kernel_weight(r, 3, 1.0)
        want = (losses[0] - losses[1]) / (2 * eps) * w
        assert opt.state["zo"]["projected_grads"][0] == want


def test_rescale_true_is_the_previous_behaviour_bit_for_bit():
    """The default reading is ZO(estimator="kernel")'s, whose code this option did not touch."""
    runs = []
    for make in (lambda ps: zoengine.KerZOO(ps, lr=1e-2, r_range=0.5, seed=2),
                 lambda ps: zoengine.ZO(ps, lr=1e-2, estimator="kernel", r_range=0.5, seed=2)):
        m = tiny_mlp()
        opt = make(list(m.named_parameters()))
        for t in range(5):
            x, y = regression_batch(seed=t)
            opt.step(lambda m=m, x=x, y=y: torch.nn.functional.mse_loss(m(x), y))
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs))


# ---- the r schedule -----------------------------------------------------------------------------

def test_schedule_formula():
    lin, cos = ("linear", 0.25, 8), ("cosine", 0.25, 8)
    assert [scheduled_r_range(1.0, lin, t) for t in (0, 2, 4, 8, 100)] == \
        [1.0, 1.0 - 0.75 * 2 / 8, 0.625, 0.25, 0.25]
    assert scheduled_r_range(1.0, cos, 0) == 1.0 and scheduled_r_range(1.0, cos, 9) == 0.25
    assert scheduled_r_range(1.0, cos, 4) == pytest.approx(0.625, abs=1e-15)
    assert scheduled_r_range(1.0, cos, 2) == 0.25 + 0.75 * (1 + math.cos(math.pi / 4)) / 2
    assert scheduled_r_range(0.5, None, 10**9) == 0.5


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_perturbation_uses_the_scheduled_range(kind):
    """Recovered from θ₊ − θ: r_t = a(t)·U_t, and the kernel weight is K_{a(t)}."""
    theta, c = _cubic()
    eps, seed, sched = 1e-2, 5, (kind, 0.2, 6)
    opt = zoengine.KerZOO([("theta", theta)], lr=1e-3, eps=eps, r_range=0.8, r_schedule=sched,
                          seed=seed, backend="reference")
    key = zoengine.noise.tensor_keys(["theta"])[0]
    for t in range(9):
        a = scheduled_r_range(0.8, sched, t)
        assert opt.r_range_at(t) == a
        seen, losses = [], []

        def f(seen=seen, losses=losses):
            seen.append(theta.detach().clone())
            losses.append(float((c * theta.detach() ** 3).sum()))
            return losses[-1]
        before = theta.detach().clone()
        opt.step(f)
        r = a * scalar_uniform(seed, t, 0)
        z = zoengine.noise.generate(4, seed=seed, step=t, sample=0, key=key,
                                    dtype=torch.float64)
        # θ₊ = θ + ε r z in float64: r recovered to a few ulp of |θ| / (ε|z|)
        tol = 8 * 2.0**-52 * float(before.abs().max() + 1) / (eps * float(z.abs().min()))
        assert float(((seen[0] - before) / (eps * z)).sub(r).abs().max()) <= tol
        want = (losses[0] - losses[1]) / (2 * eps) * kernel_weight(r, 3, a)
        assert opt.state["zo"]["projected_grads"][0] == want


def _train(opt, model, steps, start=0):
    for t in range(start, start + steps):
        x, y = regression_batch(seed=t)
        opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))


@pytest.mark.parametrize("options", [dict(r_schedule=("cosine", 0.1, 6)),
                                     dict(r_schedule=["linear", 0.3, 4], rescale_kernel=False)])
def test_resume_is_bit_exact_and_the_config_is_saved(options):
    make = lambda m: zoengine.KerZOO(list(m.named_parameters()), lr=1e-2, r_range=0.5,  # noqa: E731
                                     seed=4, **options)
    whole = tiny_mlp()
    _train(make(whole), whole, 10)
    first = tiny_mlp()
    oa = make(first)
    _train(oa, first, 5)
    sd = copy.deepcopy(oa.state_dict())
    cfg = sd["state"]["zo"]["config"]
    assert cfg["r_schedule"] == list(zoengine.KerZOO([torch.zeros(1, requires_grad=True)], lr=0,
                                                     r_range=0.5, **options).r_schedule)
    assert cfg.get("rescale_kernel", True) == options.get("rescale_kernel", True)
    second = copy.deepcopy(first)
    ob = make(second)
    ob.load_state_dict(sd)
    _train(ob, second, 5, start=5)
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), second.parameters()))
    other = zoengine.KerZOO(list(tiny_mlp().named_parameters()), lr=1e-2, r_range=0.5, seed=4)
    with pytest.raises(ValueError, match="r_schedule"):
        other.load_state_dict(sd)


def test_default_options_leave_the_saved_config_as_before():
    opt = zoengine.KerZOO(list(tiny_mlp().named_parameters()), lr=1e-2)
    cfg = opt.state_dict()["state"]["zo"]["config"]
    assert "r_schedule" not in cfg and "rescale_kernel" not in cfg  # older checkpoints load


def test_journal_replay_with_a_schedule_is_bit_exact(tmp_path):
    model = tiny_mlp()
    start = copy.deepcopy(model)
    opt = zoengine.KerZOO(list(model.named_parameters()), lr=1e-2, r_range=0.6, seed=8,
                          rescale_kernel=False, r_schedule=("cosine", 0.2, 5))
    opt.set_journal(tmp_path / "j.zoj")
    _train(opt, model, 7)
    opt.close_journal()
    replayed = J.replay(start, tmp_path / "j.zoj")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))
    assert replayed.r_schedule == ("cosine", 0.2, 5) and replayed.rescale_kernel is False


def test_hyperparameters_rebuild_through_json():
    opt = zoengine.KerZOO(list(tiny_mlp().named_parameters()), lr=1e-2, rescale_kernel=False,
                          r_schedule=("linear", 0.5, 10))
    hyper = json.loads(json.dumps(opt.hyperparameters()))
    again = create("kerzoo", list(tiny_mlp().named_parameters()), **hyper)
    assert again.hyperparameters() == hyper and again._run_config() == opt._run_config()


# ---- the default lr: a warning with the variance factor ------------------------------------

def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


def test_default_lr_warns_with_the_variance_factor():
    with pytest.warns(UserWarning, match=r"E\[r²K²\] = 6\.25") as rec:
        opt = zoengine.KerZOO(_params())
    assert opt.defaults["lr"] == 1e-6 and "lr=" in str(rec[0].message)
    with pytest.warns(UserWarning, match=r"13\.25"):
        zoengine.KerZOO(_params(), kernel_order=5)
    factor = float(F(10225, 4096))  # unscaled order 3 on U(-½, ½)
    with pytest.warns(UserWarning, match=f"{factor:.4g}.*E\\[rK\\] = 1.234"):
        zoengine.KerZOO(_params(), r_range=0.5, rescale_kernel=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoengine.KerZOO(_params(), lr=1e-6)  # given: silent, even at the default value
        zoengine.KerZOO(_params(), kernel_order=None)  # r ≡ 1, K ≡ 1: MeZO, nothing to warn
        create("kerzoo", _params(), lr=1e-3)


@pytest.mark.parametrize("kwargs, name", [
    (dict(rescale_kernel="yes"), "rescale_kernel"), (dict(rescale_kernel=1), "rescale_kernel"),
    (dict(r_schedule="linear"), "r_schedule"), (dict(r_schedule=("step", 0.5, 10)), "r_schedule"),
    (dict(r_schedule=("linear", 2.0, 10)), "r_schedule"),  # grows: not a shrinking schedule
    (dict(r_schedule=("linear", 0.0, 10)), "r_schedule"),
    (dict(r_schedule=("linear", 0.5, 0)), "r_schedule"),
    (dict(r_schedule=("cosine", 0.5, True)), "r_schedule"),
    (dict(r_schedule=("cosine", float("nan"), 3)), "r_schedule"),
    (dict(r_schedule=("cosine", 0.5, 3), kernel_order=None), "r_schedule"),
    (dict(rescale_kernel=False, r_range=1.5), "r_range"),  # E[rK] = -801/64: climbs
    (dict(rescale_kernel=False, r_range=math.sqrt(25 / 21) + 1e-12), "r_range"),
])
def test_bad_options_are_refused_by_name(kwargs, name):
    if name == "r_range":  # just below the root, and the other orders, are accepted
        zoengine.KerZOO(_params(), lr=1e-3, rescale_kernel=False, r_range=1.09)
        zoengine.KerZOO(_params(), lr=1e-3, rescale_kernel=False, r_range=1.5, kernel_order=5)
    with pytest.raises(ValueError, match=name):
        zoengine.KerZOO(_params(), lr=1e-3, **kwargs)
