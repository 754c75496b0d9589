"""Sparsity-preserving LoRA (zoengine.sparsity.lora): ΔW = (B·A) ⊙ M in the forward and in the
merge, so the merged model keeps every pruned zero and its outputs equal the adapter model's."""

import math
import weakref

import pytest
import torch
from helpers import tiny_llama
from peft import PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

import zoengine
from zoengine.sparsity import lora as mlora
from zoengine.sparsity import nm_ok, prune
from zoengine.sparsity.lora import (
    MaskedLoraLinear,
    lora_config,
    mask_lora,
    merge_masked_lora,
    unmask_lora,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
K_MAX = 64  # the longest dot product of the tiny Llama (down_proj's in_features)


def _ids(seed=1):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def _pruned(pattern="unstructured", dtype=torch.float32, seed=0):
    model = tiny_llama(seed=seed).to(dtype)
    sparsity = 0.5 if pattern == "unstructured" else None
    return model, prune(model, "magnitude", sparsity, pattern)


def _peft(model, targets=ALL, scaling="lora", **extra):
    # init_lora_weights=False: B is not zero, so the delta is non-trivial from the start
    return get_peft_model(model, lora_config(8, 16, targets, scaling, init_lora_weights=False,
                                             **extra))


def _mezo_steps(pm, ids, steps=3):
    params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    before = [p.detach().clone() for _, p in params]
    opt = zoengine.MeZO(params, lr=1e-2)
    for _ in range(steps):
        opt.step(lambda: pm(input_ids=ids, labels=ids).loss)
    assert any(not torch.equal(b, p) for b, (_, p) in zip(before, params)), "MeZO moved nothing"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _zeros_kept(model, masks):
    params = {n.replace(".base_layer", ""): p for n, p in model.named_parameters()}
    for name, keep in masks.items():
        w = params[name]
        pruned = w.detach()[~keep]
        assert bool((pruned == 0).all()), f"{name}: pruned weights became non-zero"
        assert not bool(torch.signbit(pruned).any()), f"{name}: -0.0 among the pruned weights"


def _sparsity(model, masks):
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in masks)
    return zeros / sum(params[n].numel() for n in masks)


# ---- train, merge, compare ---------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_trained_masked_lora_merges_to_the_pruned_zeros(pattern):
    model, masks = _pruned(pattern)
    pm = _peft(model)
    names = mask_lora(pm, masks)
    assert len(names) == len(masks) == 14
    assert all(dict(pm.named_modules())[n].zo_reads_weights_directly for n in names)
    ids = _ids()
    _mezo_steps(pm, ids)
    adapter_logits = _logits(pm, ids)

    merged = merge_masked_lora(pm)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    _zeros_kept(merged, masks)
    assert _sparsity(merged, masks) == pytest.approx(0.5, abs=1e-9)
    if pattern == "2:4":
        params = dict(merged.named_parameters())
        assert all(nm_ok(params[n], 2, 4) for n in masks)
    # Tolerance: merged computes x·(W + sΔ)ᵀ, the adapter x·Wᵀ + s·(x·Δᵀ): both are fp32
    # roundings of the same sums. A length-K fp32 dot product is within K·eps of its exact value
    # relative to the output's scale, so K_MAX·eps·max|logits| (7.6e-6·|logits|) bounds the gap
    # generously (measured: 1.3e-7 unstructured, 1.7e-7 2:4, logits ~0.46).
    tol = K_MAX * EPS32 * float(adapter_logits.abs().max())
    assert (_logits(merged, ids) - adapter_logits).abs().max().item() <= tol


def test_float64_merge_matches_the_masked_forward_to_rounding():
    # the algebra, without fp32 noise: a wrong mask or scale would show at ~1e-2
    model, masks = _pruned("2:4", torch.float64)
    pm = _peft(model)
    mask_lora(pm, masks)
    ids = _ids()
    adapter_logits = _logits(pm, ids)
    merged = merge_masked_lora(pm)
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float64
    torch.testing.assert_close(_logits(merged, ids), adapter_logits, atol=1e-12, rtol=0)
    _zeros_kept(merged, masks)


def test_plain_lora_merge_refills_the_zeros():
    # the problem masked LoRA solves: PEFT's merge adds a dense B·A
    model, masks = _pruned("2:4")
    assert _sparsity(model, masks) == pytest.approx(0.5)
    merged = _peft(model).merge_and_unload()
    params = dict(merged.named_parameters())
    assert _sparsity(merged, masks) < 0.01  # 50 % zeros -> 0 %
    assert not any(nm_ok(params[n], 2, 4) for n in masks)


def test_peft_merge_and_unload_of_a_masked_model_keeps_the_zeros():
    # get_delta_weight is masked, so PEFT's own merge path is safe too
    model, masks = _pruned("2:4")
    pm = _peft(model)
    mask_lora(pm, masks)
    ids = _ids()
    adapter_logits = _logits(pm, ids)
    merged = pm.merge_and_unload()
    _zeros_kept(merged, masks)
    tol = K_MAX * EPS32 * float(adapter_logits.abs().max())
    assert (_logits(merged, ids) - adapter_logits).abs().max().item() <= tol


# ---- the masked forward ------------------------------------------------------------------------

@pytest.mark.parametrize("scaling,scale", [("lora", 16 / 8), ("rslora", 16 / math.sqrt(8))])
def test_scaling_and_masked_forward_formula(scaling, scale):
    model, masks = _pruned()
    pm = _peft(model, ["q_proj"], scaling)
    mask_lora(pm, masks)
    mod = pm.base_model.model.model.layers[1].self_attn.q_proj
    assert isinstance(mod, MaskedLoraLinear)
    assert mod.scaling["default"] == pytest.approx(scale, rel=1e-12)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    keep = masks["model.layers.1.self_attn.q_proj.weight"]
    a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
    with torch.no_grad():
        want = mod.base_layer(x) + x @ ((b @ a) * keep).T * scale
        got = mod(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_lora_config_validates_scaling():
    assert lora_config(4, 8, ["q_proj"]).use_rslora is False
    assert lora_config(4, 8, ["q_proj"], "rslora").use_rslora is True
    with pytest.raises(ValueError, match=r"scaling='rora'.*'lora', 'rslora'"):
        lora_config(4, 8, ["q_proj"], "rora")


def test_at_most_one_layer_delta_is_alive(monkeypatch):
    model, masks = _pruned()
    pm = _peft(model)
    names = mask_lora(pm, masks)
    live, most, calls = [], [0], [0]
    real = mlora._masked_delta

    def tracked(module, adapter, dtype=None):
        delta = real(module, adapter, dtype)
        live[:] = [r for r in live if r() is not None] + [weakref.ref(delta)]
        most[0], calls[0] = max(most[0], len(live)), calls[0] + 1
        return delta

    def after(_mod, _args, _out):  # the layer's delta is gone when its forward returns
        assert all(r() is None for r in live)

    monkeypatch.setattr(mlora, "_masked_delta", tracked)
    modules = dict(pm.named_modules())
    hooks = [modules[n].register_forward_hook(after) for n in names]
    try:
        _logits(pm, _ids())
    finally:
        for h in hooks:
            h.remove()
    assert calls[0] == len(names) and most[0] == 1


def test_masks_none_derives_the_zeros_and_unmask_restores_peft():
    model, masks = _pruned()
    pm = _peft(model)
    ids = _ids()
    plain = _logits(pm, ids)
    names = mask_lora(pm)  # M = (W != 0)
    assert len(names) == 14
    masked = _logits(pm, ids)
    mask_lora(pm, masks)
    assert torch.equal(_logits(pm, ids), masked)
    assert not torch.allclose(masked, plain)
    assert sorted(unmask_lora(pm)) == sorted(names)
    assert not any(isinstance(m, MaskedLoraLinear) for m in pm.modules())
    assert not any(mlora._BITS in dict(m.named_buffers()) for m in pm.modules())
    assert torch.equal(_logits(pm, ids), plain)


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_masks_are_refused_by_name():
    model, masks = _pruned()
    pm = _peft(model, ["q_proj", "v_proj"])
    q = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.nope\.weight'.*not a "
                                         r"weight of the model"):
        mask_lora(pm, {"model.layers.0.self_attn.nope.weight": masks[q]})
    lora_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.default\.weight.*not the base weight"):
        mask_lora(pm, {lora_a: torch.ones(8, 32, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"q_proj\.weight.*shape \(32, 16\).*base weight has "
                                         r"shape \(32, 32\)"):
        mask_lora(pm, {q: masks[q][:, :16]})
    with pytest.raises(ValueError, match=r"q_proj\.weight.*non-zero base weights"):
        mask_lora(pm, {q: torch.zeros(32, 32, dtype=torch.bool)})
    # a frozen weight no LoRA layer wraps keeps its zeros anyway: skipped, or refused if strict
    k = "model.layers.0.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match=r"k_proj\.weight.*not the base weight"):
        mask_lora(pm, {k: masks[k]}, strict=True)
    assert not any(isinstance(m, MaskedLoraLinear) for m in pm.modules())  # nothing half-done
    names = mask_lora(pm, masks)
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)


def test_dora_is_refused_naming_the_module():
    model, masks = _pruned()
    pm = _peft(model, ["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*"
                                         r"variant.*DoRA"):
        mask_lora(pm, masks, strict=False)
    with pytest.raises(ValueError, match=r"q_proj.*variant"):
        mask_lora(pm)


# ---- PEFT saving -------------------------------------------------------------------------------

def test_adapter_saves_and_loads_with_peft(tmp_path):
    model, masks = _pruned("2:4")
    pm = _peft(model)
    mask_lora(pm, masks)
    ids = _ids()
    _mezo_steps(pm, ids, steps=2)
    want = _logits(pm, ids)
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # no mask in the adapter file

    base, masks2 = _pruned("2:4")
    assert all(torch.equal(masks[n], masks2[n]) for n in masks)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert not torch.equal(_logits(loaded, ids), want)  # unmasked: not the trained model
    mask_lora(loaded)  # the zeros of the pruned base give the same masks
    assert torch.equal(_logits(loaded, ids), want)


def test_fan_in_fan_out_layers_gpt2_conv1d():
    # GPT-2 stores Conv1D weights as (in, out): the mask is in that orientation, B·A is not
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4,
                                       n_positions=32)).eval()
    g = torch.Generator().manual_seed(3)
    masks = {}
    with torch.no_grad():
        for name in ("c_attn", "c_fc"):
            w = getattr(model.transformer.h[0], "attn" if name == "c_attn" else "mlp")
            w = getattr(w, name).weight
            keep = torch.rand(w.shape, generator=g) < 0.5
            w.masked_fill_(~keep, 0.0)
            masks[w] = keep
    assert all(k.shape[0] != k.shape[1] for k in masks.values())
    pm = get_peft_model(model, lora_config(4, 8, ["c_attn", "c_fc"], init_lora_weights=False,
                                           fan_in_fan_out=True))
    assert len(mask_lora(pm, masks)) == 2  # keyed by the base weights themselves
    ids = _ids()
    adapter_logits = _logits(pm, ids)
    merged = merge_masked_lora(pm)
    for w, keep in masks.items():
        assert bool((w[~keep] == 0).all()) and bool((w[keep] != 0).any())
    tol = K_MAX * 2 * EPS32 * float(adapter_logits.abs().max())  # c_proj: K = 4·32 = 128
    assert (_logits(merged, ids) - adapter_logits).abs().max().item() <= tol


def test_other_lora_layer_types_are_refused_when_masked():
    model, _ = _pruned()
    pm = _peft(model, ["q_proj", "embed_tokens"])
    emb = "model.embed_tokens.weight"
    with pytest.raises(ValueError, match=r"embed_tokens\.weight.*Embedding.*plain lora\.Linear"):
        mask_lora(pm, {emb: torch.ones(128, 32, dtype=torch.bool)})
    assert len(mask_lora(pm)) == 2  # masks=None: the q_proj layers only
