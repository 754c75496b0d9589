"""DiZO: reduction to MeZO, projection geometry, clips, search descent, budget, errors."""

import copy
import itertools
import math

import pytest
import torch
from helpers import tiny_llama

import zoengine
from zoengine.optim import DiZO


class Attn(torch.nn.Module):
    """Names like an OPT/LLaMA attention block: self_attn.{q,k,v}_proj plus an MLP."""

    def __init__(self):
        super().__init__()
        self.self_attn = torch.nn.ModuleDict(
            {n: torch.nn.Linear(4, 4) for n in ("q_proj", "k_proj", "v_proj")})
        self.mlp = torch.nn.Linear(4, 1)

    def forward(self, x):
        a = self.self_attn
        return self.mlp(torch.tanh(a["q_proj"](x) + a["k_proj"](x) * a["v_proj"](x)))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)


def _closure(model, seed=0):
    x, y = _data(seed)
    return lambda: torch.nn.functional.mse_loss(model(x), y)


def _fresh_batches(model):
    counter = itertools.count(100)
    return lambda: _closure(model, next(counter))


def test_without_projection_equals_mezo_bit_for_bit():
    torch.manual_seed(0)
    a = Attn()
    b = copy.deepcopy(a)
    oa = zoengine.MeZO(a.named_parameters(), lr=0.05, eps=1e-2, seed=2)
    ob = DiZO(b.named_parameters(), lr=0.05, eps=1e-2, seed=2, interval=1000)
    for _ in range(8):
        oa.step(_closure(a))
        ob.step(_closure(b))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_projection_geometry_and_untouched_tensors():
    torch.manual_seed(0)
    model = Attn()
    opt = DiZO(model.named_parameters(), lr=0.05, eps=1e-2, interval=5, tau=0.2,
               projection_closure=_fresh_batches(model))
    for _ in range(4):
        opt.step(_closure(model))
    anchors = {n: opt.state[p]["dizo_anchor"] for n, p, _ in opt.projected}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(_closure(model))  # step 5: ZO step, then the projection
    assert opt.state["zo"]["dizo_searches"] == 1
    # replay the 5th ZO step alone to separate it from the projection
    ref = copy.deepcopy(model)
    ref.load_state_dict({n: before[n] for n in before})
    ref_opt = zoengine.MeZO(ref.named_parameters(), lr=0.05, eps=1e-2)
    ref_opt.state["zo"]["step"] = 4
    ref_opt.step(_closure(ref))
    stepped = dict(ref.named_parameters())
    gammas = opt.state["zo"]["dizo_gamma"]
    names = [n for n, _, _ in opt.projected]
    assert sorted(names) == ["self_attn.k_proj.weight", "self_attn.v_proj.weight"]
    for (n, p, _), gamma in zip(opt.projected, gammas):
        d_before = stepped[n].detach().double() - anchors[n].double()
        d_after = p.detach().double() - anchors[n].double()
        assert d_after.norm().item() == pytest.approx(gamma, rel=1e-5)
        cos = (d_after * d_before).sum() / (d_after.norm() * d_before.norm())
        assert cos.item() == pytest.approx(1.0, abs=1e-6)
        ratio = gamma / d_before.norm().item()
        assert 0.8 - 1e-6 <= ratio <= 1.2 + 1e-6
    for n, p in model.named_parameters():
        if n not in names:
            assert torch.equal(p, stepped[n]), n


def test_constant_loss_projection_is_identity_and_clip_holds():
    torch.manual_seed(0)
    model = Attn()
    opt = DiZO(model.named_parameters(), lr=0.05, eps=1e-2, interval=3, tau=0.1,
               projection_closure=lambda: (lambda: torch.tensor(1.0)))
    for _ in range(2):
        opt.step(_closure(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = opt._deltas_norms()
    ratios = opt.project()
    assert ratios == pytest.approx([1.0] * len(ratios), abs=1e-6)
    assert opt.state["zo"]["dizo_gamma"] == pytest.approx(norms, rel=1e-9)  # re-initialised
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    assert len(opt.last_draws) == opt.search_iters * len(opt.projected)
    for step, bound in opt.last_draws:  # every draw respects |ε_p ζ| <= τ ‖Δ‖
        assert abs(step) <= bound * (1 + 1e-12)
    assert any(abs(step) >= bound * (1 - 1e-9) for step, bound in opt.last_draws)  # clip bit


def test_search_moves_ratios_toward_the_best_scaling():
    """f = Σ_l ‖θ_l − (θ0_l + c_l Δ_l)‖²: the best ratio of tensor l is c_l."""
    torch.manual_seed(0)
    model = Attn()
    opt = DiZO(model.named_parameters(), lr=0.0, eps=1e-2, interval=10**6, tau=0.3,
               search_iters=60, proj_lr=2.0, projection_closure=None)
    targets = {}
    for c, (n, p, _) in zip((1.25, 0.8), opt.projected):  # displace, then aim at c·Δ
        delta = torch.randn_like(p) * 0.1
        p.data.add_(delta)
        targets[n] = (opt.state[p]["dizo_anchor"] + c * delta, c)
    params = dict(model.named_parameters())
    f = lambda: sum(((params[n] - t) ** 2).sum() for n, (t, _) in targets.items())
    opt.projection_closure = lambda: f
    ratios = opt.project()
    for r, (n, (_, c)) in zip(ratios, targets.items()):
        assert abs(r - c) < abs(1 - c) / 2, (n, r, c)  # at least halfway from 1 to c


def test_forward_pass_budget():
    torch.manual_seed(0)
    model = Attn()
    calls = {"step": 0, "search": 0}

    def counted(kind, fn):
        def wrapped():
            calls[kind] += 1
            return fn()
        return wrapped

    interval, iters = 4, 3
    opt = DiZO(model.named_parameters(), lr=0.01, eps=1e-2, interval=interval,
               search_iters=iters,
               projection_closure=lambda: counted("search", _closure(model, 7)))
    for _ in range(2 * interval):
        opt.step(counted("step", _closure(model)))
    assert calls == {"step": 2 * 2 * interval, "search": 2 * 2 * iters}


def test_state_dict_round_trip_includes_anchors_and_gamma():
    torch.manual_seed(0)
    a = Attn()
    b = copy.deepcopy(a)
    oa = DiZO(a.named_parameters(), lr=0.05, eps=1e-2, interval=3,
              projection_closure=_fresh_batches(a))
    for _ in range(7):
        oa.step(_closure(a))
    ob = DiZO(b.named_parameters(), lr=0.05, eps=1e-2, interval=3,
              projection_closure=_fresh_batches(b))
    for _ in range(4):
        ob.step(_closure(b))
    saved = copy.deepcopy((b.state_dict(), ob.state_dict()))
    torch.manual_seed(5)
    c = Attn()
    oc = DiZO(c.named_parameters(), lr=0.05, eps=1e-2, interval=3)
    c.load_state_dict(saved[0])
    oc.load_state_dict(saved[1])
    counter = itertools.count(100 + 10)  # b used 10 search batches (one search) so far
    oc.projection_closure = lambda: _closure(c, next(counter))
    for _ in range(3):
        oc.step(_closure(c))
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_works_with_kerzoo_and_pezo_estimators_and_llama_names():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    closure = lambda: model(input_ids=ids, labels=ids).loss
    for kw in (dict(estimator="kernel"), dict(noise="pool", pool_size=4099)):
        opt = DiZO(model.named_parameters(), lr=1e-3, eps=1e-3, interval=2, search_iters=2,
                   projection_closure=lambda: closure, **kw)
        names = [n for n, _, _ in opt.projected]
        assert names and all(("k_proj" in n or "v_proj" in n) for n in names)
        assert opt.anchor_bytes() == sum(p.numel() * 4 for _, p, _ in opt.projected)
        for _ in range(2):
            assert math.isfinite(opt.step(closure).item())
        assert opt.state["zo"]["dizo_searches"] == 1


def test_lora_tensors_are_selected():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    opt = DiZO(lora.named_parameters(), lr=1e-3, interval=5)
    names = [n for n, _, _ in opt.projected]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    base = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    ids = torch.randint(0, 128, (2, 8))
    closure = lambda: lora(input_ids=ids, labels=ids).loss
    opt = DiZO(lora.named_parameters(), lr=1e-2, eps=1e-2, interval=2, search_iters=2,
               projection_closure=lambda: closure)
    for _ in range(2):
        assert math.isfinite(opt.step(closure).item())
    assert opt.state["zo"]["dizo_searches"] == 1
    for n, p in lora.named_parameters():  # the base model is never touched
        if n in base:
            assert torch.equal(p, base[n]), n


def test_errors():
    model = Attn()
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        DiZO(model.named_parameters(), projected=r"nothing_here")
    with pytest.raises(ValueError, match="named_parameters"):
        DiZO(model.parameters())
    with pytest.raises(ValueError, match="^tau="):
        DiZO(model.named_parameters(), tau=1.5)
    with pytest.raises(ValueError, match="^interval="):
        DiZO(model.named_parameters(), interval=0)
    opt = DiZO(model.named_parameters(), lr=0.01, interval=1)
    with pytest.raises(RuntimeError, match="projection_closure"):
        opt.step(_closure(model))


# ---- the search's data and non-finite losses ---------------------------------------------------

def _nan_on(calls, bad, model, seed=7):
    """A factory of closures whose n-th evaluation (over all closures) returns NaN if n in bad."""
    inner = _closure(model, seed)

    def make():
        def closure():
            calls.append(len(calls))
            return torch.tensor(float("nan")) if len(calls) - 1 in bad else inner()
        return closure
    return make


def _stepped(opt, model, n):
    for s in range(n):
        opt.step(_closure(model, s))


def test_skip_mode_drops_a_nonfinite_search_iteration():
    torch.manual_seed(0)
    model = Attn()
    calls = []
    opt = DiZO(model.named_parameters(), lr=0.05, eps=1e-2, interval=2, search_iters=3,
               nonfinite="skip", projection_closure=_nan_on(calls, {2}, model))
    _stepped(opt, model, 2)  # search: iteration 0 (calls 0, 1), 1 (call 2: NaN, ℓ₋ spared), 2
    zo = opt.state["zo"]
    assert len(calls) == 5
    assert (zo["dizo_searches"], zo["dizo_skipped_iters"], zo["dizo_pending"]) == (1, 1, False)
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())


def test_all_skipped_search_leaves_weights_exact_and_is_retried():
    torch.manual_seed(0)
    model = Attn()
    calls = []
    opt = DiZO(model.named_parameters(), lr=0.05, eps=1e-2, interval=2, search_iters=3,
               nonfinite="skip", projection_closure=_nan_on(calls, {0, 1, 2}, model))
    _stepped(opt, model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # replay step 2 alone on a copy to know the weights after the ZO step, before the search
    ref = copy.deepcopy(model)
    ref_opt = zoengine.MeZO(ref.named_parameters(), lr=0.05, eps=1e-2)
    ref_opt.state["zo"]["step"] = 1
    ref_opt.step(_closure(ref, 1))
    opt.step(_closure(model, 1))  # step 2: every search iteration NaN, all skipped
    zo = opt.state["zo"]
    assert (zo["dizo_searches"], zo["dizo_skipped_iters"], zo["dizo_pending"]) == (0, 3, True)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n  # bit-exact: the scaled evaluations were undone exactly
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    opt.step(_closure(model, 2))  # step 3: not a multiple of 2, but the projection is due
    assert (zo["dizo_searches"], zo["dizo_skipped_iters"], zo["dizo_pending"]) == (1, 3, False)


def test_raise_mode_restores_weights_and_keeps_the_projection_due():
    torch.manual_seed(0)
    model = Attn()
    calls = []
    opt = DiZO(model.named_parameters(), lr=0.05, eps=1e-2, interval=1, search_iters=2,
               projection_closure=_nan_on(calls, {1}, model))
    ref = copy.deepcopy(model)
    zoengine.MeZO(ref.named_parameters(), lr=0.05, eps=1e-2).step(_closure(ref, 0))
    with pytest.raises(zoengine.NonFiniteLossError, match="stays due"):
        opt.step(_closure(model, 0))
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    assert opt.state["zo"]["dizo_pending"] is True
    opt.step(_closure(model, 1))
    assert opt.state["zo"]["dizo_searches"] == 1 and opt.state["zo"]["dizo_pending"] is False


def test_plain_loss_closure_still_works_with_a_deprecation_warning():
    torch.manual_seed(0)
    model = Attn()
    calls = []
    inner = _closure(model, 7)

    def plain():  # returns the loss: a closure, not a factory of closures
        calls.append(1)
        return inner()

    opt = DiZO(model.named_parameters(), lr=0.05, eps=1e-2, interval=2, search_iters=3,
               projection_closure=plain)
    with pytest.warns(DeprecationWarning, match="projection_closure=lambda: closure"):
        _stepped(opt, model, 2)
    assert opt.state["zo"]["dizo_searches"] == 1
    assert len(calls) == 1 + 2 * 3  # the first call tells it apart (its loss is discarded)
    _stepped(opt, model, 2)
    assert opt.state["zo"]["dizo_searches"] == 2 and len(calls) == 1 + 2 * 2 * 3


def test_iterators_of_closures_and_bad_sources():
    torch.manual_seed(0)
    model = Attn()
    opt = DiZO(model.named_parameters(), lr=0.05, eps=1e-2, interval=1, search_iters=2,
               projection_closure=[_closure(model, 3), _closure(model, 4)])
    opt.step(_closure(model))
    assert opt.state["zo"]["dizo_searches"] == 1
    with pytest.raises(RuntimeError, match="exhausted"):
        opt.step(_closure(model))
    with pytest.raises(TypeError, match="loss closures"):  # a list: checked at construction
        DiZO(model.named_parameters(), lr=0.05, interval=1, projection_closure=[{"x": 1}])
    opt = DiZO(model.named_parameters(), lr=0.05, interval=1, projection_closure=lambda: "x")
    with pytest.raises(ValueError, match="projection_closure"):
        opt.step(_closure(model))


def test_all_preset_projects_every_trainable_tensor_and_auto_does_not():
    head = torch.nn.Linear(4, 2)
    named = list(head.named_parameters())
    with pytest.raises(ValueError, match="'all'"):
        DiZO(named)  # auto: no attention or LoRA names; never a silent full copy
    opt = DiZO(named, projected="all")
    assert [n for n, _, _ in opt.projected] == ["weight", "bias"]
    with pytest.raises(ValueError, match="exact_restore"):
        DiZO(named, projected="all", exact_restore=1)
