"""HiZOO: one step against a float64 re-computation from the same z and losses, the Hessian
estimate's expectation and its fixed point on a quadratic with a known diagonal Hessian,
exactness (lr = 0, masks, NaN), Σ in state_dict, replay, and a short run on a tiny LLaMA."""

import copy
import math

import pytest
import torch
from archs import batch, build
from helpers import regression_batch, tiny_mlp, ulp

import zoengine
from zoengine import journal as J
from zoengine.kernels import native_ops
from zoengine.kernels.keys import stream_key, tensor_keys
from zoengine.kernels.philox import noise_blocks
from zoengine.optim import create, method_name

torch.set_num_threads(1)
KEY = tensor_keys(["#0"])[0]
ZMAX = math.sqrt(50 * math.log(2))  # the contract's cut of |z|


def _z(backend, d, seed, step, sample=0):
    """z of the single unnamed tensor from the backend's own generator, as float64."""
    if backend == "native":
        return native_ops.noise(d, seed=seed, step=step, key=KEY, sample=sample).double()
    return noise_blocks(0, -(-d // 4), key64=stream_key(seed, step, sample), tensor_key=KEY,
                        dist="normal")[:d].double()


@pytest.mark.parametrize("backend, n", [("reference", 1), ("native", 1), ("native", 3)])
def test_step_is_the_float64_formula(backend, n):
    """n = 1 is the authors' step; n > 1 averages the n estimates of Σ and of the step."""
    d, lr, eps, alpha, wd = 30, 1e-2, 1e-3, 0.3, 0.01
    g = torch.Generator().manual_seed(1)
    a = torch.randn(d, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
    theta0 = p.detach().clone()
    s0 = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.25
    opt = zoengine.HiZOO([p], lr=lr, eps=eps, hessian_smooth=alpha, weight_decay=wd, seed=6,
                         backend=backend, n_samples=n)
    opt.sigma(p).copy_(s0)
    f = lambda t: (a * t).sum() + (t**4).sum() + 0.5 * (t * t).sum()  # noqa: E731
    seen = []
    opt.step(lambda: seen.append(float(f(p))) or seen[-1])
    assert len(seen) == 1 + 2 * n
    l0, lp, lm = seen[0], seen[1::2], seen[2::2]
    z = [_z(backend, d, 6, 0, k) for k in range(n)]
    for k in range(n):  # the evaluations were at θ ± εΣ^{-1/2}z_k (in-place rounding: 1e-12)
        u = z[k] / s0.sqrt()
        assert [lp[k], lm[k]] == pytest.approx(
            [float(f(theta0 + eps * u)), float(f(theta0 - eps * u))], rel=1e-12)
    est = sum(abs(lp[k] + lm[k] - 2 * l0) / (2 * eps**2) * z[k] ** 2 for k in range(n)) / n
    s1 = (1 - alpha) * s0 + alpha * s0 * est
    step = sum((lp[k] - lm[k]) / (2 * eps) * z[k] for k in range(n)) / n / s1.sqrt()
    theta = theta0 - lr * (step + wd * theta0)
    # fp64: Σ' takes < 4 + 4n roundings; θ adds the ±ε cycles' drift (<= 2 ulp of |θ| +
    # 2ε max|u| each) to the update's < 6 + 3n roundings
    assert torch.all((opt.sigma(p) - s1).abs() <= (4 + 4 * n) * ulp(s1))
    reach = max(float((2 * eps * zk / s0.sqrt()).abs().max()) for zk in z)
    top = torch.maximum(theta0.abs() + reach, theta.abs())
    assert torch.all((p.detach() - theta).abs() <= (6 + 5 * n) * ulp(top))
    assert opt.state["zo"]["projected_grads"] == pytest.approx(
        [(lp[k] - lm[k]) / (2 * eps) for k in range(n)])


def _quadratic_run(H, s0, *, alpha, steps, reset):
    """HiZOO at lr = 0 on f = ½ Σ H θ² (fp32 weights, float64 loss); yields Σ after each step
    (Σ reset to s0 before each step when ``reset``)."""
    p = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.05])[: H.numel()])
    opt = zoengine.HiZOO([p], lr=0.0, eps=1e-2, hessian_smooth=alpha, seed=3,
                         backend="native")
    for _ in range(steps):
        if reset:
            opt.sigma(p).copy_(s0)
        opt.step(lambda: 0.5 * (H * p.double() ** 2).sum())
        yield opt.sigma(p).double().clone()


def test_estimate_has_the_derived_expectation():
    """E[Σ'_i] = (1 − α)Σ_i + α Σ_i (tr(A)/2 + A_ii), A = diag(H/Σ): E[(zᵀAz) z_i²] = tr A +
    2A_ii for Gaussian z (E z⁴ = 3). The mean of 300 one-step estimates from the same Σ is
    checked per coordinate within 5 standard errors."""
    H = torch.tensor([1.0, 4.0, 16.0, 64.0], dtype=torch.float64)
    s0 = torch.tensor([2.0, 1.0, 8.0, 16.0], dtype=torch.float32)
    alpha, A = 0.5, H / s0.double()
    est = torch.stack(list(_quadratic_run(H, s0, alpha=alpha, steps=300, reset=True)))
    expect = (1 - alpha) * s0.double() + alpha * s0.double() * (A.sum() / 2 + A)
    se = est.std(0) / math.sqrt(est.shape[0])
    assert torch.all((est.mean(0) - expect).abs() <= 5 * se)


def test_estimate_converges_to_the_scaled_true_diagonal():
    """The expected map's only fixed point is Σ = (1 + d/2)·diag(H) (the estimator has no −I
    term: tr(Σ⁻¹H)/2 = d/(2c) must equal 1 − 1/c). With m_i the mean of ln Σ_i over steps
    200-600 at α = 0.1: the least-squares slope of m on ln H must be 1 ± 0.5 (a Σ blind to H's
    shape has slope 0) and mean(m − ln H) must be ln(1 + d/2) ± 0.5. A simulation of this
    recursion (numpy, 200 runs of 400 steps) gives standard deviations 0.15 and 0.11 for the
    two (0.12 and 0.09 at 600 steps): ±0.5 is more than 4 of them."""
    H = torch.tensor([1.0, 4.0, 16.0, 64.0], dtype=torch.float64)
    runs = list(_quadratic_run(H, None, alpha=0.1, steps=600, reset=False))
    m, lh = torch.stack([s.log() for s in runs[200:]]).mean(0), H.log()
    slope = float(((m - m.mean()) * (lh - lh.mean())).sum() / (lh - lh.mean()).pow(2).sum())
    assert abs(slope - 1.0) <= 0.5
    assert abs(float((m - lh).mean()) - math.log(1 + H.numel() / 2)) <= 0.5


def test_lr_zero_restores_within_bound():
    p = torch.nn.Parameter(torch.randn(3000) * 0.02)
    start = p.detach().clone()
    zoengine.HiZOO([p], lr=0.0, eps=1e-3).step(lambda: (p * p).sum())
    # Σ = 1 at the first step: the +ε, −2ε, +ε cycle of MeZO, <= 2 ulp of max(|θ|, 2ε max|z|)
    bound = 2 * ulp(torch.maximum(start.abs(), torch.full_like(start, 2e-3 * ZMAX)))
    assert torch.all((p.detach() - start).abs() <= bound)


def test_masked_entries_and_their_sigma_never_change():
    model = tiny_mlp(1)
    w = model[0].weight
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.5
    frozen = w.detach()[~keep].clone()
    opt = zoengine.HiZOO(model.named_parameters(), lr=1e-2, hessian_smooth=0.1,
                         weight_decay=0.1, masks={"0.weight": keep}, backend="native")
    x, y = regression_batch()
    for _ in range(4):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    assert torch.equal(w.detach()[~keep], frozen)
    assert torch.all(opt.sigma(w)[~keep] == 1.0) and not torch.all(opt.sigma(w)[keep] == 1.0)


def _train(model, opt, steps, first=0):
    for t in range(first, first + steps):
        x, y = regression_batch(seed=t)
        opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))


def test_state_dict_carries_sigma_and_resumes_bit_exactly():
    kw = dict(lr=1e-2, eps=1e-3, hessian_smooth=0.05, seed=5, backend="native")
    a = tiny_mlp(0)
    _train(a, zoengine.HiZOO(a.named_parameters(), **kw), 4)
    b = tiny_mlp(0)
    ob = zoengine.HiZOO(b.named_parameters(), **kw)
    _train(b, ob, 2)
    saved = copy.deepcopy((b.state_dict(), ob.state_dict()))
    assert sum("hizoo_sigma" in st for st in saved[1]["state"].values()) == 4
    c = tiny_mlp(0)
    oc = zoengine.HiZOO(c.named_parameters(), **kw)
    c.load_state_dict(saved[0])
    oc.load_state_dict(saved[1])
    _train(c, oc, 2, first=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    with pytest.raises(ValueError, match="hessian_smooth"):
        zoengine.HiZOO(tiny_mlp(0).parameters(), **{**kw, "hessian_smooth": 0.5}) \
            .load_state_dict(saved[1])
    numel = sum(p.numel() for p in a.parameters())
    assert zoengine.HiZOO.memory_extras(trainable_numel=numel)["hizoo_hessian"] == 4 * numel


def test_journal_replay_is_bit_exact(tmp_path):
    model = tiny_mlp(0)
    start = copy.deepcopy(model)
    opt = zoengine.HiZOO(model.named_parameters(), lr=1e-2, hessian_smooth=0.05, seed=7,
                         backend="native")
    opt.set_journal(tmp_path / "j.zoj")
    _train(model, opt, 5)
    opt.close_journal()
    replayed = J.replay(start, tmp_path / "j.zoj")
    assert type(replayed) is zoengine.HiZOO and replayed.hessian_smooth == 0.05
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), start.parameters()))
    again = create(method_name(zoengine.HiZOO), tiny_mlp(0).parameters(),
                   **opt.hyperparameters())
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
        opt = zoengine.HiZOO(model.named_parameters(), lr=1.0, nonfinite=mode)
        if mode == "raise":
            with pytest.raises(zoengine.NonFiniteLossError, match="weights restored"):
                opt.step(closure)
        else:
            assert math.isnan(float(opt.step(closure)))
        for p, q in zip(model.parameters(), before):  # Σ = 1: the MeZO cycle's 2-ulp bound
            assert torch.all((p.detach() - q).abs() <= 2 * ulp(q.abs() + 2e-3 * ZMAX))


def test_refusals_name_the_argument():
    model = tiny_mlp(0)
    opt = zoengine.HiZOO(model.parameters())
    with pytest.raises(ValueError, match="attach_virtual with HiZOO"):
        opt.attach_virtual(model)
    with pytest.raises(ValueError, match="hessian_smooth=1.0"):
        zoengine.HiZOO(model.parameters(), hessian_smooth=1.0)
    with pytest.raises(ValueError, match="set_distributed"):
        opt.set_distributed(type("Ex", (), {"mode": "samples", "world": 1,
                                             "check_same": lambda self, d: None})())
        opt.step(lambda: sum(p.sum() for p in model.parameters()))


def test_loss_decreases_on_a_tiny_llama():
    """3 seeds × 6 steps on one batch: the mean decrease must exceed 3 standard errors of the
    seeds' decreases (a one-sided t-test at about 5 %, 2 degrees of freedom, needs 2.9)."""
    ids = batch(shape=(2, 10))
    drops = []
    for seed in range(3):
        model = build("llama")
        opt = zoengine.HiZOO(model.named_parameters(), lr=3e-3, eps=1e-3, hessian_smooth=1e-4,
                             seed=seed, backend="native")
        closure = lambda model=model: model(input_ids=ids, labels=ids).loss  # noqa: E731
        first = float(closure().detach())
        for _ in range(6):
            opt.step(closure)
        drops.append(first - float(closure().detach()))
    drops = torch.tensor(drops)
    assert float(drops.mean()) > 3 * float(drops.std()) / math.sqrt(3)
