"""Optimizer state and guards: the run configuration travels with state_dict, group values are
checked at every step, bad constructor input is refused by name, per-group projected
gradients, and the method registry's class records (what the memory planner asks)."""

import copy
import math

import pytest
import torch
from helpers import tiny_mlp

import zoengine
from zoengine import noise
from zoengine.kernels.keys import tensor_keys
from zoengine.optim import ZO, registry
from zoengine.sparsity import memory as M


def _steps(model, opt, k=2):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    for _ in range(k):
        opt.step(lambda: model(x).pow(2).mean())


# ---------------------------------------------------------------- config travels with state
def test_n_samples_mismatch_is_refused_naming_both_values():
    a = tiny_mlp()
    oa = zoengine.MeZO(a.named_parameters(), lr=1e-3, n_samples=4)
    _steps(a, oa)
    saved = oa.state_dict()
    assert saved["state"]["zo"]["config"]["n_samples"] == 4
    b = tiny_mlp()
    ob = zoengine.MeZO(b.named_parameters(), lr=1e-3, n_samples=1)
    with pytest.raises(ValueError, match=r"^state_dict: saved by MeZO") as err:
        ob.load_state_dict(saved)
    assert "n_samples: saved 4, this optimizer 1" in str(err.value)
    assert ob.step_count == 0  # nothing was loaded


def test_mezo_state_into_pezo_is_refused_not_keyerror():
    a = tiny_mlp()
    oa = zoengine.MeZO(a.named_parameters(), lr=1e-3)
    _steps(a, oa)
    ob = zoengine.PeZO(tiny_mlp().named_parameters(), lr=1e-3, pool_size=100)
    with pytest.raises(ValueError) as err:
        ob.load_state_dict(oa.state_dict())
    msg = str(err.value)
    assert "saved by MeZO" in msg and "this PeZO" in msg
    assert "noise: saved 'normal', this optimizer 'pool'" in msg
    assert "pool_size: saved (not set), this optimizer 100" in msg


def test_same_config_different_class_loads():
    a = tiny_mlp()
    oa = zoengine.MeZO(a.named_parameters(), lr=1e-3, seed=5)
    _steps(a, oa)
    ob = ZO(tiny_mlp().named_parameters(), lr=1e-3)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    assert ob.state["zo"]["seed"] == 5 and "config" not in ob.state["zo"]


def test_older_state_dict_without_config_loads_with_a_warning():
    a = tiny_mlp()
    oa = zoengine.PeZO(a.named_parameters(), lr=1e-3, pool_size=50)
    _steps(a, oa)
    sd = oa.state_dict()
    del sd["state"]["zo"]["config"]
    del sd["state"]["zo"]["projected_grads_per_group"]  # a key added later
    b = tiny_mlp()
    ob = zoengine.PeZO(b.named_parameters(), lr=1e-3, pool_size=50)
    with pytest.warns(UserWarning, match="no run configuration"):
        ob.load_state_dict(sd)
    assert ob.step_count == 2 and ob.state["zo"]["projected_grads_per_group"] == []
    _steps(b, ob, 1)
    assert ob.step_count == 3 and len(ob.state["zo"]["projected_grads_per_group"]) == 1


def test_dizo_config_is_checked():
    def make(interval):
        m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        return m, zoengine.DiZO(m.named_parameters(), lr=1e-3, projected="all",
                                interval=interval, projection_closure=lambda: (lambda: 0.0))
    _, oa = make(5)
    _, ob = make(7)
    with pytest.raises(ValueError, match="dizo.interval: saved 5, this optimizer 7"):
        ob.load_state_dict(oa.state_dict())


# ---------------------------------------------------------------- group values every step
@pytest.mark.parametrize("key, value, rel", [
    ("lr", float("nan"), ">= 0"), ("lr", float("inf"), ">= 0"), ("lr", -1e-3, ">= 0"),
    ("eps", 0.0, "> 0"), ("eps", float("nan"), "> 0"), ("weight_decay", float("inf"), ">= 0"),
])
def test_bad_group_values_are_refused_before_touching_weights(key, value, rel):
    model = tiny_mlp()
    opt = zoengine.MeZO([{"params": [model[0].weight]}, {"params": [model[2].weight]}],
                        lr=1e-3, eps=1e-3)
    start = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[1][key] = value  # as a scheduler could
    with pytest.raises(ValueError) as err:
        opt.step(lambda: model(torch.ones(1, 6)).sum())
    assert str(err.value) == f"param_groups[1][{key!r}]={value!r}: must be a finite number {rel}"
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    assert opt.step_count == 0


def test_eps_that_overflows_is_refused_and_weights_untouched():
    model = tiny_mlp()
    start = [p.detach().clone() for p in model.parameters()]
    opt = zoengine.MeZO(model.parameters(), lr=1e-3)
    opt.param_groups[0]["eps"] = 3e38
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['eps'\]=3e\+38: .*weights were "
                                         r"not changed"):
        opt.step(lambda: model(torch.ones(1, 6)).sum())
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_nonfinite_loss_never_claims_a_restore_that_did_not_happen(nonfinite):
    p = torch.nn.Parameter(torch.ones(5))
    with torch.no_grad():
        p[2] = float("inf")  # broken before the step: undoing ±εz cannot make it finite
    opt = zoengine.MeZO([p], lr=1e-3, nonfinite=nonfinite)
    with pytest.raises(zoengine.NonFiniteLossError) as err:
        opt.step(lambda: p.sum())
    assert "NOT restored: 1 of 5 elements" in str(err.value)
    assert "weights restored" not in str(err.value)
    q = torch.nn.Parameter(torch.ones(5))
    ok = zoengine.MeZO([q], lr=1e-3)
    with pytest.raises(zoengine.NonFiniteLossError, match="; weights restored$"):
        ok.step(lambda: q.sum() * float("nan"))


# ---------------------------------------------------------------- constructor input
def test_param_names_shorter_than_params():
    w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['param_names'\] has 1 names for "
                                         r"2 tensors"):
        zoengine.MeZO([{"params": [w, b], "param_names": ["w"]}])


def test_duplicated_tensors_within_and_across_groups():
    w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['params'\]\[2\] is the same "
                                         r"tensor"):
        zoengine.MeZO([w, b, w])
    with pytest.raises(ValueError, match=r"^param_groups\[1\]\['params'\]\[0\] is the same "
                                         r"tensor as one in param_groups\[0\]"):
        zoengine.MeZO([{"params": [w]}, {"params": [w, b]}])


def test_complex_parameters_are_refused():
    c = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['params'\]\[0\] has dtype "
                                         r"torch.complex64: must be a real"):
        zoengine.MeZO([c])


@pytest.mark.parametrize("value", [[True, False, True], None, 1])
def test_mask_values_must_be_tensors(value):
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match=r"^masks\['weight'\]=\w+: must be a bool"):
        zoengine.MeZO(model.named_parameters(), masks={"weight": value})


# ---------------------------------------------------------------- per-group projected grads
def test_projected_grads_per_group_use_each_groups_eps():
    a = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    c = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64), requires_grad=False)
    ca, cb = torch.arange(1.0, 5.0, dtype=torch.float64), torch.tensor([-1.0, 2.0, 0.5],
                                                                       dtype=torch.float64)
    opt = zoengine.MeZO([{"params": [a], "eps": 1e-2}, {"params": [c]},
                         {"params": [b], "eps": 1e-3}], lr=1e-3, backend="reference")
    opt.step(lambda: ca @ a + cb @ b)
    keys = tensor_keys(["#0", "#1", "#2"])
    za = noise.generate(4, seed=0, step=0, key=keys[0]).double()
    zb = noise.generate(3, seed=0, step=0, key=keys[2]).double()
    half = 1e-2 * float(ca @ za) + 1e-3 * float(cb @ zb)  # (ℓ₊ − ℓ₋)/2 of the joint move
    per = opt.state["zo"]["projected_grads_per_group"]
    assert per[1] is None and len(per) == 3
    assert per[0][0] == pytest.approx(half / 1e-2, rel=1e-9)
    assert per[2][0] == pytest.approx(half / 1e-3, rel=1e-9)
    assert opt.state["zo"]["projected_grads"] == per[0]
    # ... and those are the values each group's update applied
    torch.testing.assert_close(a.detach(), -1e-3 * per[0][0] * za, rtol=0, atol=1e-15)
    torch.testing.assert_close(b.detach(), -1e-3 * per[2][0] * zb, rtol=0, atol=1e-15)


# ---------------------------------------------------------------- registry and accounting
def test_registry_maps_names_to_classes_and_fixed_options():
    spec = registry.method_spec("pezo-rotate")
    assert spec.cls is zoengine.PeZO and dict(spec.fixed) == {"reuse": "rotate"}
    opt = registry.create("pezo-rotate", [torch.nn.Parameter(torch.zeros(3))], lanes=4)
    assert isinstance(opt, zoengine.PeZO) and opt.noise == "rotate" and opt.lanes == 4
    with pytest.raises(ValueError, match=r"^reuse='pool': method 'pezo-rotate' fixes"):
        registry.create("pezo-rotate", [torch.nn.Parameter(torch.zeros(3))], reuse="pool")
    combo = registry.method_spec("kerzoo+pezo")
    assert combo.cls is ZO and dict(combo.fixed) == {"noise": "pool", "estimator": "kernel"}
    with pytest.raises(ValueError, match="cls="):
        registry.register_method("bad", lambda params, **kw: None)


def test_memory_planner_asks_the_class(monkeypatch):
    class Tracker(ZO):
        @classmethod
        def memory_extras(cls, **kw):
            return {**super().memory_extras(**kw), "tracker": 12345}

    monkeypatch.setitem(registry._METHODS, "tracker",
                        registry.MethodSpec("tracker", Tracker, {"noise": "pool"}))
    smol = {"hidden_size": 64, "intermediate_size": 128, "vocab_size": 1000,
            "num_hidden_layers": 2, "num_attention_heads": 4}
    p = M.predict(smol, "tracker", 1, 32, pool_size=1000)
    assert p.breakdown["tracker"] == 12345 and p.breakdown["pezo_pool"] == 4000
    assert "tracker" in M.METHODS
    rot = M.predict(smol, "pezo-rotate", 1, 32)
    assert "pezo_pool" not in rot.breakdown  # PeZO priced with its fixed reuse="rotate"
    assert M.predict(smol, "kerzoo+pezo", 1, 32).breakdown["pezo_pool"] == 4 << 16
    assert math.isclose(M.predict(smol, "dizo", 1, 32, dtype="bfloat16")
                        .breakdown["dizo_anchors"], 2 * 2 * 64 * 64 * 2)
