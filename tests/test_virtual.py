"""Virtual perturbation (``opt.attach_virtual(model)``): θ is never written during the
evaluations (zoengine/optim/virtual.py).

Checked against in-place perturbation (the same losses within the restore drift), against the
noise contract (a perturbed embedding row is θ + εz of that row), and for the properties only
virtual perturbation has: lr = 0 or a skipped step leaves θ bit-identical, and at most one
module's perturbed tensors exist at a time.
"""

import copy
import weakref

import pytest
import torch
from helpers import CONFIGS, tiny_llama, ulp, virtual
from test_noisy_linear import NL, tops  # noqa: F401  (the interpreted Triton modules)

import zoengine
from zoengine.journal import replay
from zoengine.kernels import reference
from zoengine.optim import DiZO
from zoengine.optim.estimators import kernel_weight
from zoengine.optim.virtual import VirtualModel

torch.set_num_threads(2)


def lm_closure(model, ids):
    return lambda: model(input_ids=ids, labels=ids).loss


def batch(vocab=128, seed=3, shape=(3, 9)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def kernel_bound(opt) -> float:
    """max |K_a(r)| over r in [−a, a]: the factor KerZOO's kernel puts on (ℓ₊ − ℓ₋)/(2ε), 1
    without a kernel (the estimator's error scales with it)."""
    if opt.estimator != "kernel" or opt.kernel_order is None:
        return 1.0
    a = opt.r_range
    return max(abs(kernel_weight(a * i / 1000, opt.kernel_order, a)) for i in range(-1000, 1001))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_bits(model, snap) -> bool:
    return all(torch.equal(snap[n].view(-1).view(torch.uint8), p.detach().view(-1).view(
        torch.uint8)) for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_lr0_leaves_weights_bit_identical(dtype, backend):
    model = tiny_llama().to(dtype)
    snap, ids = snapshot(model), batch()
    opt = zoengine.MeZO(model.named_parameters(), lr=0.0, eps=1e-2, backend=backend,
                        stochastic_rounding=dtype != torch.float32)
    opt.attach_virtual(model)
    for _ in range(4):
        opt.step(lm_closure(model, ids))
    assert opt.inplace_fallback == []
    assert same_bits(model, snap)
    # in place, the same steps drift by ~1 ulp (the reason for this mode)
    inplace = zoengine.MeZO(model.named_parameters(), lr=0.0, eps=1e-2, backend=backend)
    for _ in range(4):
        inplace.step(lm_closure(model, ids))
    assert not same_bits(model, snap)


def test_skipped_step_is_a_bit_exact_no_op():
    model = tiny_llama()
    snap, ids, calls = snapshot(model), batch(), []

    def closure():
        calls.append(1)
        loss = model(input_ids=ids, labels=ids).loss
        return loss if len(calls) == 1 else loss * float("nan")

    opt = zoengine.MeZO(model.named_parameters(), lr=1e-2, nonfinite="skip")
    opt.attach_virtual(model)
    assert torch.isnan(opt.step(closure))
    assert opt.state["zo"]["skipped_steps"] == 1 and same_bits(model, snap)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_preset_matches_inplace(name):
    """Same losses and projected gradients as in place (fp32: within the restore drift)."""
    a = tiny_llama()
    b = copy.deepcopy(a)
    ids = batch()
    lr = eps = 1e-3
    va = virtual(CONFIGS[name](a.named_parameters(), lr=lr, eps=eps, seed=5,
                               backend="reference"), a)
    vb = CONFIGS[name](b.named_parameters(), lr=lr, eps=eps, seed=5, backend="reference")
    # Tolerance from a bound (docs/testing.md, "Tolerances"). The two modes evaluate weights
    # that differ by rounding only: in place computes θ − εz as (θ + εz) − 2εz and carries the
    # restore drift, virtual computes θ − εz from θ. Weights a few ulps apart (one ulp ≤ 2u
    # relative, u = 2^-24) are a backward error of the size of the forward's own rounding, so
    # they move the fp32 loss by about what that rounding can: n·u·|L| with n = 64 the longest
    # dot product (intermediate_size; the γ_n bound of an n-term fp32 sum). A difference of the
    # base θ carried from earlier steps moves ℓ₊ and ℓ₋ alike (it cancels in ℓ₊ − ℓ₋ to first
    # order). g = K(r)·(ℓ₊ − ℓ₋)/(2ε), so |Δg| ≤ K_max·2·n·u·|L|/(2ε) = K_max·n·u·|L|/ε: 1.9e-2
    # at |L| ≈ 4.86, ε = 1e-3, K ≡ 1 (KerZOO a = 1: ×7.5). Observed: 0 or one ulp of L over 2ε
    # (2.4e-4) here, ~1e-3 on another machine, where the old fixed 1e-3 (≈ 4 ulps of L over 2ε,
    # fp32 cancellation at this ε) failed by a hair.
    n, tol_g, grads = a.config.intermediate_size, 0.0, []
    for _ in range(3):
        la, lb = float(va.step(lm_closure(a, ids))), float(vb.step(lm_closure(b, ids)))
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)  # ≥ n·u = 3.8e-6 relative
        ga, gb = va.state["zo"]["projected_grads"], vb.state["zo"]["projected_grads"]
        tol_g = max(tol_g, kernel_bound(vb) * n * 2.0**-24 * max(abs(la), abs(lb)) / eps)
        assert ga == pytest.approx(gb, rel=0, abs=tol_g)
        grads.append((list(ga), list(gb)))
    # Still a check: a wrong sign (2|g|) or a lost factor 2 (|g|/2) is ≥ 5 tol_g, since some step
    # has |g| ≥ 10 tol_g (22× to 200× across the presets).
    assert max(abs(v) for _, gb in grads for v in gb) >= 10 * tol_g
    # The weights: Σ_t lr·Δg_t·z plus each mode's rounding (test_hf.drift_tolerance, from the
    # observed Δg_t and the optimizer's bound on |z|).
    from test_hf import drift_tolerance

    r = vb.r_range if vb.estimator == "kernel" else 1.0
    for (pname, pa), pb in zip(a.named_parameters(), b.parameters()):
        tol = drift_tolerance(pa, pb, [g for g, _ in grads], [g for _, g in grads], lr=lr,
                              eps=eps, z_bound=vb._z_bound(), r=r)
        assert float((pa - pb).abs().max()) <= tol, (pname, tol)


def test_bf16_update_is_the_only_write():
    """bf16: virtual θ after a step equals θ0 − lr·g·z rounded once; in place it is off by up
    to one ulp from the restore."""
    model = tiny_llama().to(torch.bfloat16)
    ids, snap = batch(), snapshot(model)
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, backend="reference",
                        seed=1)
    opt.attach_virtual(model)
    opt.step(lm_closure(model, ids))
    g = opt.state["zo"]["projected_grads"]
    names = [n for n, _ in model.named_parameters()]
    keys = zoengine.kernels.keys.tensor_keys(names)
    expect = [snap[n].clone() for n in names]
    reference.restore_update_(expect, keys, seed=1, step=0, eps=0.0, lr=1e-2, grads=g)
    for n, p, e in zip(names, model.parameters(), expect):
        assert torch.equal(p, e), n


def test_embedding_rows_carry_the_contract_noise():
    """An untied embedding is perturbed row by row: the looked-up rows equal those of the
    table perturbed in place by the reference ops."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    emb = model.get_input_embeddings()
    assert emb.weight is not model.lm_head.weight
    ids, seen = batch(), []
    opt = zoengine.MeZO(model.named_parameters(), lr=0.0, eps=0.5, seed=2)
    opt.attach_virtual(model)
    # registered after the optimizer's hooks, so it sees the module's (perturbed) output
    emb.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    opt.step(lm_closure(model, ids))
    # the probe forward and its two comparison calls of this module, then θ ± εz
    assert len(seen) == 5
    table = emb.weight.detach().clone()
    key = zoengine.kernels.keys.tensor_keys(["model.embed_tokens.weight"])
    reference.perturb_([table], key, seed=2, step=0, sample=0, scale=0.5)
    assert torch.equal(seen[-2], table[ids])


def test_masked_zeros_stay_zero_and_unperturbed():
    model = tiny_llama()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p[:, ::2] = 0.0
    ids, seen = batch(), []
    q = model.model.layers[0].self_attn.q_proj
    q.register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, masks="zeros")
    opt.attach_virtual(model)
    for _ in range(2):
        opt.step(lm_closure(model, ids))
    assert all(bool((w[:, ::2] == 0).all()) for w in seen)  # the perturbed copies too
    for p in model.parameters():
        if p.dim() == 2:
            assert bool((p[:, ::2] == 0).all())


class ReadsChildWeight(torch.nn.Module):
    """A parent that reads its child's weight in its own forward (functional code, as some
    models do with a tied head): substituting around the child's forward would miss it."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.nn.functional.linear(x, self.inner.weight, self.inner.bias))


class StaleView(torch.nn.Module):
    """Keeps a view of its weight made at construction and computes with it: a swap of the
    Parameter does not reach the view, so the virtual output is the unperturbed one."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))
        self.flat = self.weight.detach().view(-1)

    def forward(self, x):
        return x @ self.flat.view(4, 4)


def test_a_raw_read_falls_back_in_place_and_is_reported():
    torch.manual_seed(0)
    model = ReadsChildWeight()
    x = torch.randn(5, 3)
    snap = snapshot(model)
    opt = zoengine.MeZO(model.named_parameters(), lr=0.0, eps=1e-3)
    opt.attach_virtual(model)
    assert opt.inplace_fallback == []  # every tensor has an owning module: virtual at first
    with pytest.warns(UserWarning, match="perturbed in place instead"):
        opt.step(lambda: model(x).pow(2).mean())
    assert sorted(opt.inplace_fallback) == ["inner.bias", "inner.weight"]
    report = opt.virtual_report()
    assert "linear" in report["inner.weight"] and "outside the forward" in report["inner.weight"]
    assert report["head.weight"] == "virtual"
    # In place with lr = 0 an element is rounded 6 times (+εz, −2εz, the restore: a product and
    # a sum each), by ≤ ½ ulp of |θ| + 2ε·max|z| each: ≤ 3 ulps of that, elementwise. A restore
    # left out or of the wrong sign is ε·|z| ~ 1e-3: orders of magnitude more.
    reach = 2 * 1e-3 * opt._z_bound()
    for n, p in model.named_parameters():
        if n in opt.inplace_fallback:
            assert bool(((p - snap[n]).abs() <= 3 * ulp(snap[n].abs() + reach)).all()), n
        else:  # never written
            assert torch.equal(p, snap[n]), n


def test_the_probe_finds_a_module_class_that_ignores_the_swap():
    def build():  # built afresh: a deep copy would not keep the view sharing the weight
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), StaleView())

    model, ref, quiet = build(), build(), build()
    x = torch.randn(5, 3)
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=3)
    opt.attach_virtual(model)
    with pytest.warns(UserWarning, match="perturbed in place instead"):
        opt.step(lambda: model(x).pow(2).mean())
    assert opt.inplace_fallback == ["1.weight"]
    assert "StaleView" in opt.virtual_report()["1.weight"]
    # unprobed, the same model is silently wrong: g differs from in place
    blind = zoengine.MeZO(quiet.named_parameters(), lr=1e-2, eps=1e-3, seed=3)
    blind.attach_virtual(quiet, probe=False)
    inplace = zoengine.MeZO(ref.named_parameters(), lr=1e-2, eps=1e-3, seed=3)
    blind.step(lambda: quiet(x).pow(2).mean())
    inplace.step(lambda: ref(x).pow(2).mean())
    g_probed = opt.state["zo"]["projected_grads"][0]
    g_blind = blind.state["zo"]["projected_grads"][0]
    g_inplace = inplace.state["zo"]["projected_grads"][0]
    assert g_probed == pytest.approx(g_inplace, rel=1e-3)  # fp32 cancellation at ε = 1e-3
    assert abs(g_blind - g_inplace) > 0.1 * abs(g_inplace)


def test_register_virtual_and_the_report():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.s

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), Scale())
    x = torch.randn(5, 3)
    opt = zoengine.MeZO(model.named_parameters(), lr=0.1)
    with pytest.raises(ValueError, match="attach_virtual"):
        opt.virtual_report()
    opt.attach_virtual(model)
    assert opt.inplace_fallback == []  # any module reading its own parameter is covered
    opt.register_virtual(model[1], "s")  # already virtual: a no-op
    before = model[1].s.detach().clone()
    opt.step(lambda: model(x).pow(2).mean())
    assert not torch.equal(before, model[1].s)  # updated
    assert set(opt.virtual_report().values()) == {"virtual"}
    with pytest.raises(ValueError, match="register"):
        opt.register_virtual(model[1], "nope")
    with pytest.raises(ValueError, match="probe"):
        zoengine.MeZO(model.parameters()).attach_virtual(model, probe=1)


def test_at_most_one_module_perturbed_at_a_time():
    """Track every perturbed copy with a weak reference: while any module runs, the live
    copies are at most that module's own tensors (the largest layer bounds the extra memory)."""
    model = tiny_llama()
    live: weakref.WeakSet = weakref.WeakSet()
    original = VirtualModel._perturbed

    def tracked(self, p):
        w = original(self, p)
        live.add(w)
        return w

    VirtualModel._perturbed = tracked
    peaks = []
    hooks = [m.register_forward_hook(
        lambda m, a, o: peaks.append(sum(t.numel() for t in live))) for m in model.modules()]
    try:
        opt = zoengine.MeZO(model.named_parameters())
        opt.attach_virtual(model)
        opt.step(lm_closure(model, batch()))
    finally:
        VirtualModel._perturbed = original
        for h in hooks:
            h.remove()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False))
                  for m in model.modules())
    assert peaks and max(peaks) > 0
    assert max(peaks) <= largest
    assert len(live) == 0  # nothing survives the step


def test_closure_raising_mid_forward_puts_parameters_back():
    model = tiny_llama()
    params = {n: p for n, p in model.named_parameters()}
    snap, ids = snapshot(model), batch()
    mlp = model.model.layers[1].mlp

    def boom(m, a):
        raise RuntimeError("boom")

    h = mlp.register_forward_pre_hook(boom)
    opt = zoengine.MeZO(model.named_parameters())
    opt.attach_virtual(model)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(lm_closure(model, ids))
    h.remove()
    assert all(p is params[n] for n, p in model.named_parameters())  # the Parameters are back
    assert same_bits(model, snap)
    opt.step(lm_closure(model, ids))  # and the next step works


def test_peft_lora_is_virtual():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    ids = batch()
    trainable = [(n, p) for n, p in lora.named_parameters() if p.requires_grad]
    twin = copy.deepcopy(lora)
    opt = zoengine.MeZO(trainable, lr=1e-3, eps=1e-3, seed=4)
    opt.attach_virtual(lora)
    ref = zoengine.MeZO([(n, p) for n, p in twin.named_parameters() if p.requires_grad],
                        lr=1e-3, eps=1e-3, seed=4)
    assert opt.inplace_fallback == []
    for _ in range(2):
        la = float(opt.step(lm_closure(lora, ids)))
        lb = float(ref.step(lm_closure(twin, ids)))
        assert la == pytest.approx(lb, rel=1e-5)


def test_dizo_with_virtual_perturbation():
    model = tiny_llama()
    ids = batch()
    opt = DiZO(model.named_parameters(), lr=1e-3, interval=2, search_iters=2)
    opt.attach_virtual(model)
    opt.set_batch_source(lambda step, k: lm_closure(model, ids))  # search batch k after step
    losses = [float(opt.step(lm_closure(model, ids))) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert opt.state["zo"]["step"] == 5


def test_journal_replay_of_a_virtual_run_is_bit_exact(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    start = copy.deepcopy(model)
    ids = batch()
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-2, eps=1e-2, stochastic_rounding=True)
    opt.attach_virtual(model)  # before the journal: its header records the perturbation
    opt.set_journal(tmp_path / "j.zoj")
    for _ in range(3):
        opt.step(lm_closure(model, ids))
    opt.close_journal()
    replay(start, tmp_path / "j.zoj")
    assert same_bits(start, snapshot(model))


def test_bad_arguments_are_refused_by_name():
    model = tiny_llama()
    opt = zoengine.MeZO(model.parameters())
    with pytest.raises(ValueError, match="virtual perturbation needs a model"):
        opt.attach_virtual(None)
    with pytest.raises(ValueError, match="model=dict"):
        opt.attach_virtual({})
    assert opt.perturbation == "inplace"  # a refused attach leaves the optimizer as it was
    opt.attach_virtual(model)
    with pytest.raises(ValueError, match="attached already"):
        opt.attach_virtual(model)


def test_state_dict_records_the_mode():
    model = tiny_llama()
    v = virtual(zoengine.MeZO(model.parameters()), model)
    i = zoengine.MeZO(model.parameters())
    assert v.state_dict()["state"]["zo"]["config"]["perturbation"] == "virtual"
    assert "perturbation" not in i.state_dict()["state"]["zo"]["config"]  # old checkpoints load
    with pytest.raises(ValueError, match="perturbation"):
        i.load_state_dict(v.state_dict())
    assert v.rng_budget()["stream_passes_per_step"] == 3
    assert virtual(zoengine.MeZO(model.parameters(), n_samples=2),
                   model).rng_budget()["stream_passes_per_step"] == 6


def test_a_model_with_hooks_can_be_copied_and_saved(tmp_path):
    model = tiny_llama()
    zoengine.MeZO(model.parameters()).attach_virtual(model)
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    ids = batch()
    ref = float(lm_closure(model, ids)())
    assert float(lm_closure(twin, ids)()) == ref and float(lm_closure(back, ids)()) == ref


# ---- front ends: the CLI and ZOTrainer ----------------------------------------------------

def test_cli_full_training_with_virtual_perturbation(tiny, tmp_path):
    import json

    from test_cli import tiny_args

    from zoengine.cli import main

    runs = {}
    for mode in ("inplace", "virtual"):
        out = tmp_path / mode
        assert main(tiny_args(tiny, out, "--train", "full", "--steps", "3", "--batch-size", "2",
                              "--eval-limit", "8", "--perturbation", mode)) == 0
        runs[mode] = json.loads((out / "metrics.json").read_text())
    assert runs["virtual"]["config"]["perturbation"] == "virtual"
    assert len(runs["virtual"]["curve"]["loss"]) == 3
    assert runs["virtual"]["curve"]["loss"] == pytest.approx(runs["inplace"]["curve"]["loss"],
                                                             rel=1e-4)


@pytest.mark.parametrize("extra", [["--perturbation", "sideways"],
                                   ["--train", "head", "--perturbation", "virtual"]])
def test_cli_refuses_bad_perturbation(tiny, tmp_path, capsys, extra):
    from test_cli import tiny_args

    from zoengine.cli import main

    rc = main(tiny_args(tiny, tmp_path / "out", "--steps", "2", *extra))
    err = capsys.readouterr().err
    assert rc == 2 and "--perturbation" in err and "Traceback" not in err


def test_zotrainer_virtual_matches_inplace(tmp_path):
    from test_hf import U32, StepGrads, drift_tolerance, lm_dataset, tiny_model, zo_args

    from zoengine.hf import ZOTrainer

    models, steps, losses = {}, {}, []
    for mode in ("inplace", "virtual"):
        model, steps[mode] = tiny_model(), StepGrads()
        tr = ZOTrainer(model=model, args=zo_args(tmp_path / mode, zo_perturbation=mode),
                       train_dataset=lm_dataset(), callbacks=[steps[mode]])
        losses.append(tr.train().training_loss)
        zo = tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer
        assert zo.perturbation == mode and zo.inplace_fallback == []
        models[mode] = model
    # Bounds as in test_every_preset_matches_inplace: g within n·u·|L|/ε (n = 64, the longest
    # dot product); the weights within drift_tolerance of the observed Δg_t (the old fixed 1e-5
    # was 4.5× the 2.2e-6 observed here, which grows with Δg on another machine).
    tol_g = 64 * U32 * max(map(abs, losses)) / 1e-3
    for ga, gb in zip(steps["virtual"].grads, steps["inplace"].grads):
        assert ga == pytest.approx(gb, rel=0, abs=tol_g)
    for (n, p), q in zip(models["virtual"].named_parameters(), models["inplace"].parameters()):
        tol = drift_tolerance(p, q, steps["virtual"].grads, steps["inplace"].grads, lr=1e-3,
                              eps=1e-3, z_bound=steps["inplace"].z_bound)
        assert float((p - q).abs().max()) <= tol, (n, tol)
    with pytest.raises(ValueError, match="zo_perturbation"):
        zo_args(tmp_path, zo_perturbation="nope")


# ---- the Triton path: fused noisy linear, under the interpreter on CPU ---------------------

@pytest.mark.interpreter
def test_triton_virtual_uses_the_fused_linear_and_matches_reference(NL, monkeypatch):  # noqa: F811
    """backend="triton" (interpreted): every nn.Linear runs noisy_linear (W + c·z never
    materialised); losses equal the reference backend's virtual run within the fp32 rounding
    of W + c·z (the fused kernel keeps W' in fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    a = LlamaForCausalLM(cfg).eval()
    b = copy.deepcopy(a)
    ids = batch(32, shape=(2, 5))
    calls = []
    real = NL.noisy_linear
    monkeypatch.setattr(NL, "noisy_linear", lambda *x, **k: calls.append(1) or real(*x, **k))
    fused = virtual(zoengine.MeZO(a.named_parameters(), lr=1e-2, eps=1e-2, seed=1,
                                  backend="triton"), a)
    ref = virtual(zoengine.MeZO(b.named_parameters(), lr=1e-2, eps=1e-2, seed=1,
                                backend="reference"), b)
    for _ in range(2):
        la, lb = float(fused.step(lm_closure(a, ids))), float(ref.step(lm_closure(b, ids)))
        assert la == pytest.approx(lb, rel=1e-5)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in a.modules())
    # 2 steps x 2 evaluations x every Linear, + the probe forward's first Linear
    assert len(calls) == 2 * 2 * n_linear + 1
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), n


def test_masked_lora_is_virtual_too():
    """Masked LoRA reads lora_A/lora_B weights inside its own forward: virtual perturbation
    swaps them around that forward (no fallback, no warning) and matches in place."""
    import warnings

    import peft

    from zoengine.sparsity import prune
    from zoengine.sparsity.lora import lora_config, mask_lora

    base = tiny_llama()
    masks = prune(base, "magnitude", 0.5)
    runs = []
    for mode in ("inplace", "virtual"):
        torch.manual_seed(0)  # the same random A and B for both
        model = peft.get_peft_model(copy.deepcopy(base), lora_config(
            2, 4, ["q_proj", "v_proj"], init_lora_weights=False))
        mask_lora(model, masks)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = zoengine.MeZO(named, lr=1e-2, eps=1e-3, seed=6)
        if mode == "virtual":
            opt.attach_virtual(model)
        assert opt.inplace_fallback == []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the "never read through its module" warning
            runs.append([float(opt.step(lm_closure(model, batch()))) for _ in range(3)])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
