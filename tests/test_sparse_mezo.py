"""Sparse-MeZO: the mask is exactly the chosen magnitude quantile, fixed for a step, AND-ed with
user masks; masked entries are bit-identical; the step is MeZO's on m ⊙ z (float64
re-computation); lr = 0, resume, replay and a short run on a tiny LLaMA."""

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

torch.set_num_threads(1)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.9])
@pytest.mark.parametrize("shape", [(7,), (13, 11), (3, 5, 17)])
def test_mask_is_exactly_the_magnitude_quantile(sparsity, shape):
    g = torch.Generator().manual_seed(len(shape))
    p = torch.nn.Parameter(torch.randn(shape, generator=g))  # continuous: no ties in |θ|
    live = torch.rand(shape, generator=g) > 0.3
    for masks, n_live in ((None, p.numel()), ({p: live}, int(live.sum()))):
        opt = zoengine.SparseMeZO([p], sparsity=sparsity, masks=masks)
        m = opt.step_mask(p)
        k = min(n_live, max(1, round((1 - sparsity) * n_live)))
        assert int(m.sum()) == k
        pool = p.detach().abs()[live] if masks else p.detach().abs().reshape(-1)
        inside = p.detach().abs()[m]
        assert float(inside.max()) == float(pool.kthvalue(k).values)  # the k smallest
        if masks:
            assert not bool((m & ~live).any())


def test_mask_is_fixed_for_the_step_and_masked_entries_stay_bit_identical():
    """eps = 0.05 moves weights across h during the evaluations; every evaluation may only
    see moved entries inside the mask computed from θ at the step's start."""
    model = tiny_mlp(2)
    opt = zoengine.SparseMeZO(model.named_parameters(), lr=1e-2, eps=5e-2, sparsity=0.6,
                              threshold="step", n_samples=2, backend="native")
    x, y = regression_batch()
    for _ in range(4):
        start = [p.detach().clone() for p in model.parameters()]
        masks = [opt.step_mask(p) for p in model.parameters()]

        def closure(start=start, masks=masks):
            for p, s, m in zip(model.parameters(), start, masks):
                assert not bool(((p.detach() != s) & ~m).any())
            return torch.nn.functional.mse_loss(model(x), y)
        opt.step(closure)
        for p, s, m in zip(model.parameters(), start, masks):
            assert torch.equal(p.detach()[~m], s[~m])
            assert not torch.equal(p.detach()[m], s[m])


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_step_is_mezo_on_the_masked_noise(backend):
    d, lr, eps = 50, 1e-2, 1e-3
    g = torch.Generator().manual_seed(3)
    a = torch.randn(d, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(torch.randn(d, generator=g))
    theta0 = p.detach().double().clone()
    opt = zoengine.SparseMeZO([p], lr=lr, eps=eps, sparsity=0.5, seed=2, backend=backend)
    m = opt.step_mask(p).double()
    seen = []
    opt.step(lambda: seen.append(float((a * p.double()).sum() + (p.double() ** 4).sum()))
             or seen[-1])
    z = noise.generate(d, seed=2, step=0, key=tensor_keys(["#0"])[0]).double() * m
    expect = theta0 - lr * (seen[0] - seen[1]) / (2 * eps) * z
    # fp32 weights: the ±ε cycle drifts <= 2 ulp of max(|θ|, 2ε|z|); the update adds <= 2 ulp
    top = torch.maximum(theta0.abs() + 2 * eps * z.abs(), expect.abs())
    assert torch.all((p.detach().double() - expect).abs() <= 4 * ulp(top.float()).double())
    assert torch.equal(p.detach().double()[m == 0], theta0[m == 0])


def test_threshold_once_is_fixed_and_saved():
    model = tiny_mlp(0)
    opt = zoengine.SparseMeZO(model.named_parameters(), lr=5e-2, sparsity=0.5,
                              backend="native")
    w = model[0].weight
    h0 = opt.state[w]["sparse_mezo_threshold"].clone()
    assert float(h0) == float(w.detach().abs().reshape(-1).kthvalue(15).values)  # 30 weights
    x, y = regression_batch()
    for _ in range(5):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    assert torch.equal(opt.state[w]["sparse_mezo_threshold"], h0)
    assert torch.equal(opt.step_mask(w), w.detach().abs() <= h0)
    sd = opt.state_dict()
    assert sum("sparse_mezo_threshold" in st for st in sd["state"].values()) == 4


def test_lr_zero_virtual_is_bit_exact_and_in_place_within_bound():
    model = tiny_mlp(0)
    before = copy.deepcopy(model.state_dict())
    x, y = regression_batch()
    opt = virtual(zoengine.SparseMeZO(model.named_parameters(), lr=0.0, n_samples=2), model)
    for _ in range(2):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    p = torch.nn.Parameter(torch.randn(3000) * 0.02)
    start = p.detach().clone()
    zoengine.SparseMeZO([p], lr=0.0, eps=1e-3).step(lambda: (p * p).sum())
    zmax = math.sqrt(50 * math.log(2))  # MeZO's cycle: <= 2 ulp of max(|θ|, 2ε max|z|)
    bound = 2 * ulp(torch.maximum(start.abs(), torch.full_like(start, 2e-3 * zmax)))
    assert torch.all((p.detach() - start).abs() <= bound)


def _train(model, opt, steps, first=0):
    for t in range(first, first + steps):
        x, y = regression_batch(seed=t)
        opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))


@pytest.mark.parametrize("threshold", ["once", "step"])
def test_state_dict_resumes_bit_exactly(threshold):
    kw = dict(lr=5e-2, eps=1e-3, sparsity=0.5, threshold=threshold, seed=5, backend="native")
    a = tiny_mlp(0)
    _train(a, zoengine.SparseMeZO(a.named_parameters(), **kw), 4)
    b = tiny_mlp(0)
    ob = zoengine.SparseMeZO(b.named_parameters(), **kw)
    _train(b, ob, 2)
    saved = copy.deepcopy((b.state_dict(), ob.state_dict()))
    c = tiny_mlp(3)  # other weights: "once" thresholds come from the state_dict, not from c
    oc = zoengine.SparseMeZO(c.named_parameters(), **kw)
    c.load_state_dict(saved[0])
    oc.load_state_dict(saved[1])
    _train(c, oc, 2, first=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    with pytest.raises(ValueError, match="sparsity"):
        zoengine.SparseMeZO(tiny_mlp(0).parameters(), **{**kw, "sparsity": 0.25}) \
            .load_state_dict(saved[1])


def test_journal_replay_with_user_masks_is_bit_exact(tmp_path):
    model = tiny_mlp(0)
    with torch.no_grad():
        model[0].weight[:, :2] = 0.0  # pruned: masks="zeros" keeps them at exactly 0
    start = copy.deepcopy(model)
    opt = zoengine.SparseMeZO(model.named_parameters(), lr=5e-2, sparsity=0.5, seed=7,
                              masks="zeros", backend="native")
    opt.set_journal(tmp_path / "j.zoj")
    _train(model, opt, 5)
    opt.close_journal()
    assert torch.all(model[0].weight[:, :2] == 0)
    replayed = J.replay(start, tmp_path / "j.zoj")
    assert type(replayed) is zoengine.SparseMeZO and replayed.sparsity == 0.5
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), start.parameters()))
    again = create(method_name(zoengine.SparseMeZO), tiny_mlp(0).parameters(),
                   **opt.hyperparameters())
    assert again.hyperparameters() == opt.hyperparameters()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sparsity=1.0"):
        zoengine.SparseMeZO(tiny_mlp(0).parameters(), sparsity=1.0)
    with pytest.raises(ValueError, match="threshold='never'"):
        zoengine.SparseMeZO(tiny_mlp(0).parameters(), threshold="never")


def test_loss_decreases_on_a_tiny_llama():
    """3 seeds × 6 steps on one batch: the mean decrease must exceed 3 standard errors of the
    seeds' decreases (a one-sided t-test at about 5 %, 2 degrees of freedom, needs 2.9)."""
    ids = batch(shape=(2, 10))
    drops = []
    for seed in range(3):
        model = build("llama")
        opt = zoengine.SparseMeZO(model.named_parameters(), lr=1e-2, eps=1e-3, sparsity=0.5,
                                  seed=seed, backend="native")
        closure = lambda model=model: model(input_ids=ids, labels=ids).loss  # noqa: E731
        first = float(closure().detach())
        for _ in range(6):
            opt.step(closure)
        drops.append(first - float(closure().detach()))
    drops = torch.tensor(drops)
    assert float(drops.mean()) > 3 * float(drops.std()) / math.sqrt(3)
