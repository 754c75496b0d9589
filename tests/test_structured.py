"""Structured pruning (zoengine.sparsity.structured): whole KV groups and MLP channels removed,
tensors and config shrunk, the result a plain dense model that transformers loads."""

import copy

import pytest
import torch

import zoengine
from zoengine.sparsity import structured as ST
from zoengine.sparsity.structured import prune_structured

VOCAB = 128


def llama(seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    args = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=128, num_hidden_layers=2,
                max_position_embeddings=64)
    args.update(kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**args)).eval()


def three_groups(seed=0):
    """6 query heads on 3 KV heads (GQA ratio 2), hidden 48 != 6 x 16, so head_dim is explicit."""
    return llama(seed, hidden_size=48, num_attention_heads=6, num_key_value_heads=3)


def ids(seed=1, b=2, t=12):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(m, x):
    return m(x).logits


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def zero_o_cols(model, layer, groups, r, d):
    o = model.model.layers[layer].self_attn.o_proj.weight
    with torch.no_grad():
        for g in groups:
            o[:, g * r * d:(g + 1) * r * d] = 0


# ---- shapes and config -------------------------------------------------------------------------

def test_channels_quarter_shapes_and_config():
    m = llama()
    x = ids()
    rep = prune_structured(m, "channels", 0.25, calib=[x])
    for layer in m.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (96, 64)
        assert layer.mlp.up_proj.weight.shape == (96, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 96)
        assert layer.self_attn.q_proj.weight.shape == (64, 64)
    assert m.config.intermediate_size == 96
    assert rep["sparsity_achieved"] == 0.25 and rep["removed_per_layer"] == 32
    assert rep["score"] == "wanda" and rep["config"]["intermediate_size"] == 96
    assert rep["params_before"] - rep["params_after"] == 2 * 3 * 32 * 64
    assert [len(k) for k in rep["kept"]] == [96, 96]
    assert logits(m, x).shape == (2, 12, VOCAB)


def test_heads_half_shapes_and_config():
    m = llama()
    rep = prune_structured(m, "heads", 0.5)  # no calib: weights only
    for layer in m.model.layers:
        a = layer.self_attn
        assert a.q_proj.weight.shape == (32, 64)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (16, 64)
        assert a.o_proj.weight.shape == (64, 32)
        assert layer.mlp.down_proj.weight.shape == (64, 128)
    c = m.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 16)
    assert rep["score"] == "magnitude" and rep["unit"] == "kv_group"
    assert rep["params_before"] - rep["params_after"] == 2 * (2 * 32 * 64 + 2 * 16 * 64)
    assert logits(m, ids()).shape == (2, 12, VOCAB)


def test_sparsity_zero_leaves_the_model_unchanged():
    m = llama()
    x = ids()
    before = {n: p.clone() for n, p in m.named_parameters()}
    ref = logits(m, x)
    for structure in ST.STRUCTURES:
        rep = prune_structured(m, structure, 0.0, calib=[x])
        assert rep["sparsity_achieved"] == 0 and rep["params_after"] == rep["params_before"]
    assert torch.equal(logits(m, x), ref)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


# ---- the right structures go -------------------------------------------------------------------

@pytest.mark.parametrize("calibrated", [False, True])
def test_head_pruning_respects_kv_groups(calibrated):
    """Group 1 (KV head 1, query heads 2 and 3) writes nothing: its o_proj columns are zero. It
    must be the group removed, and the pruned model must equal the original: query heads 0, 1
    still read KV head 0 and heads 4, 5 KV head 2."""
    m = three_groups()
    for i in range(2):
        zero_o_cols(m, i, [1], r=2, d=16)
    x = ids()
    ref = logits(m, x)
    pruned = copy.deepcopy(m)
    rep = prune_structured(pruned, "heads", 1 / 3, calib=[x] if calibrated else None)
    assert rep["kept"] == [[0, 2], [0, 2]]
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (4, 2)
    close(logits(pruned, x), ref)
    # not vacuous: removing a different group changes the output
    other = copy.deepcopy(m)
    zero_o_cols(other, 0, [0], r=2, d=16)
    assert (logits(other, x) - ref).abs().max() > 1e-3


def test_heads_wanda_equals_zeroing_the_removed_groups():
    m = three_groups(seed=3)
    x = ids()
    pruned = copy.deepcopy(m)
    rep = prune_structured(pruned, "heads", 2 / 3, calib=[x, ids(2)])
    assert rep["score"] == "wanda" and all(len(k) == 1 for k in rep["kept"])
    zeroed = copy.deepcopy(m)
    for i, kept in enumerate(rep["kept"]):
        zero_o_cols(zeroed, i, [g for g in range(3) if g not in kept], r=2, d=16)
    close(logits(pruned, x), logits(zeroed, x))


def test_channel_pruning_equals_zeroing_those_channels():
    m = llama(seed=4)
    x = ids()
    pruned = copy.deepcopy(m)
    rep = prune_structured(pruned, "channels", 0.25, calib=[x])
    zeroed = copy.deepcopy(m)
    with torch.no_grad():
        for layer, kept in zip(zeroed.model.layers, rep["kept"]):
            gone = sorted(set(range(128)) - set(kept))
            assert len(gone) == 32
            layer.mlp.down_proj.weight[:, gone] = 0
    close(logits(pruned, x), logits(zeroed, x))


@pytest.mark.parametrize("structure", ST.STRUCTURES)
def test_scores_follow_the_documented_formula(structure):
    """Layer 0: the removed units are the lowest of ‖X_j‖₂ · Σ_i |W[i, j]| (down_proj columns;
    o_proj columns summed per group), X taken on the dense model by a hook."""
    m = three_groups(seed=5)
    x = ids(t=16)
    lin = (m.model.layers[0].self_attn.o_proj if structure == "heads"
           else m.model.layers[0].mlp.down_proj)
    seen = []
    h = lin.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    logits(m, x)
    h.remove()
    xn = torch.cat(seen).double().pow(2).sum(0).sqrt()
    score = xn * lin.weight.detach().double().abs().sum(0)
    if structure == "heads":
        score, k = score.view(3, -1).sum(1), 1
    else:
        k = 32
    rep = prune_structured(m, structure, 1 / 3 if structure == "heads" else 0.25, calib=[x])
    gone = set(range(len(score))) - set(rep["kept"][0])
    assert gone == set(score.argsort()[:k].tolist())


def test_sequential_and_single_pass_agree_on_the_first_layer():
    m = llama(seed=6)
    x = ids()
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    ra = prune_structured(a, "channels", 0.5, calib=[x], sequential=True)
    rb = prune_structured(b, "channels", 0.5, calib=[x], sequential=False)
    assert ra["kept"][0] == rb["kept"][0]
    assert ra["sequential"] and not rb["sequential"]


@pytest.mark.parametrize("structure, s, n", [("channels", 0.25, 32), ("heads", 1 / 3, 1)])
def test_block_by_block_calibration_equals_stopped_full_passes(structure, s, n):
    """The sequential path (one captured pass, then block by block) chooses what full passes
    stopped after block i, with blocks < i already pruned, would choose; a dict item with a
    padding mask exercises the captured per-block arguments."""
    from zoengine.sparsity import input_norms

    m = llama(seed=10, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
              num_hidden_layers=3)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    calib = [ids(), {"input_ids": ids(2), "attention_mask": mask}]
    fast = copy.deepcopy(m)
    rep = prune_structured(fast, structure, s, calib=calib)
    slow = copy.deepcopy(m)
    for i, layer in enumerate(slow.model.layers):
        if structure == "heads":
            xn = input_norms(slow, [("o", layer.self_attn.o_proj)], calib, stop_after=layer)["o"]
            keep = ST._keep(ST.group_scores(layer.self_attn, xn, 3, 16), n)
            ST.shrink_heads(layer.self_attn, keep, 2, 16)
        else:
            xn = input_norms(slow, [("d", layer.mlp.down_proj)], calib, stop_after=layer)["d"]
            keep = ST._keep(ST.channel_scores(layer.mlp, xn), n)
            ST.shrink_channels(layer.mlp, keep)
        assert keep.tolist() == rep["kept"][i], i
    x = ids(3)
    assert torch.equal(logits(fast, x), logits(slow, x))


# ---- a plain transformers model ----------------------------------------------------------------

@pytest.mark.parametrize("steps", [[("heads", 0.5)], [("channels", 0.25)],
                                   [("heads", 0.5), ("channels", 0.25)]])
def test_save_and_load_with_plain_transformers(tmp_path, steps):
    from transformers import AutoModelForCausalLM

    m = llama(seed=7, tie_word_embeddings=True)
    x = ids()
    for structure, s in steps:
        prune_structured(m, structure, s, calib=[x])
    ref = logits(m, x)
    m.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert {n: p.shape for n, p in back.named_parameters()} == \
        {n: p.shape for n, p in m.named_parameters()}
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
        assert getattr(back.config, key) == getattr(m.config, key)
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tied embeddings untouched
    assert torch.equal(logits(back, x), ref)


def test_qwen2_layout_with_biases_saves_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(8)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=96,
                                     num_hidden_layers=2)).eval()
    x = ids()
    full = copy.deepcopy(m)
    rep = prune_structured(m, "heads", 0.5, calib=[x])
    assert m.model.layers[0].self_attn.q_proj.bias.shape == (32,)
    assert m.model.layers[0].self_attn.k_proj.bias.shape == (16,)
    assert m.config.head_dim == 16  # explicit: 64 / 2 heads would say 32
    zero_o_cols(full, 0, [1 - rep["kept"][0][0]], r=2, d=16)
    zero_o_cols(full, 1, [1 - rep["kept"][1][0]], r=2, d=16)
    close(logits(m, x), logits(full, x))
    m.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(back, x), logits(m, x))


def test_a_zo_step_trains_the_pruned_model():
    m = llama(seed=9)
    x = ids()
    prune_structured(m, "heads", 0.5, calib=[x])
    prune_structured(m, "channels", 0.25, calib=[x])
    before = {n: p.clone() for n, p in m.named_parameters()}
    opt = zoengine.MeZO(m.named_parameters(), lr=1e-2, eps=1e-3)
    loss = opt.step(lambda: m(input_ids=x, labels=x).loss)
    assert torch.isfinite(torch.as_tensor(loss))
    changed = [n for n, p in m.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.layers.1.mlp.down_proj.weight" in changed


# ---- bad inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("structure, sparsity, match", [
    ("rows", 0.5, r"structure='rows'.*\('heads', 'channels'\)"),
    ("channels", 1.0, r"sparsity=1.0.*\[0, 1\)"),
    ("channels", -0.1, r"sparsity=-0.1.*\[0, 1\)"),
    ("heads", True, r"sparsity=True"),
    ("heads", "0.5", r"sparsity='0.5'"),
    ("heads", 0.3, r"sparsity=0.3.*2 KV groups.*must round.*1/2"),
    ("heads", 0.995, r"sparsity=0.995.*every group"),
])
def test_bad_arguments_name_the_argument_and_the_allowed_values(structure, sparsity, match):
    m = llama()
    with pytest.raises(ValueError, match=match):
        prune_structured(m, structure, sparsity)
    assert m.config.num_attention_heads == 4 and m.config.intermediate_size == 128


def test_heads_sparsity_lists_the_achievable_values():
    m = three_groups()
    with pytest.raises(ValueError, match=r"3 KV groups.*must round.*1/3, 2/3"):
        prune_structured(m, "heads", 0.5)
    prune_structured(m, "heads", 0.33)  # within 0.01 of 1/3
    assert m.config.num_key_value_heads == 2


def test_head_counts_transformers_would_refuse_are_refused():
    # MHA, 4 heads: removing 1 leaves 3, and LlamaConfig wants hidden_size % num_heads == 0
    m = llama(num_key_value_heads=4)
    assert ST.heads_sparsities(m.config) == [0.0, 0.5, 0.75]
    with pytest.raises(ValueError, match=r"sparsity=0.25.*LlamaConfig refuses.*1/2, 3/4"):
        prune_structured(m, "heads", 0.25)


def test_other_architectures_are_refused_by_class_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    g = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LLaMA-layout"):
        prune_structured(g, "heads", 0.5)
    with pytest.raises(ValueError, match=r"Linear.*LLaMA-layout"):
        prune_structured(torch.nn.Linear(3, 3), "channels", 0.5)
