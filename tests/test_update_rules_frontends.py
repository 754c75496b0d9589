"""Update rules through the front ends and on other architectures: virtual perturbation (θ is
never written, so the step equals torch.optim on ĝ at θ itself, bit for bit), the zoo's GPT-2
(Conv1D) and OPT layouts, both CPU backends, ``zoengine train --update`` and ZOTrainer."""

import json

import pytest
import torch
from archs import batch, build
from test_cli import tiny_args

from zoengine.cli import main
from zoengine.kernels import native_ops, reference
from zoengine.kernels.keys import tensor_keys
from zoengine.noise import generate
from zoengine.optim import ZO
from zoengine.optim.updates import estimate

torch.set_num_threads(1)
LR = 1e-3


class _Group:
    offsets = None


def _torch_opt(rule, p):
    if rule == "adam":
        return torch.optim.Adam([p], lr=LR, foreach=False)
    return torch.optim.SGD([p], lr=LR, momentum=0.9 if rule == "momentum" else 0.0,
                           foreach=False)


@pytest.mark.parametrize("rule", ["momentum", "sign", "adam"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_virtual_step_equals_torch_optimizer_at_theta(arch, rule):
    """Virtual perturbation never writes θ during the evaluations, so the rule starts from
    θ itself: two steps equal torch.optim fed ĝ (from the step's g and the contract's z)."""
    model = build(arch)
    named = list(model.named_parameters())
    opt = ZO(named, lr=LR, eps=1e-3, update=rule, backend="reference", seed=2)
    opt.attach_virtual(model)
    shadows = {n: p.detach().clone().requires_grad_(True) for n, p in named}
    torch_opts = {n: _torch_opt(rule, s) for n, s in shadows.items()}
    keys = dict(zip([n for n, _ in named], tensor_keys([n for n, _ in named])))
    ids = batch()
    for t in range(2):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        assert opt.inplace_fallback == [], opt.virtual_report()
        g = opt.state["zo"]["projected_grads"][0]
        for n, p in named:
            s = shadows[n]
            d = estimate(reference, s, keys[n], 0, _Group(), [g], seed=2, step=t,
                         dist="normal")
            s.grad = torch.sign(d) if rule == "sign" else d
            torch_opts[n].step()
            assert torch.equal(p.detach(), s.detach()), (arch, rule, n, t)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_estimate_on_each_cpu_backend_equals_float64(backend):
    """Each backend's ĝ is within n·2^-24·Σ|c_k z_k| of the float64 sum (one rounding per
    product and per sum), plus, for native, its normal z's documented distance from the
    oracle (≤ NORMAL_MAX_ULP fp32 ulp, each ≤ 2^-23·|z|), on a size past the kernels'
    64 Ki-element chunk."""
    from test_native_ops import NORMAL_MAX_ULP

    ops = reference if backend == "reference" else native_ops
    p = torch.zeros(70_001)
    coefs = [1.5, -0.25]
    d = estimate(ops, p, 77, 0, _Group(), coefs, seed=1, step=4, dist="normal")
    zs = [generate(p.numel(), seed=1, step=4, sample=k, key=77).double() for k in range(2)]
    exact = sum(c * z for c, z in zip(coefs, zs))
    z_ulps = 0 if backend == "reference" else NORMAL_MAX_ULP
    bound = (2 * 2.0**-24 + z_ulps * 2.0**-23) * sum(abs(c) * z.abs() for c, z in zip(coefs, zs))
    assert bool(((d.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("rule", ["momentum", "sign", "adam", "conservative"])
def test_pruned_gpt2_keeps_its_zeros(rule):
    """GPT-2's Conv1D weights half zero, masks='zeros': every zero stays exactly zero under
    each rule (weight decay on, except conservative which refuses it)."""
    model = build("gpt2")
    w = model.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():
        w[:, ::2] = 0.0
    zeros = w == 0
    opt = ZO(model.named_parameters(), lr=1e-3, update=rule, masks="zeros",
             weight_decay=0.0 if rule == "conservative" else 0.01)
    ids = batch()
    for _ in range(2):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    assert bool((w[zeros] == 0).all()) and bool((w[~zeros] != 0).any())


def test_cli_update_adam_full(tiny, tmp_path):
    out = tmp_path / "adam"
    assert main(tiny_args(tiny, out, "--train", "full", "--steps", "3", "--batch-size", "2",
                          "--update", "adam", "--lr", "1e-4")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["update"] == "adam"
    assert len(m["curve"]["loss"]) == 3


@pytest.mark.parametrize("extra, flag", [
    (["--update", "nesterov"], "--update"),
    (["--momentum", "0.5"], "--momentum"),
    (["--method", "zo-adam", "--update", "sign"], "--update"),
])
def test_cli_bad_update_exits_2_naming_the_flag(tiny, tmp_path, capsys, extra, flag):
    assert main(tiny_args(tiny, tmp_path / "x", "--train", "full", "--steps", "1",
                          *extra)) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_zotrainer_zo_update(tmp_path):
    from test_hf import lm_dataset, tiny_model, zo_args

    from zoengine.hf import ZOTrainer

    tr = ZOTrainer(model=tiny_model(), args=zo_args(tmp_path, zo_update="momentum",
                                                    max_steps=3),
                   train_dataset=lm_dataset())
    tr.train()
    zo = getattr(tr.optimizer, "optimizer", tr.optimizer)
    assert zo.update.name == "momentum" and zo.state["zo"]["update_steps"] == 3
    assert any("momentum_buffer" in zo.state[p] for p in tr.model.parameters())
    with pytest.raises(ValueError, match="zo_update"):
        zo_args(tmp_path, zo_update="lion")


@pytest.mark.parametrize("method", ["fzoo", "hizoo", "sparse-mezo", "zo-sgd-cons"])
def test_cli_newer_methods_train_full(tiny, tmp_path, method):
    """The newer presets through ``zoengine train --method``: a full fine-tuning run
    completes, the loss curve has a point per step and the run's method is recorded."""
    out = tmp_path / method
    assert main(tiny_args(tiny, out, "--train", "full", "--steps", "2", "--batch-size", "2",
                          "--method", method, "--lr", "1e-5")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["method"] == method and len(m["curve"]["loss"]) == 2


@pytest.mark.parametrize("method", ["fzoo", "hizoo"])
def test_cli_refuses_an_update_rule_the_method_does_not_take(tiny, tmp_path, capsys, method):
    assert main(tiny_args(tiny, tmp_path / "x", "--train", "full", "--steps", "1",
                          "--method", method, "--update", "adam")) == 2
    err = capsys.readouterr().err
    assert "--update" in err and "Traceback" not in err


@pytest.mark.parametrize("method", ["fzoo", "hizoo", "sparse-mezo"])
def test_zotrainer_newer_methods(tmp_path, method):
    from test_hf import lm_dataset, tiny_model, zo_args

    from zoengine.hf import ZOTrainer

    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = ZOTrainer(model=model, args=zo_args(tmp_path, zo_method=method, max_steps=2,
                                             learning_rate=1e-4),
                   train_dataset=lm_dataset())
    tr.train()
    zo = getattr(tr.optimizer, "optimizer", tr.optimizer)
    assert zo.state["zo"]["step"] == 2
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
