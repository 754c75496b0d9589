"""FZOO: the step against a float64 re-computation from the same u and losses, the estimator's
expectation and normaliser on a quadratic, exactness (lr = 0, masks, NaN), resume, replay and
a short run on a tiny LLaMA."""

import copy
import math

import pytest
import torch
from archs import batch, build
from helpers import regression_batch, tiny_mlp, ulp, virtual

import zoengine
from zoengine import journal as J
from zoengine import noise
from zoengine.kernels.keys import tensor_keys
from zoengine.optim import create, method_name
from zoengine.optim.fzoo import fzoo_coefficients

torch.set_num_threads(1)


def _recorder(f):
    seen = []

    def closure():
        v = f()
        seen.append(float(v))
        return v
    return closure, seen


@pytest.mark.parametrize("unbiased_std", [False, True])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_step_is_the_float64_formula(backend, unbiased_std):
    d, n, lr, eps = 40, 5, 1e-2, 1e-3
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
    theta0 = p.detach().clone()
    opt = zoengine.FZOO([p], lr=lr, eps=eps, n_samples=n, seed=4, backend=backend,
                        unbiased_std=unbiased_std)
    closure, seen = _recorder(lambda: (a * p).sum() + (p**4).sum())
    opt.step(closure)
    l0, li = seen[0], torch.tensor(seen[1:], dtype=torch.float64)
    assert len(seen) == n + 1  # n + 1 forwards: the centre first
    key = tensor_keys(["#0"])[0]
    u = torch.stack([noise.generate(d, seed=4, step=0, key=key, sample=k, dist="rademacher")
                     for k in range(n)]).double()
    sigma = float(li.std(unbiased=unbiased_std))  # torch's own std, a second implementation
    expect = theta0 - lr / (n * sigma) * ((li - l0)[:, None] * u).sum(0)
    # fp64 arithmetic: n perturb/restore cycles (<= 1 ulp of |θ| + ε each) and the update's
    # few roundings (<= 4 ulp of the result): (n + 4) ulp of the larger magnitude
    top = torch.maximum(theta0.abs() + eps, expect.abs())
    assert torch.all((p.detach() - expect).abs() <= (n + 4) * ulp(top))
    assert opt.state["zo"]["fzoo_std"] == pytest.approx(sigma, rel=1e-12)
    assert opt.state["zo"]["projected_grads"] == pytest.approx(
        [(v - l0) / eps for v in seen[1:]], rel=1e-12)
    coef, s = fzoo_coefficients(l0, seen[1:], unbiased_std=unbiased_std)
    assert s == pytest.approx(sigma, rel=1e-12) and coef == pytest.approx(
        ((li - l0) / (n * sigma)).tolist(), rel=1e-12)


def test_zero_std_makes_no_update():
    coef, s = fzoo_coefficients(1.0, [2.0, 2.0, 2.0])
    assert s == 0.0 and coef == [0.0, 0.0, 0.0]


def test_expectation_and_normaliser_on_a_quadratic():
    """On f = ½θᵀAθ + bᵀθ with A diagonal and Rademacher u, uᵀAu = tr A for every u, so
    ℓ_i − ℓ₀ = ε∇fᵀu_i + ε² tr A / 2 exactly: ĝ = Σ(ℓ_i − ℓ₀)u_i/(nε) is unbiased for ∇f, and
    σ² with n − 1 is unbiased for ε²‖∇f‖². Each mean is checked within 5 standard errors."""
    n, lr, eps, steps = 4, 1e-3, 1e-2, 300
    A = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    b = torch.tensor([0.3, -1.0, 0.7, 0.2, -0.4], dtype=torch.float64)
    theta0 = torch.tensor([0.5, -0.2, 0.1, 0.4, -0.3], dtype=torch.float64)
    grad = A * theta0 + b
    theta0 = theta0.float().double()  # fp32 weights (the native kernels), exact in fp64
    grad = A * theta0 + b
    p = torch.nn.Parameter(theta0.float())
    opt = zoengine.FZOO([p], lr=lr, eps=eps, n_samples=n, seed=9, backend="native")
    ghat, var = [], []
    for _ in range(steps):
        p.data.copy_(theta0)
        opt.step(lambda: 0.5 * (A * p.double() ** 2).sum() + (b * p.double()).sum())
        sigma = opt.state["zo"]["fzoo_std"]
        ghat.append((theta0 - p.detach().double()) * n * sigma / (lr * n * eps))
        var.append(sigma**2 * n / (n - 1))
    ghat, var = torch.stack(ghat), torch.tensor(var, dtype=torch.float64)
    se = ghat.std(0) / math.sqrt(steps)
    assert torch.all((ghat.mean(0) - grad).abs() <= 5 * se)
    target = eps**2 * float(grad.pow(2).sum())
    assert abs(float(var.mean()) - target) <= 5 * float(var.std()) / math.sqrt(steps)


def test_lr_zero_restores_within_bound_and_virtual_is_bit_exact():
    n, eps = 4, 1e-3
    p = torch.nn.Parameter(torch.randn(3000) * 0.02)
    start = p.detach().clone()
    zoengine.FZOO([p], lr=0.0, eps=eps, n_samples=n).step(lambda: (p * p).sum())
    # n in-place ±εu cycles, each <= 1 ulp of max(|θ|, 2ε) (two roundings of half an ulp)
    bound = n * ulp(torch.maximum(start.abs(), torch.full_like(start, 2 * eps)))
    assert torch.all((p.detach() - start).abs() <= bound)
    model = tiny_mlp(0)
    before = copy.deepcopy(model.state_dict())
    x, y = regression_batch()
    opt = virtual(zoengine.FZOO(model.named_parameters(), lr=0.0, n_samples=3), model)
    for _ in range(2):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_masked_entries_never_change():
    model = tiny_mlp(1)
    w = model[0].weight
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    frozen = w.detach()[~keep].clone()
    opt = zoengine.FZOO(model.named_parameters(), lr=1e-2, n_samples=3,
                        masks={"0.weight": keep}, backend="native")
    x, y = regression_batch()
    for _ in range(5):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    assert torch.equal(w.detach()[~keep], frozen)
    assert not torch.equal(w.detach()[keep], tiny_mlp(1)[0].weight.detach()[keep])


def _train(model, opt, steps, first=0):
    for t in range(first, first + steps):
        x, y = regression_batch(seed=t)
        opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))


def test_state_dict_resumes_bit_exactly():
    kw = dict(lr=1e-2, eps=1e-3, n_samples=3, seed=5, backend="native")
    a = tiny_mlp(0)
    _train(a, zoengine.FZOO(a.named_parameters(), **kw), 4)
    b = tiny_mlp(0)
    ob = zoengine.FZOO(b.named_parameters(), **kw)
    _train(b, ob, 2)
    saved = copy.deepcopy((b.state_dict(), ob.state_dict()))
    c = tiny_mlp(0)
    oc = zoengine.FZOO(c.named_parameters(), **{**kw, "seed": 0})
    c.load_state_dict(saved[0])
    oc.load_state_dict(saved[1])
    _train(c, oc, 2, first=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    with pytest.raises(ValueError, match="unbiased_std"):
        zoengine.FZOO(tiny_mlp(0).named_parameters(), **{**kw, "unbiased_std": True}) \
            .load_state_dict(saved[1])


def test_journal_replay_is_bit_exact_and_hyperparameters_rebuild(tmp_path):
    model = tiny_mlp(0)
    start = copy.deepcopy(model)
    opt = zoengine.FZOO(model.named_parameters(), lr=1e-2, n_samples=3, seed=7,
                        backend="native", unbiased_std=True)
    opt.set_journal(tmp_path / "j.zoj")
    _train(model, opt, 5)
    opt.close_journal()
    replayed = J.replay(start, tmp_path / "j.zoj")
    assert type(replayed) is zoengine.FZOO and replayed.unbiased_std
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), start.parameters()))
    again = create(method_name(zoengine.FZOO), tiny_mlp(0).parameters(), **opt.hyperparameters())
    assert again.hyperparameters() == opt.hyperparameters()


def test_nonfinite_loss_restores_the_weights():
    model = tiny_mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = regression_batch()
    calls = [0]

    def closure():
        calls[0] += 1
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss * float("nan") if calls[0] == 3 else loss
    for mode in ("raise", "skip"):
        calls[0] = 0
        opt = zoengine.FZOO(model.named_parameters(), lr=1.0, n_samples=4, nonfinite=mode,
                            dist="normal")
        if mode == "raise":
            with pytest.raises(zoengine.NonFiniteLossError, match="weights restored"):
                opt.step(closure)
        else:
            assert math.isnan(float(opt.step(closure)))
            assert opt.state["zo"]["skipped_steps"] == 1
        for p, q in zip(model.parameters(), before):  # one ±εz cycle: <= 1 ulp (ε·|z| < 6e-3)
            assert torch.all((p.detach() - q).abs() <= ulp(q.abs() + 6e-3))


def test_bad_arguments_are_named():
    ps = tiny_mlp(0).parameters()
    with pytest.raises(ValueError, match="n_samples=1"):
        zoengine.FZOO(ps, n_samples=1)
    with pytest.raises(ValueError, match="dist='pool'"):
        zoengine.FZOO(tiny_mlp(0).parameters(), dist="pool")
    for cls in (zoengine.FZOO, zoengine.HiZOO):  # their own update rules: no other stacks on
        with pytest.raises(ValueError, match=f"update='adam' with {cls.__name__}"):
            cls(tiny_mlp(0).parameters(), update="adam")


def test_loss_decreases_on_a_tiny_llama():
    """3 seeds × 10 steps (n = 4) on one batch: the mean decrease must exceed 3 standard
    errors of the seeds' decreases (a one-sided t-test at about 5 %, 2 degrees of freedom,
    would need 2.9)."""
    ids = batch(shape=(3, 12))
    drops = []
    for seed in range(3):
        model = build("llama")
        opt = zoengine.FZOO(model.named_parameters(), lr=1e-3, eps=1e-3, n_samples=4,
                            seed=seed, backend="native")
        closure = lambda model=model: model(input_ids=ids, labels=ids).loss  # noqa: E731
        first = float(closure().detach())
        for _ in range(10):
            opt.step(closure)
        drops.append(first - float(closure().detach()))
    drops = torch.tensor(drops)
    assert float(drops.mean()) > 3 * float(drops.std()) / math.sqrt(3)
