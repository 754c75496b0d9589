"""Structured pruning on every architecture of the zoo (tests/archs.py): each (architecture,
structure) either works — the pruned model equals the dense one with the removed units zeroed,
reloads with plain transformers to the same logits, has the parameter count of its config, and
removed the lowest-scoring units — or is refused with a ValueError naming the structure and why.

Tolerances. Reload: the same weights through the same code on the same CPU are bit-identical in
practice (measured max |Δ| = 0); the assertion allows fp32 summation-order differences,
|Δ| ≤ K·u·Σ|terms| with u = 2⁻²⁴ and K ≤ 128 terms at these sizes, i.e. ~1e-5 relative to
logits of order 1. Against the zeroed dense model the removed terms are exact zeros but the
kept sums run over a different length (pruned K' < K), the same bound.

Mixture-of-experts channels (the last section): every expert keeps the same number of channels,
each its own by its own per-expert scores; shared experts and dense layers by their own config
fields. The same bound holds there: routers see hidden states that differ by that rounding
only, and no top-k choice of these fixed inputs is that close to a tie (else the logits would
differ by far more than 1e-5, and the test would say so).
"""

from __future__ import annotations

import pytest
import torch
from archs import batch, build

from zoengine.sparsity import structured as ST
from zoengine.sparsity.weights import is_conv1d

torch.set_num_threads(1)
TOL = dict(rtol=1e-5, atol=1e-5)  # the fp32 summation bound of the module docstring
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "llama4")
WORKS = {
    "heads": (*LLAMA_LIKE, "phi", "phi3", *MOE),
    "channels": (*LLAMA_LIKE, "opt", "gpt2", "phi", "phi3", "falcon", "gpt_neox", *MOE),
}
REFUSED = {
    "heads": {a: r"structure='heads' is refused: its attention computes head_dim as "
                 r"hidden_size // num_attention_heads" for a in
              ("opt", "gpt2", "falcon", "bloom", "gpt_neox")},
    "channels": {"bloom": r"structure='channels' is refused: BloomMLP's width is 4 x hidden_size"},
}
# MoE channels are per expert: the last section checks them, not the generic tests
GENERIC = {s: tuple(a for a in WORKS[s] if s == "heads" or a not in MOE) for s in WORKS}
CASES = [(a, s, sp) for s in GENERIC for a in GENERIC[s] for sp in (0.25, 0.5)]


@torch.no_grad()
def logits(m, x):
    return m(x).logits


def _units(model, structure):
    """Per layer: the output projection a unit writes through and its per-unit column count."""
    layers, spec, lay = ST.checked_layers(model, structure)
    out = lay.attn_out if structure == "heads" else lay.mlp_out
    mods = [getattr(ST._parts(layer, spec, lay, structure)[0], out) for layer in layers]
    cfg = model.config
    per = ST._head_dim(cfg) * cfg.num_attention_heads // cfg.num_key_value_heads \
        if structure == "heads" else 1
    return mods, per


def _mass(mod) -> torch.Tensor:
    """Σ_i |W[i, j]| per input feature j, written out for each storage orientation."""
    w = mod.weight.detach().double().abs()
    return w.sum(1) if is_conv1d(mod) else w.sum(0)  # Conv1D stores (in, out)


def _zero_removed(model, structure, kept) -> None:
    mods, per = _units(model, structure)
    with torch.no_grad():
        for mod, keep in zip(mods, kept):
            n = (mod.weight.shape[0] if is_conv1d(mod) else mod.weight.shape[1]) // per
            for u in sorted(set(range(n)) - set(keep)):
                cols = slice(u * per, (u + 1) * per)
                if is_conv1d(mod):
                    mod.weight[cols, :] = 0
                else:
                    mod.weight[:, cols] = 0


def _removed_are_lowest(scores: torch.Tensor, keep: list[int]) -> None:
    gone = sorted(set(range(len(scores))) - set(keep))
    assert gone and scores[gone].max() <= scores[keep].min(), (scores, keep)


def _config_count(cfg) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())


def _layer0_input_norms(model, structure, x) -> torch.Tensor:
    """‖X[:, j]‖₂ over all tokens of layer 0's output projection in the dense model."""
    mod = _units(model, structure)[0][0]
    seen = []
    h = mod.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    logits(model, x)
    h.remove()
    xs = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    return xs.pow(2).sum(0).sqrt()


@pytest.mark.parametrize("arch, structure, sparsity", CASES)
def test_pruned_model_reloads_equal_and_removed_the_lowest(arch, structure, sparsity, tmp_path):
    from transformers import AutoModelForCausalLM

    model, x = build(arch), batch()
    if structure == "heads" and sparsity not in ST.heads_sparsities(model.config):
        with pytest.raises(ValueError, match=r"sparsity=0.25 with structure='heads'.*must round"):
            ST.prune_structured(model, structure, sparsity, calib=[x])
        return
    dense = build(arch)
    norms = _layer0_input_norms(dense, structure, x)
    mods, per = _units(dense, structure)
    rep = ST.prune_structured(model, structure, sparsity, calib=[x])
    assert rep["sparsity_achieved"] == pytest.approx(sparsity)
    _removed_are_lowest((_mass(mods[0]) * norms).view(-1, per).sum(1), rep["kept"][0])
    _zero_removed(dense, structure, rep["kept"])
    ref = logits(model, x)
    torch.testing.assert_close(ref, logits(dense, x), **TOL)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(back, x), ref, **TOL)
    count = sum(p.numel() for p in back.parameters())
    assert count == rep["params_after"] == _config_count(back.config) < rep["params_before"]


@pytest.mark.parametrize("arch, structure", [(a, s) for s in GENERIC for a in GENERIC[s]])
def test_magnitude_scores_remove_the_lowest_in_every_layer(arch, structure):
    model = build(arch)
    mods, per = _units(model, structure)
    scores = [_mass(m).view(-1, per).sum(1) for m in mods]
    rep = ST.prune_structured(model, structure, 0.5)
    assert rep["score"] == "magnitude"
    for s, keep in zip(scores, rep["kept"]):
        _removed_are_lowest(s, keep)


@pytest.mark.parametrize("arch, structure", [(a, s) for s in REFUSED for a in REFUSED[s]])
def test_other_layouts_are_refused_naming_the_structure_and_why(arch, structure):
    model = build(arch)
    before = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=REFUSED[structure][arch]) as err:
        ST.prune_structured(model, structure, 0.5)
    assert type(model).__name__ in str(err.value) and "LLaMA-layout" in str(err.value)
    assert {n: p.shape for n, p in model.named_parameters()} == before


def test_every_zoo_architecture_is_covered_for_both_structures():
    from archs import ARCHS

    for s in ST.STRUCTURES:
        assert sorted((*WORKS[s], *REFUSED[s])) == sorted(ARCHS), s


def test_gpt2_n_inner_becomes_explicit_and_phi3_halves_stay_paired():
    g = build("gpt2")
    assert g.config.n_inner is None  # 4 x n_embd implicitly
    ST.prune_structured(g, "channels", 0.25)
    assert g.config.n_inner == 96 and g.transformer.h[0].mlp.c_fc.weight.shape == (32, 96)
    p = build("phi3")
    up = p.model.layers[0].mlp.gate_up_proj.weight.detach().clone()
    rep = ST.prune_structured(p, "channels", 0.25)
    keep = torch.tensor(rep["kept"][0])
    assert torch.equal(p.model.layers[0].mlp.gate_up_proj.weight,
                       torch.cat([up[keep], up[64 + keep]]))  # gate rows, then the same up rows


# ---- mixture-of-experts channels ---------------------------------------------------------------

# the config fields each sparse block's units read (experts; shared expert) and the dense layers'
FIELDS = {"mixtral": ("intermediate_size",),
          "qwen2_moe": ("moe_intermediate_size", "shared_expert_intermediate_size"),
          "qwen3_moe": ("moe_intermediate_size",), "llama4": ("intermediate_size",)}
DENSE_FIELD = {"qwen2_moe": "intermediate_size", "qwen3_moe": "intermediate_size",
               "llama4": "intermediate_size_mlp"}
# every block sparse, and a dense layer beside a sparse one where the architecture has them
MOE_CASES = [(a, {}) for a in MOE] + [("qwen2_moe", {"mlp_only_layers": [0]}),
                                      ("qwen3_moe", {"mlp_only_layers": [1]}),
                                      ("llama4", {"moe_layers": [1]})]


def build_moe(arch, changes, seed=0):
    from archs import config
    from transformers import AutoModelForCausalLM

    cfg = config(arch)
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _moe_units(model) -> list[dict]:
    """Per block {unit: module}: "experts" and "shared_expert" of a sparse block, "mlp" of a
    dense one."""
    out = []
    for layer in model.model.layers:
        ffn = layer.mlp if hasattr(layer, "mlp") else layer.feed_forward
        if not hasattr(ffn, "experts"):
            out.append({"mlp": ffn})
            continue
        out.append({"experts": ffn.experts, **({"shared_expert": ffn.shared_expert}
                                               if hasattr(ffn, "shared_expert") else {})})
    return out


def _down(mod) -> torch.Tensor:
    """A unit's down_proj as (experts, hidden, channels), a view: Llama 4 stores its experts'
    (experts, channels, hidden), a dense MLP is one (hidden, channels) matrix."""
    if not hasattr(mod, "gate_up_proj"):
        return mod.down_proj.weight[None]
    w = mod.down_proj
    return w.transpose(1, 2) if type(mod).__name__ == "Llama4TextExperts" else w


def _as_rows(kept_unit, name):
    return kept_unit if name == "experts" else [kept_unit]


@pytest.mark.parametrize("arch, changes", MOE_CASES,
                         ids=[f"{a}-{'dense+sparse' if c else 'sparse'}" for a, c in MOE_CASES])
def test_moe_channels_go_per_expert_exactly_and_the_model_reloads_equal(arch, changes, tmp_path):
    """Each expert (and shared expert, and dense MLP) gets its own half of the channels zeroed
    in down_proj, different for every expert: those score 0, so each expert must remove exactly
    its own, which changes no logit beyond rounding; the config reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    model, x = build_moe(arch, changes), batch()
    zeroed = []
    with torch.no_grad():
        for units in _moe_units(model):
            row = {}
            for u, (name, mod) in enumerate(units.items()):
                d = _down(mod)
                row[name] = [[j for j in range(d.shape[2]) if (j + e + u) % 4 < 2]
                             for e in range(d.shape[0])]
                for e, cols in enumerate(row[name]):
                    d[e][:, cols] = 0
            zeroed.append(row)
    assert all(len({tuple(z) for z in row["experts"]}) == 4  # four different choices
               for row in zeroed if "experts" in row)
    cfg0, ref = model.config.to_dict(), logits(model, x)
    rep = ST.prune_structured(model, "channels", 0.5, calib=[x])
    for row, kept in zip(zeroed, rep["kept"]):
        assert kept.keys() == row.keys()
        for name, z in row.items():
            width = len(z[0]) * 2
            assert _as_rows(kept[name], name) == [[j for j in range(width) if j not in g]
                                                  for g in z], name
    torch.testing.assert_close(logits(model, x), ref, **TOL)
    used = {*FIELDS[arch], *([DENSE_FIELD[arch]] if changes else [])}
    assert rep["config"] == {f: cfg0[f] // 2 for f in used} and rep["notes"] == []
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for f in {*FIELDS[arch], DENSE_FIELD.get(arch, FIELDS[arch][0])}:  # unused: unchanged
        assert getattr(back.config, f) == (cfg0[f] // 2 if f in used else cfg0[f]), f
    torch.testing.assert_close(logits(back, x), logits(model, x), **TOL)
    count = sum(p.numel() for p in back.parameters())
    assert count == rep["params_after"] == _config_count(back.config) < rep["params_before"]


def _routed_sq(mod, args) -> tuple[torch.Tensor, list[bool]]:
    """Σ over the tokens routed to each expert of its squared down_proj inputs act(gate)·up,
    recomputed in float64 from the experts module's inputs, and which experts got a token.
    Llama 4 passes every token to every expert, scaled by its router score (0: not routed)."""
    w = mod.gate_up_proj.detach().double()
    if type(mod).__name__ == "Llama4TextExperts":  # (E, H, 2I), input (E·T, H)
        xs = args[0].double().view(w.shape[0], -1, w.shape[1])
        gate, up = torch.bmm(xs, w).chunk(2, -1)
        return (mod.act_fn(gate) * up).pow(2).sum(1), [bool(x.abs().sum() > 0) for x in xs]
    hs, idx = args[0].double(), args[1]  # (T, H), (T, top_k); w: (E, 2I, H)
    sq, reached = [], []
    for e in range(w.shape[0]):
        x = hs[(idx == e).any(-1)]
        gate, up = (x @ w[e].T).chunk(2, -1)
        sq.append((mod.act_fn(gate) * up).pow(2).sum(0))
        reached.append(len(x) > 0)
    return torch.stack(sq), reached


def _unit_norms(model, calib) -> list[dict]:
    """Per block {unit: ((rows, channels) ‖X_down‖₂, reached per row)} over ``calib``."""
    units, got = _moe_units(model), {}

    def hook(key, mod):
        def f(m, args):
            if key[1] == "experts":
                sq, reached = _routed_sq(mod, args)
            else:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq, reached = x.pow(2).sum(0)[None], [True]
            old = got.get(key, (0, [False] * len(reached)))
            got[key] = (old[0] + sq, [a or b for a, b in zip(old[1], reached)])
        return f

    hooks = [(mod if name == "experts" else mod.down_proj).register_forward_pre_hook(
        hook((i, name), mod)) for i, us in enumerate(units) for name, mod in us.items()]
    for item in calib:
        logits(model, item)
    for h in hooks:
        h.remove()
    return [{name: (got[i, name][0].sqrt(), got[i, name][1]) for name in us}
            for i, us in enumerate(units)]


@pytest.mark.parametrize("arch", MOE)
def test_each_expert_removes_its_lowest_by_its_own_routed_tokens(arch):
    """Scores per expert, recomputed here: ‖X_e[:, j]‖₂ · Σ_i |W_down,e[i, j]| over the tokens
    routed to expert e (a batch: most experts see some of them; one token: top-k experts
    only, the others scored by Σ|W| alone and named in the notes), Σ|W| without calibration."""
    import re

    dense = build(arch)
    for calib in ([batch()], [batch(shape=(1, 1))], None):
        norms = _unit_norms(dense, calib) if calib else None
        rep = ST.prune_structured(build(arch), "channels", 0.5, calib=calib, sequential=False)
        silent = []
        for i, units in enumerate(_moe_units(dense)):
            for name, mod in units.items():
                mass = _down(mod).detach().double().abs().sum(1)  # (rows, channels)
                x, reached = norms[i][name] if norms else (None, [False] * len(mass))
                for e, keep in enumerate(_as_rows(rep["kept"][i][name], name)):
                    _removed_are_lowest(mass[e] * x[e] if reached[e] else mass[e], keep)
                if norms and name == "experts" and not all(reached):
                    silent.append((i, [e for e, r in enumerate(reached) if not r]))
        notes = [(int(i), [int(e) for e in es.split(", ")]) for i, es in (re.match(
            r"layers\[(\d+)\]\.\w+\.experts: experts \[([\d, ]+)\] received no calibration",
            n).groups() for n in rep["notes"])]
        assert notes == silent and rep["score"] == ("wanda" if calib else "magnitude")
        if calib and calib[0].numel() == 1:
            assert silent, "one token must leave some experts unreached"


def test_moe_channels_refuse_a_config_that_does_not_describe_the_experts():
    m = build("qwen3_moe")
    m.config.moe_intermediate_size = 15
    before = {n: p.shape for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match=r"structure='channels' is refused: layers\[0\]\.mlp\."
                                         r"experts \(Qwen3MoeExperts\) .*moe_intermediate_size = 15"):
        ST.prune_structured(m, "channels", 0.5)
    assert {n: p.shape for n, p in m.named_parameters()} == before
    rep = ST.prune_structured(build("mixtral"), "channels", 0.0)
    assert rep["score"] == "none" and rep["kept"][0]["experts"] == [list(range(64))] * 4
