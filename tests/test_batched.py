"""``opt.step_batched``: a step's 2n evaluations as one forward, rows grouped by perturbation.

The reference is ``opt.step`` on the same model with the one-group closure ``closure(1)``: the
batched step must compute the same losses (to the rounding of a different evaluation order),
hence the same update, on every architecture of the zoo, for low-rank and full-rank noise; it
must refuse, with weights unchanged, wherever it could not keep the groups apart.
"""

import copy

import archs
import pytest
import torch
from torch import nn

import zoengine
from zoengine.journal import replay
from zoengine.optim import BatchedEvaluationError, group_losses, tile_batch
from zoengine.optim.virtual import VirtualModel

torch.set_num_threads(1)
U64, U32 = 2.0**-53, 2.0**-24
LR, EPS = 1e-3, 1e-3
EPS32 = 1e-2  # fp32 models: ε large enough that g stands 10× above 4·K·u32·|ℓ|/ε
# The batched and one-group forwards evaluate the same weights; their losses differ by the
# rounding of another evaluation order (a displaced bias added after x·Wᵀ instead of inside
# it; other product shapes): at most K·u relative per dot product of length K ≤ 64 here, which
# bounds each loss's difference by 64·u·|ℓ| and each g = (ℓ₊ − ℓ₋)/(2ε) by 64·u·|ℓ|/ε.
K = 64


def lm(name, dtype):
    model = archs.build(name).to(dtype)
    ids = archs.batch()
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # padding: the groups' masks must follow their rows

    def closure(groups):
        t, am = tile_batch(ids, groups), tile_batch(mask, groups)
        return group_losses(model(input_ids=t, attention_mask=am).logits, t, groups)
    return model, closure


def make(model, **kw):
    eps = EPS if next(model.parameters()).dtype == torch.float64 else EPS32
    opt = zoengine.ZO(model.named_parameters(), seed=3, **{
        "lr": LR, "eps": eps, "noise": "lowrank", "rank": 2, "n_samples": 2, **kw})
    opt.attach_virtual(model)
    return opt


def same_bits(a, b) -> bool:
    return all(torch.equal(p.detach().view(-1).view(torch.uint8), q.detach().view(-1).view(
        torch.uint8)) for p, q in zip(a.parameters(), b.parameters()))


def run_both(name, dtype, steps=2, **kw):
    """(batched model, one-group model, [(g batched, g one-group, max |ℓ|)] per step)."""
    a, ca = lm(name, dtype)
    b, cb = lm(name, dtype)
    oa, ob = make(a, **kw), make(b, **kw)
    out = []
    for _ in range(steps):
        la, lb = float(oa.step_batched(ca)), float(ob.step(lambda: cb(1)))
        out.append((list(oa.state["zo"]["projected_grads"]),
                    list(ob.state["zo"]["projected_grads"]), max(abs(la), abs(lb))))
    return a, b, out, oa


def assert_same_step(a, b, out, u, opt):
    tol_g, eps = 0.0, opt.param_groups[0]["eps"]
    for ga, gb, loss in out:
        tol_g = max(tol_g, 4 * K * u * loss / eps)  # 4 |ℓ| bounds each of the 2n losses here
        assert ga == pytest.approx(gb, rel=0, abs=tol_g)
    # the test can tell: an error in a group's perturbation moves g by about |g|
    assert max(abs(v) for _, gb, _ in out for v in gb) >= 10 * tol_g
    # θ moved by lr·Σg·z/n: a g off by tol_g moves θ by ≤ lr·tol_g·max|z| per step
    move = len(out) * LR * tol_g * opt._z_bound()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert float((p - q).detach().abs().max()) <= move + 4 * u * float(q.detach().abs().max()), n


# low-rank noise on every architecture; full-rank noise (every module grouped by copies) on one
# of each layout: LLaMA, GPT-2's Conv1D and broadcast positions, OPT's learned positions,
# Mixtral's experts
CASES = [(n, "lowrank") for n in archs.ARCHS if n != "llama4"] + [
    (n, "normal") for n in ("llama", "gpt2", "opt", "mixtral")]


@pytest.mark.parametrize("name,noise", CASES)
def test_batched_step_equals_the_one_group_steps(name, noise):
    moe = name in ("mixtral", "qwen2_moe", "qwen3_moe")  # grouped_mm: no float64 kernel
    dtype, u = (torch.float32, U32) if moe else (torch.float64, U64)
    a, b, out, opt = run_both(name, dtype, steps=1, noise=noise)
    assert opt.inplace_fallback == []
    assert_same_step(a, b, out, u, opt)


@pytest.mark.parametrize("kw", [dict(estimator="kernel"), dict(update="adam"),
                                dict(update="conservative"), dict(n_samples=1),
                                dict(n_samples=3, weight_decay=0.1)])
def test_estimators_update_rules_and_sample_counts(kw):
    a, b, out, opt = run_both("llama", torch.float64, steps=3, **kw)
    assert_same_step(a, b, out, U64, opt)


def test_pezo_reused_noise_is_grouped_too():
    a, ca = lm("gpt2", torch.float64)
    b, cb = lm("gpt2", torch.float64)
    oa, ob = (zoengine.PeZO(m.named_parameters(), lr=LR, eps=EPS, n_samples=2) for m in (a, b))
    oa.attach_virtual(a)
    ob.attach_virtual(b)
    for _ in range(2):
        oa.step_batched(ca)
        ob.step(lambda: cb(1))
    ga, gb = oa.state["zo"]["projected_grads"], ob.state["zo"]["projected_grads"]
    assert ga == pytest.approx(gb, rel=0, abs=4 * K * U64 * 10 / EPS)


def test_masked_weights_stay_exact_and_are_grouped_by_copies():
    name = "model.layers.0.mlp.up_proj.weight"
    shape = archs.build("llama").get_parameter(name).shape
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
    w0 = archs.build("llama").double().get_parameter(name).detach().clone()
    a, b, out, opt = run_both("llama", torch.float64, masks={name: keep})
    assert_same_step(a, b, out, U64, opt)
    w = a.get_parameter(name)
    assert torch.equal(w[~keep], w0[~keep]) and not torch.equal(w[keep], w0[keep])


@pytest.mark.parametrize("name", ["llama", "gpt2"])  # nn.Linear; Conv1D
def test_lowrank_linears_are_rank_r_terms_not_copies(monkeypatch, name):
    copied = []
    real = VirtualModel._perturbed
    monkeypatch.setattr(VirtualModel, "_perturbed",
                        lambda self, p: copied.append(p.dim()) or real(self, p))
    model, closure = lm(name, torch.float32)
    opt = make(model, n_samples=4)
    opt.step_batched(closure, check=False)
    assert copied and set(copied) == {1}  # norms, biases: no 2-D weight materialised


def test_lr0_leaves_theta_bit_identical_and_replay_is_bit_exact(tmp_path):
    model, closure = lm("opt", torch.float32)
    start = copy.deepcopy(model)
    still = make(model, lr=0.0)
    still.step_batched(closure)
    assert same_bits(model, start)
    opt = zoengine.optim.create("mezo-lowrank", model.named_parameters(), lr=LR, eps=EPS,
                                rank=2, resample_every=2, n_samples=3)
    opt.attach_virtual(model)
    opt.set_journal(tmp_path / "j.zoj")
    for _ in range(3):
        opt.step_batched(closure)
    opt.close_journal()
    replay(start, tmp_path / "j.zoj")  # replays with one-group steps from the recorded losses
    assert same_bits(start, model)


class _Swap(nn.Module):
    """Reverses the batch's rows: a model whose rows leave their groups."""

    def forward(self, x):
        return x.flip(0)


def test_a_model_that_moves_rows_across_groups_is_refused_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), _Swap(), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(8, 6), torch.randn(8, 1)

    def closure(groups):
        out = net(tile_batch(x, groups)).view(groups, -1)
        return ((out - y.view(1, -1)) ** 2).mean(1)
    opt = make(net, n_samples=2, rank=1)
    before = copy.deepcopy(net)
    with pytest.raises(BatchedEvaluationError, match="disagrees with one forward"):
        opt.step_batched(closure)
    assert same_bits(net, before)


def test_llama4_experts_are_refused_by_layout_unchanged():
    model, closure = lm("llama4", torch.float32)
    before = copy.deepcopy(model)
    opt = make(model)
    with pytest.raises(BatchedEvaluationError, match="Llama4TextExperts received a first "
                                                     "dimension of"):
        opt.step_batched(closure)
    assert same_bits(model, before)
    opt.step(lambda: closure(1))  # the one-group step still works
    assert not same_bits(model, before)


def test_bad_calls_are_refused_by_name():
    model, closure = lm("llama", torch.float32)
    inplace = zoengine.ZO(model.named_parameters(), lr=LR, noise="lowrank")
    with pytest.raises(ValueError, match="needs opt.attach_virtual"):
        inplace.step_batched(closure)
    dizo = zoengine.DiZO(model.named_parameters(), lr=LR)
    with pytest.raises(ValueError, match="DiZO has a step of its own"):
        dizo.step_batched(closure)
    opt = make(model)
    with pytest.raises(ValueError, match="closure=5"):
        opt.step_batched(5)
    with pytest.raises(ValueError, match="check=1"):
        opt.step_batched(closure, check=1)
    with pytest.raises(ValueError, match=r"returned shape \(1,\) for groups=4"):
        opt.step_batched(lambda g: closure(g)[:1])
    ids = archs.batch()
    with pytest.raises(BatchedEvaluationError, match="not a multiple of the 4"):
        opt.step_batched(lambda g: torch.zeros(g) + model(input_ids=ids).logits.mean())
    assert opt.state["zo"]["step"] == 0


def test_group_losses_equal_the_models_own_loss_per_group():
    model = archs.build("llama").double()
    ids = archs.batch()
    labels = ids.clone()
    labels[1, :4] = -100
    both = group_losses(model(input_ids=tile_batch(ids, 2)).logits, tile_batch(labels, 2), 2)
    own = model(input_ids=ids, labels=labels).loss.detach()  # transformers: fp32
    assert both.dtype == torch.float64 and torch.equal(both[0], both[1])
    # fp32 log-softmax against float64: |Δℓ| ≤ a few u32 per token, averaged
    assert float(both[0]) == pytest.approx(float(own), rel=16 * U32)
    assert tile_batch({"a": ids, "n": 3}, 3)["a"].shape == (9, 9)
    with pytest.raises(ValueError, match="groups=0"):
        tile_batch(ids, 0)
    with pytest.raises(ValueError, match="are not 2 equal groups"):
        group_losses(torch.zeros(3, 4, 5), torch.zeros(3, 4, dtype=torch.long), 2)


def test_distributed_losses_mode_on_a_one_rank_group(tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        a, ca = lm("llama", torch.float64)
        b, cb = lm("llama", torch.float64)
        oa, ob = make(a), make(b)
        ob.set_distributed("losses")  # each of the 2n losses all-reduced, as step's
        for _ in range(2):
            oa.step_batched(ca)
            ob.step_batched(cb)
        assert same_bits(a, b)
        ob.set_distributed("samples")
        with pytest.raises(ValueError, match="use set_distributed\\('losses'\\)"):
            ob.step_batched(cb)
    finally:
        dist.destroy_process_group()
