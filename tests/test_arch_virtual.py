"""Virtual perturbation on every architecture of the zoo (tests/archs.py): the same losses and
projected gradients as in place, nothing falls back, lr = 0 leaves θ bit-identical.

These are the cases that were silently wrong before the substitution moved to where a
parameter is read: Gemma's scaled embedding (the model saw 1/√d of the perturbation), OPT's
learned positions (noise drawn for the attention mask's values), Llama4's router (an
nn.Linear subclass whose forward was replaced).
"""

import copy

import pytest
import torch
from archs import ARCHS, batch, build

import zoengine

torch.set_num_threads(1)
U32 = 2.0**-24


def _closure(model, ids):
    return lambda: model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("method", ["MeZO", "PeZO"])
@pytest.mark.parametrize("arch", ARCHS)
def test_virtual_matches_inplace(arch, method):
    a = build(arch)
    b = copy.deepcopy(a)
    snap = {n: p.detach().clone() for n, p in a.named_parameters()}
    ids, eps = batch(), 1e-3
    va = getattr(zoengine, method)(a.named_parameters(), lr=0.0, eps=eps, seed=5)
    va.attach_virtual(a)
    vb = getattr(zoengine, method)(b.named_parameters(), lr=0.0, eps=eps, seed=5)
    la, lb = float(va.step(_closure(a, ids))), float(vb.step(_closure(b, ids)))
    assert va.inplace_fallback == [], va.virtual_report()
    ga, gb = va.state["zo"]["projected_grads"][0], vb.state["zo"]["projected_grads"][0]
    # As in test_virtual.test_every_preset_matches_inplace: the two modes evaluate weights a
    # few ulps apart, which moves the loss by ≤ n·u·|L| (n = the longest sum in the forward:
    # the softmax over the vocabulary, 128 terms, is the longest here), and g by ≤ n·u·|L|/ε.
    n = max(max(p.shape) for p in a.parameters())
    assert la == pytest.approx(lb, rel=n * U32)
    assert ga == pytest.approx(gb, rel=0, abs=n * U32 * max(abs(la), abs(lb)) / eps)
    for name, p in a.named_parameters():  # lr = 0, virtual: never written
        assert torch.equal(p, snap[name]), name


def test_no_linear_subclass_gets_the_fused_forward():
    """The fused Triton path re-implements nn.Linear's forward, so only exact nn.Linear get it:
    Llama4's router (a subclass returning a tuple) keeps its own forward."""
    model = build("llama4")
    opt = zoengine.MeZO(model.named_parameters())
    opt.attach_virtual(model)
    subclasses = [m for m in model.modules()
                  if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear]
    assert subclasses  # the router
    assert all("forward" not in vars(m) for m in subclasses)
    assert any("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)
    opt.step(_closure(model, batch()))
    assert opt.inplace_fallback == []


@pytest.mark.parametrize("arch", ARCHS)
def test_zotrainer_virtual_on_every_architecture(arch, tmp_path):
    """ZOTrainer trains each architecture, virtual perturbation giving the in-place run's loss
    (the Trainer's own loss convention on both sides: GPT-2 divides by the batch's label count)
    and nothing falling back."""
    from test_hf import lm_dataset, zo_args

    from zoengine.hf import ZOTrainer

    losses = {}
    for mode in ("inplace", "virtual"):
        tr = ZOTrainer(model=build(arch), train_dataset=lm_dataset(n=4, length=9),
                       args=zo_args(tmp_path / mode, max_steps=2, zo_perturbation=mode))
        losses[mode] = tr.train().training_loss
        zo = tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer
        assert zo.perturbation == mode and zo.inplace_fallback == [], zo.virtual_report()
    # fp32 rounding of θ ± εz and the in-place restore drift (test_virtual: 1e-4)
    assert losses["virtual"] == pytest.approx(losses["inplace"], rel=1e-4)
