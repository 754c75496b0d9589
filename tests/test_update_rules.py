"""Update rules (``ZO(update=...)``): each rule's arithmetic equals torch.optim's on the same
estimate ĝ, the estimate equals a float64 re-computation from the noise contract, masks stay
exact, lr = 0 moves nothing, resume and journal replay are bit-exact, the conservative rule
never keeps a worse point, and the planner, the registry and the CLI know them."""

import copy
import math

import pytest
import torch
from helpers import regression_batch, tiny_mlp

import zoengine
from zoengine import journal as J
from zoengine.kernels import reference
from zoengine.kernels.keys import tensor_keys
from zoengine.noise import generate
from zoengine.optim import ZO, create
from zoengine.optim.updates import adam_step_bound, estimate

torch.set_num_threads(1)
RULES = ("momentum", "sign", "adam")


def _closure(model, seed):
    x, y = regression_batch(seed=seed)
    return lambda: torch.nn.functional.mse_loss(model(x), y)


def _torch_rule(rule, p, wd):
    """torch's own optimizer for ``rule`` on the single tensor ``p`` (for-loop kernels)."""
    if rule == "adam":
        return torch.optim.Adam([p], lr=LR, weight_decay=wd, foreach=False)
    return torch.optim.SGD([p], lr=LR, momentum=0.9 if rule == "momentum" else 0.0,
                           weight_decay=wd, foreach=False)


LR, EPS = 1e-2, 1e-3


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("rule", RULES)
def test_rule_equals_torch_optimizer_on_the_same_estimate(rule, wd, n):
    """Three steps of ZO(update=rule) equal, bit for bit, torch.optim fed ĝ at the restored
    θ: the restored θ comes from a twin stepping with sgd and lr = 0 (the same walk, the same
    restore arithmetic), ĝ from the reference kernels (``estimate``)."""
    model, twin = tiny_mlp(0), tiny_mlp(0)
    names = [n_ for n_, _ in model.named_parameters()]
    opt = ZO(model.named_parameters(), lr=LR, eps=EPS, weight_decay=wd, n_samples=n,
             backend="reference", update=rule, seed=3)
    shadows = {nm: p.detach().clone().requires_grad_(True) for nm, p in model.named_parameters()}
    torch_opts = {nm: _torch_rule(rule, s, wd) for nm, s in shadows.items()}
    for t in range(3):
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
                q.copy_(p)
        ref = ZO(twin.named_parameters(), lr=0.0, eps=EPS, n_samples=n, backend="reference",
                 seed=3)
        ref.state["zo"]["step"] = t
        ref.step(_closure(twin, t))
        opt.step(_closure(model, t))
        grads = opt.state["zo"]["projected_grads"]
        assert grads == ref.state["zo"]["projected_grads"]
        keys = tensor_keys(names)
        for (nm, p), (_, q), key in zip(model.named_parameters(), twin.named_parameters(), keys):
            s = shadows[nm]
            d = estimate(reference, q, key, 0, _Group(), [g / n for g in grads], seed=3,
                         step=t, dist="normal")
            with torch.no_grad():
                s.copy_(q)
            s.grad = torch.sign(d + wd * q.detach()) if rule == "sign" else d
            if rule == "sign":
                torch_opts[nm].param_groups[0]["weight_decay"] = 0.0  # inside the sign
            torch_opts[nm].step()
            assert torch.equal(p.detach(), s.detach()), (rule, nm, t)


class _Group:
    offsets = None


def test_estimate_equals_a_float64_recomputation():
    """ĝ = Σ c_k z_k, z_k from ``zoengine.noise.generate``: fp32 accumulation of n products
    is within n·2^-24·Σ|c_k z_k| of the float64 sum (each product and sum rounded once)."""
    p = torch.zeros(3, 1000)
    coefs = [0.7, -1.3, 2.1]
    d = estimate(reference, p, 12345, 0, _Group(), coefs, seed=5, step=9, dist="normal")
    zs = [generate(p.numel(), seed=5, step=9, sample=k, key=12345).double().view(3, 1000)
          for k in range(3)]
    exact = sum(c * z for c, z in zip(coefs, zs))
    bound = 3 * 2.0**-24 * sum(abs(c) * z.abs() for c, z in zip(coefs, zs))
    assert bool(((d.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("rule", RULES + ("conservative",))
def test_lr_zero_moves_nothing_but_the_restore(rule):
    """lr = 0: θ equals what sgd with lr = 0 leaves (the restored θ), bit for bit."""
    a, b = tiny_mlp(1), tiny_mlp(1)
    opt_a = ZO(a.parameters(), lr=0.0, update=rule, backend="reference")
    opt_b = ZO(b.parameters(), lr=0.0, backend="reference")
    for t in range(3):
        opt_a.step(_closure(a, t))
        opt_b.step(_closure(b, t))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("rule", ("sgd",) + RULES + ("conservative",))
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_masked_weights_never_move(rule, backend):
    """A dict mask on non-zero weights with weight decay (not conservative: it refuses
    decay): masked elements are bit-identical after every step, decay included (the fused
    sgd kernels once decayed them); the rest move."""
    model = tiny_mlp(2)
    w = model[0].weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    before = w.detach().clone()
    wd = 0.0 if rule == "conservative" else 0.1
    opt = ZO(model.named_parameters(), lr=0.05, weight_decay=wd, update=rule, backend=backend,
             masks={"0.weight": mask})
    for t in range(4):
        opt.step(_closure(model, t))
    assert torch.equal(w.detach()[~mask], before[~mask])
    assert not torch.equal(w.detach()[mask], before[mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_resume_is_bit_exact_and_keeps_buffer_dtype(tmp_path, rule, dtype):
    """4 steps = 2 steps, state_dict through torch.save, a fresh optimizer, 2 steps. Buffers
    of bf16 weights stay fp32 through load_state_dict (torch would cast them to bf16)."""
    def run(model, opt, steps):
        for t in steps:
            opt.step(_closure_dtype(model, t, dtype))

    full = tiny_mlp(3).to(dtype)
    run(full, ZO(full.named_parameters(), lr=1e-2, update=rule, seed=1), range(4))
    half = tiny_mlp(3).to(dtype)
    opt = ZO(half.named_parameters(), lr=1e-2, update=rule, seed=1)
    run(half, opt, range(2))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt2 = ZO(half.named_parameters(), lr=1e-2, update=rule, seed=1)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    buf = opt2.state[half[0].weight]["momentum_buffer" if rule == "momentum" else "exp_avg"]
    assert buf.dtype == torch.float32
    run(half, opt2, range(2, 4))
    for p, q in zip(full.parameters(), half.parameters()):
        assert torch.equal(p, q)


def _closure_dtype(model, seed, dtype):
    x, y = regression_batch(seed=seed)
    return lambda: torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def test_a_checkpoint_of_another_rule_is_refused():
    model = tiny_mlp(0)
    opt = ZO(model.parameters(), lr=1e-2, update="adam")
    opt.step(_closure(model, 0))
    other = ZO(model.parameters(), lr=1e-2, update="momentum")
    with pytest.raises(ValueError, match="update: saved 'adam', this optimizer 'momentum'"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("make", [
    lambda ps: ZO(ps, lr=1e-2, update="adam", n_samples=2, weight_decay=0.01),
    lambda ps: ZO(ps, lr=1e-2, update="conservative"),
    lambda ps: zoengine.MeZO(ps, lr=1e-2, update="momentum"),
    lambda ps: zoengine.KerZOO(ps, lr=1e-2, update="sign"),
    lambda ps: zoengine.PeZO(ps, lr=1e-2, update="adam", pool_size=97),
    lambda ps: zoengine.DiZO(ps, lr=1e-2, update="momentum", interval=2,
                             projected=r"\.weight$"),
], ids=["zo-adam-n2", "conservative", "mezo-momentum", "kerzoo-sign", "pezo-adam",
        "dizo-momentum"])
def test_journal_replay_is_bit_exact(tmp_path, make):
    model = tiny_mlp(4)
    start = copy.deepcopy(model)
    opt = make(list(model.named_parameters()))
    opt.set_journal(tmp_path / "j")
    opt.set_batch_source(lambda step, k: _closure(model, 100 + step * 10 + k))
    for t in range(5):
        opt.step(_closure(model, t))
    opt.close_journal()
    J.replay(list(start.named_parameters()), tmp_path / "j")
    for p, q in zip(model.parameters(), start.parameters()):
        assert torch.equal(p, q)


def test_conservative_never_keeps_a_worse_point():
    """On one fixed batch, the loss after each step is at most the loss at the restored θ
    (the rule keeps the best of θ, θ ∓ lr·ĝ), even at an lr where plain SGD diverges; each
    step costs 2n + 3 evaluations."""
    calls = [0]
    model = tiny_mlp(5)
    base = _closure(model, 0)

    def closure():
        calls[0] += 1
        return base()

    opt = ZO(model.parameters(), lr=5.0, update="conservative", backend="reference")
    assert opt.extra_evaluations() == 3
    for _ in range(10):
        before, slack = _loss_and_restore_slack(model, base)
        opt.step(closure)
        assert float(base().detach()) <= before + slack
    assert calls[0] == 10 * 5
    sgd = tiny_mlp(5)
    start = float(_closure(sgd, 0)().detach())
    ZO(sgd.parameters(), lr=5.0).step(_closure(sgd, 0))
    assert float(_closure(sgd, 0)().detach()) > start  # the same lr without the guard: worse


def _loss_and_restore_slack(model, loss_fn):
    """L(θ) and how much the restore's rounding can change it: θ ± ε·z moves leave each
    element within 3 roundings of |θ| + 2ε·max|z| (≤ 3·2^-24 relative), so L moves by at most
    ‖∇L‖₁ times that, plus the fp32 loss's own rounding (16 squared terms: 32·2^-24·L)."""
    model.zero_grad()
    with torch.enable_grad():
        loss = loss_fn()
        loss.backward()
    zmax = math.sqrt(50 * math.log(2))  # the contract's cut of |z|
    slack = sum(float(p.grad.abs().sum()) * 3 * 2.0**-24
                * (float(p.detach().abs().max()) + 2 * 1e-3 * zmax) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), slack + 32 * 2.0**-24 * float(loss.detach())


def test_adam_step_bound_holds():
    """Adam's |Δθ|/lr never exceeds ``adam_step_bound`` on adversarial gradient sequences
    (a spike after tiny gradients is the worst case of the moment ratio)."""
    betas = (0.9, 0.999)
    p = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1.0, betas=betas, eps=0.0, foreach=False)
    seq = [1e-6] * 20 + [1.0] + [1e-6] * 5
    for t, g in enumerate(seq, start=1):
        before = p.detach().clone()
        p.grad = torch.full((4,), g)
        opt.step()
        assert float((p.detach() - before).abs().max()) <= adam_step_bound(betas, t) * (1 + 1e-6)
    assert math.isinf(adam_step_bound((0.99, 0.9), 1))  # β1 ≥ sqrt(β2): no bound claimed


@pytest.mark.parametrize("kwargs, match", [
    (dict(update="nesterov"), "update='nesterov'"),
    (dict(update="momentum", momentum=1.0), r"momentum=1.0: must be in \[0, 1\)"),
    (dict(update="adam", betas=(0.9,)), "betas=.*two numbers"),
    (dict(update="adam", adam_eps=0.0), "adam_eps"),
    (dict(update="adam", stochastic_rounding=True), "only the fused sgd"),
    (dict(update="conservative", weight_decay=0.1), "pass weight_decay=0"),
])
def test_bad_update_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZO(tiny_mlp(0).parameters(), lr=1e-2, **kwargs)


def test_zo_bench_names_and_the_planner():
    from zoengine.sparsity import memory

    ps = list(tiny_mlp(0).named_parameters())
    assert create("zo-adam", ps, lr=1e-3).update.name == "adam"
    assert create("zo-sgd-mmt", ps, lr=1e-3).update.name == "momentum"
    with pytest.raises(ValueError, match="fixes update='adam'"):
        create("zo-adam", ps, update="sign")
    shape = memory.ModelShape(params=1000, hidden=8, intermediate=16, vocab=50, layers=1,
                              kv_dim=8, largest_tensor=400)
    adam = memory.extras_bytes(shape, "zo-adam", "bfloat16")
    assert adam["update_buffers"] == 2 * 4 * 1000 and adam["update_scratch"] == 4 * 400
    assert "update_buffers" not in memory.extras_bytes(shape, "zo-sgd-sign", "float32")
    assert memory.extras_bytes(shape, "zo-sgd-mmt", "float32")["update_buffers"] == 4 * 1000


@pytest.mark.interpreter
@pytest.mark.parametrize("rule", RULES + ("conservative",))
def test_triton_backend_agrees_with_the_reference(rule):
    """The Triton kernels (under TRITON_INTERPRET=1 without a GPU) compute the same rule: with
    uniform z (bit-identical across backends, docs/backends.md) three steps agree with the
    reference to within a few fp32 ulps of each weight per step (the kernels may fuse a
    multiply-add the reference rounds twice: ≤ 2 roundings per pass, 3 passes a step, each of
    at most R = |θ₀| + Σ_t |θ_t − θ_(t−1)| + ε·|z|, the path's largest magnitude measured on the
    reference run); masked weights stay bit-identical on both."""
    models, opts = [], []
    for backend in ("reference", "triton"):
        m = tiny_mlp(6)
        mask = torch.ones_like(m[0].weight, dtype=torch.bool)
        mask[:, 0] = False
        wd = 0.0 if rule == "conservative" else 0.05
        opts.append(zoengine.MeZO(m.named_parameters(), lr=1e-2, weight_decay=wd,
                                  dist="uniform", update=rule, backend=backend,
                                  masks={"0.weight": mask}))
        models.append(m)
    before = models[0][0].weight.detach().clone()
    path = [p.detach().abs().clone() for p in models[0].parameters()]
    for t in range(3):
        last = [p.detach().clone() for p in models[0].parameters()]
        for m, opt in zip(models, opts):
            opt.step(_closure(m, t))
        for r, p, q in zip(path, models[0].parameters(), last):
            r.add_((p.detach() - q).abs())
    for p, q, r in zip(models[0].parameters(), models[1].parameters(), path):
        tol = 3 * 3 * 2 * 2.0**-24 * (r + 1e-3 * math.sqrt(3.0))
        assert bool(((p - q).abs() <= tol).all()), rule
    for m in models:
        assert torch.equal(m[0].weight.detach()[:, 0], before[:, 0])
