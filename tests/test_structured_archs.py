"""Structured pruning on every architecture of the zoo (tests/archs.py): each (architecture,
structure) either works — the pruned model equals the dense one with the removed units zeroed,
reloads with plain transformers to the same logits, has the parameter count of its config, and
removed the lowest-scoring units — or is refused with a ValueError naming the structure and why.

Tolerances. Reload: the same weights through the same code on the same CPU are bit-identical in
practice (measured max |Δ| = 0); the assertion allows fp32 summation-order differences,
|Δ| ≤ K·u·Σ|terms| with u = 2⁻²⁴ and K ≤ 128 terms at these sizes, i.e. ~1e-5 relative to
logits of order 1. Against the zeroed dense model the removed terms are exact zeros but the
kept sums run over a different length (pruned K' < K), the same bound.
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
    "channels": (*LLAMA_LIKE, "opt", "gpt2", "phi", "phi3", "falcon", "gpt_neox"),
}
REFUSED = {
    "heads": {a: r"structure='heads' is refused: its attention computes head_dim as "
                 r"hidden_size // num_attention_heads" for a in
              ("opt", "gpt2", "falcon", "bloom", "gpt_neox")},
    "channels": {"bloom": r"structure='channels' is refused: BloomMLP's width is 4 x hidden_size",
                 **{a: r"structure='channels' is refused: .*3-D expert tensors" for a in MOE}},
}
CASES = [(a, s, sp) for s in WORKS for a in WORKS[s] for sp in (0.25, 0.5)]


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


@pytest.mark.parametrize("arch, structure", [(a, s) for s in WORKS for a in WORKS[s]])
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
