"""hwsim's restatement of the optimizers' rng_budget() (zoengine/hwsim/budget.py) against the real
optimizers, the model tensor sizes against transformers' Llama, and run pricing (zoengine/hwsim/runs.py,
``zoengine hwsim estimate --model/--budget``)."""

from __future__ import annotations

import json

import pytest

from zoengine.hwsim.budget import MODELS, model_numels, rng_budget
from zoengine.hwsim.cli import main
from zoengine.hwsim.runs import compare_methods, price_run

torch = pytest.importorskip("torch")


def _net():
    torch.manual_seed(0)
    # tensors straddle 64 Ki-element requests and 16 Ki-number windows at odd offsets
    return torch.nn.Sequential(torch.nn.Linear(300, 70), torch.nn.Linear(70, 1100),
                               torch.nn.Linear(1100, 3))


@pytest.mark.parametrize("cls, kw", [
    ("MeZO", {}), ("MeZO", dict(n_samples=2)), ("ZO", dict(noise="uniform")),
    ("ZO", dict(noise="rademacher", n_samples=3)), ("ZO", dict(estimator="kernel")),
    ("PeZO", dict(reuse="pool")), ("PeZO", dict(reuse="pool", pool_size=1000, n_samples=2)),
    ("PeZO", dict(reuse="rotate")), ("PeZO", dict(reuse="rotate", lanes=16, scaling="static")),
    ("PeZO", dict(reuse=None)), ("PeZO", dict(reuse=None, scaling="static")),
    ("KerZOO", {}),
])
def test_formula_equals_a_real_optimizers_rng_budget(cls, kw):
    import zoengine.optim as optim

    net = _net()
    opt = getattr(optim, cls)(net.parameters(), lr=1e-3, **kw)
    real = opt.rng_budget()
    opts = {k: real[k] for k in ("noise", "estimator", "n_samples")}
    for k in ("pool_size", "lanes"):
        if real[k] is not None:
            opts[k] = real[k]
    opts.update(scaling=opt.scaling, kernel_order=opt.kernel_order)
    mine = rng_budget([p.numel() for p in net.parameters()], method=cls, **opts)
    assert mine == real


def test_formula_with_half_precision_stochastic_rounding():
    from zoengine.optim import ZO

    net = _net().to(torch.bfloat16)
    opt = ZO(net.parameters(), lr=1e-3, stochastic_rounding=True)
    numels = [p.numel() for p in net.parameters()]
    assert rng_budget(numels, half_numels=numels, stochastic_rounding=True) == opt.rng_budget()


@pytest.mark.parametrize("model", list(MODELS))
def test_model_sizes_are_those_of_transformers_llama(model):
    transformers = pytest.importorskip("transformers")
    c = MODELS[model]
    cfg = transformers.LlamaConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
        num_key_value_heads=c["kv_heads"], tie_word_embeddings=c["tie"])
    with torch.device("meta"):  # no weights: a 7B model in fp32 would need 27 GB
        m = transformers.LlamaForCausalLM(cfg)
    assert [p.numel() for p in m.parameters()] == model_numels(model)
    assert sum(model_numels(model)) == {"smollm2-135m": 134_515_008,
                                        "llama-7b": 6_738_415_616}[model]


@pytest.mark.parametrize("noise", ["normal", "rotate"])
def test_formula_equals_the_optimizers_accounting_at_7b(noise):
    from zoengine.optim import ZO

    numels = model_numels("llama-7b")
    assert rng_budget(numels, noise=noise, lanes=256) == \
        ZO.rng_accounting(numels, noise=noise, lanes=256)


def test_run_pricing_smollm2_mezo_vs_pezo():
    rows = {r.name: r for r in compare_methods("smollm2-135m", "fpga-xc7", steps=20_000)}
    assert list(rows) == ["MeZO", "PeZO pool", "PeZO rotate", "MeZO low-rank"]
    d = 134_515_008
    for r in rows.values():
        assert r.budget.n_use == 3 * d  # 4n - 1 = 3 passes
        assert r.e_run_j == pytest.approx(20_000 * r.budget.e_step_j + r.e_once_j)
        assert r.t_run_s == pytest.approx(20_000 * r.budget.t_step_s + r.t_once_s)
        assert set(r.tags) <= set("MPSE?") and "E" in r.tags
    mezo, pool, rot = rows["MeZO"], rows["PeZO pool"], rows["PeZO rotate"]
    assert mezo.budget.n_generators == rot.budget.n_generators == 256
    assert pool.budget.n_gen == 0 and pool.e_once_j > 0 and pool.budget.bram18 == 256
    # rotate generates whole adaptive windows: more numbers than it uses, and takes longer
    assert rot.budget.n_gen == rot.rng["numbers_generated_per_step"] > rot.budget.n_use
    assert rot.budget.t_step_s > mezo.budget.t_step_s
    assert rot.budget.lut < mezo.budget.lut and pool.budget.ff < 0.01 * mezo.budget.ff


def test_price_run_from_a_real_optimizer_budget(tmp_path, capsys):
    from zoengine.optim import PeZO

    opt = PeZO(_net().parameters(), lr=1e-3, reuse="pool", pool_size=4096)
    rng = opt.rng_budget()
    r = price_run("PeZO pool", rng, "asic-45nm", steps=10)
    assert r.budget.n_use == rng["numbers_used_per_step"] and r.budget.workload["pool_size"] == 4096
    path = tmp_path / "budget.json"
    path.write_text(json.dumps(rng))
    assert main(["estimate", "--budget", str(path), "--platform", "asic-45nm", "--steps", "10",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["e_run_j"] == pytest.approx(r.e_run_j)


def test_cli_compare_7b(capsys):
    assert main(["estimate", "--model", "llama-7b", "--compare", "--platform", "asic-45nm"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "PeZO rotate" in out and "| provenance |" in out
    assert main(["estimate", "--model", "smollm2-135m", "--compare", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["MeZO", "PeZO pool", "PeZO rotate", "MeZO low-rank"]
    assert all(r["steps"] == 20_000 for r in rows)


@pytest.mark.parametrize("argv, flag", [
    (["estimate", "--model", "gpt5"], "--model"),
    (["estimate", "--model", "smollm2-135m", "--noise", "foo"], "--noise"),
    (["estimate", "--budget", "/nonexistent.json"], "--budget"),
    (["estimate", "--budget", "/nonexistent.json", "--compare"], "--compare"),
    (["estimate", "--model", "smollm2-135m", "--steps", "0"], "--steps"),
])
def test_cli_run_bad_input_exits_2(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
