"""``zoengine diagnose bias``: the central difference against ∇L·u per ε. On f(θ) = Σ c θ³ the
central difference's bias is ε²·Σ c u³ exactly (its even terms cancel, the cubic has no fifth
derivative), so the tool must report that within fp64 rounding; on a tiny LLaMA and through the
CLI it must leave the weights bit-identical and write the table it prints."""

import copy
import csv
import math

import pytest
import torch
from archs import build

from zoengine.cli import main
from zoengine.noise import generate, tensor_keys
from zoengine.run.diagnose import SUMMARY_COLUMNS, directional_bias

torch.set_num_threads(1)

U = 2.0**-53  # unit roundoff of float64


def _rounding_bound(c, theta, u, eps) -> float:
    """A bound on |computed − exact| of FD − ∇f·u for f = Σ c θ³ in float64 (elementwise
    error terms summed; every factor rounded up):
    x± = fl(θ ± fl(εu)): |x − (θ ± εu)| ≤ 2U(|θ| + ε|u|) (two roundings);
    f(x): |Δf| ≤ Σ 3|c|x̄²·2U(|θ| + ε|u|) + (d + 4)U·Σ|c|x̄³, x̄ = |θ| + ε|u| (+ slack);
    FD = (f₊ − f₋)/(2ε): (|Δf₊| + |Δf₋|)/(2ε) + 2U|FD|;
    ∇f·u: autograd's 3cθ² (≤ 3 roundings) and the float64 dot (d roundings): (d + 4)U·Σ|3cθ²u|.
    """
    d = theta.numel()
    xb = theta.abs() + eps * u.abs()
    xb = xb * (1 + 4 * U)
    df = float((3 * c.abs() * xb**2 * 2 * U * xb).sum() + (d + 4) * U * (c.abs() * xb**3).sum())
    fd = float(((c * (theta + eps * u) ** 3).sum() - (c * (theta - eps * u) ** 3).sum())
               / (2 * eps))
    dot = float((3 * c.abs() * theta**2 * u.abs()).sum())
    return 2 * df / (2 * eps) + 2 * U * abs(fd) + (d + 4) * U * dot


def test_cubic_bias_is_eps_squared_sum_c_u_cubed():
    g = torch.Generator().manual_seed(0)
    d = 16
    c = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
    start = theta.detach().clone()
    eps_list, seed = [0.3, 1e-2, 1e-3], 11
    res = directional_bias(lambda: (c * theta**3).sum(), [("theta", theta)], eps_list,
                           directions=3, seed=seed)
    assert torch.equal(theta.detach(), start)  # restored bit for bit
    grad_norm = float((3 * c * start**2).norm())
    assert res["grad_norm"] == pytest.approx(grad_norm, rel=(d + 4) * U)
    key = tensor_keys(["theta"])[0]
    assert len(res["rows"]) == 3 * len(eps_list)
    for row in res["rows"]:
        u = generate(d, seed=seed, step=0, sample=row["direction"], key=key,
                     dtype=torch.float64)
        exact = row["eps"] ** 2 * float((c * u**3).sum())
        bound = _rounding_bound(c, start, u, row["eps"])
        assert abs((row["fd"] - row["grad_dot_u"]) - exact) <= bound, (row, exact, bound)
        want = abs(exact) / grad_norm
        assert abs(row["rel_bias"] - want) <= (bound + 4 * U * abs(exact)) / grad_norm
    for s in res["summary"]:
        b = [r["rel_bias"] for r in res["rows"] if r["eps"] == s["eps"]]
        mean = sum(b) / 3
        assert s["directions"] == 3 and s["rel_bias_mean"] == pytest.approx(mean, rel=4 * U)
        sd = math.sqrt(sum((x - mean) ** 2 for x in b) / 2)
        assert s["rel_bias_sd"] == pytest.approx(sd, rel=1e-12) and s["rel_bias_max"] == max(b)


def test_tiny_llama_weights_untouched_and_gradient_from_backprop():
    model = build("llama").double()
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    loss = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    res = directional_bias(loss, named, [1e-3, 1e-4], directions=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    grads = torch.autograd.grad(loss(), [p for _, p in named], allow_unused=True)
    norm = math.sqrt(sum(float(g.square().sum()) for g in grads if g is not None))
    assert res["grad_norm"] == pytest.approx(norm, rel=1e-12)
    assert [s["eps"] for s in res["summary"]] == [1e-3, 1e-4]
    assert all(math.isfinite(r["rel_bias"]) for r in res["rows"])


@pytest.mark.parametrize("kwargs, name", [
    (dict(eps_list=[]), "eps_list"), (dict(eps_list=[0.0]), "eps_list"),
    (dict(eps_list=[1e-3], directions=0), "directions"),
    (dict(eps_list=[1e-3], dist="cauchy"), "dist"),
])
def test_bad_arguments_are_named(kwargs, name):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=name):
        directional_bias(lambda: p.sum(), [("p", p)], **kwargs)


def test_cli_prints_the_table_and_writes_the_csv(tmp_path, capsys):
    from test_cli import WORDS, make_tiny_model

    model = make_tiny_model(str(tmp_path / "model"))
    words = [w for w in WORDS if w.isalpha()]
    paragraphs = [" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(20)]
    (tmp_path / "text.txt").write_text("\n\n".join(paragraphs))
    out = tmp_path / "bias.csv"
    rc = main(["diagnose", "bias", "--model", model, "--task", str(tmp_path / "text.txt"),
               "--block-size", "8", "--batch-size", "2", "--eps", "1e-2,1e-3",
               "--directions", "2", "--dtype", "float64", "--output", str(out),
               "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == SUMMARY_COLUMNS and [float(r["eps"]) for r in rows] == [1e-2, 1e-3]
    assert all(int(r["directions"]) == 2 for r in rows)
    for r in rows:  # the printed table shows the CSV's numbers
        assert f"{float(r['rel_bias_mean']):.4g}" in printed


def test_cli_refuses_bad_flags_by_name(capsys):
    assert main(["diagnose", "bias", "--eps", "1e-3,-1"]) == 2
    assert "--eps" in capsys.readouterr().err
    assert main(["diagnose", "bias", "--directions", "0"]) == 2
    assert "--directions" in capsys.readouterr().err
    assert main(["diagnose"]) == 2
    assert "bias" in capsys.readouterr().err


def test_every_flag_refuses_bad_values_by_name():
    """test_bad_input.py's generated bad values, on every flag of `diagnose bias` (parsed by
    one parser: each is the usage error that main() prints with exit 2, as tested above)."""
    import argparse

    import test_bad_input as bad

    from zoengine.cli.flags import UsageError
    from zoengine.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bias = next(a for a in sub.choices["diagnose"]._actions
                if isinstance(a, argparse._SubParsersAction)).choices["bias"]
    extra = {"--eps": ["0", "nan", "x", "1e-3,-1", "1e-3,,1e-4"], "--output": ["/"]}
    cases = 0
    for action in bias._actions:
        if action.nargs == 0:
            continue
        label = action.option_strings[0]
        for value in dict.fromkeys(bad._bad_values(action) + extra.get(label, [])):
            if (label, value) == ("--seed", "0"):
                continue
            with pytest.raises(UsageError) as info:
                parser.parse_args(["diagnose", "bias", label, value])
            assert f"{label}:" in str(info.value), (label, value, str(info.value))
            cases += 1
    assert cases >= 40
