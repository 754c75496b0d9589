"""Pruning beyond nn.Linear: GPT-2's Conv1D (stored (in, out)) and the 3-D expert tensors of
transformers 5's mixture-of-experts models ((experts, out, in), or (experts, in, out) for
GPT-OSS and Llama4). Every weight of the blocks is pruned or listed as not pruned (routers),
N:M groups run along each layout's input dimension, each expert is its own matrix with Wanda
norms of the tokens routed to it, and the zeros survive ZO training bit for bit.

Tiny models from configs (2 layers, hidden 32, vocabulary 128, 4 experts); a few seconds each.
"""

import copy

import pytest
import torch

import zoengine
from zoengine import sparsity as S
from zoengine.sparsity.masks import describe_report, nm_ok, prunable_weights
from zoengine.sparsity.pruners import _collect_norms

torch.set_num_threads(1)

BASE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, vocab_size=128,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _config(arch):
    import transformers as T

    return {
        "mixtral": lambda: T.MixtralConfig(**BASE, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**BASE, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=16,
                                              shared_expert_intermediate_size=48),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**BASE, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=16, head_dim=8),
        "llama4": lambda: T.Llama4TextConfig(**BASE, num_local_experts=4,
                                             num_experts_per_tok=1, intermediate_size_mlp=64,
                                             head_dim=8),
        "gpt_oss": lambda: T.GptOssConfig(**BASE, num_local_experts=4, num_experts_per_tok=2,
                                          head_dim=8, layer_types=["full_attention"] * 2),
        "gpt2": lambda: T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128,
                                     n_positions=64, bos_token_id=0, eos_token_id=0),
    }[arch]()


def _model(arch, seed=0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(arch), **kw).eval()


def _calib(seed=0, n=4, t=16):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "llama4", "gpt_oss", "gpt2"]
EXPECTED_LAYOUTS = {"mixtral": {"linear", "experts"}, "qwen2_moe": {"linear", "experts"},
                    "qwen3_moe": {"linear", "experts"}, "llama4": {"linear", "experts_t"},
                    "gpt_oss": {"linear", "experts_t"}, "gpt2": {"conv1d"}}


def _block_weights(model):
    """Every parameter of the decoder blocks with 2+ dimensions that is not a bias."""
    return {n: p for n, p in model.named_parameters()
            if (".layers." in n or ".h." in n) and p.dim() >= 2 and not n.endswith("_bias")}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_every_block_weight_is_pruned_or_listed_and_the_report_is_true(arch, method):
    model = _model(arch)
    masks = S.prune(model, method, 0.5, calib=_calib() if method == "wanda" else None)
    ws = {w.name: w for w in prunable_weights(model)}
    assert {w.layout for w in ws.values()} == EXPECTED_LAYOUTS[arch]
    assert set(masks) == set(ws)
    rep = S.sparsity_report(model, masks)
    listed = {n for v in rep["not_pruned"].values() for n in v["names"]}
    block = _block_weights(model)
    for n in block:  # never silently skipped: pruned, or listed (routers only, here)
        assert n in masks or n in rep["not_pruned"].get("router", {"names": ()})["names"], n
    assert not (set(masks) & listed)
    if arch != "gpt2":
        assert rep["not_pruned"]["router"]["tensors"] >= 2 and "experts" in rep["per_kind"]
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in masks)
    numel = sum(params[n].numel() for n in masks)
    assert rep["zeros"] == zeros and rep["numel"] == numel
    assert sum(k["numel"] for k in rep["per_kind"].values()) == numel
    rows = 0
    for n, keep in masks.items():  # each (expert) matrix: round(0.5 * in) zeros per row
        w = ws[n]
        assert torch.equal(params[n] == 0, ~keep), n
        per_row = (~w.as_matrices(keep)).sum(-1)
        assert torch.all(per_row == round(0.5 * w.in_features)), n
        rows += per_row.numel()
    assert abs(rep["sparsity"] - 0.5) * numel <= rows / 2
    # every zero of the block weights is a masked one, and the only block weights left dense
    # are the routers: the share over the blocks is the target (it was 5 % for Mixtral)
    assert sum(int((p == 0).sum()) for p in block.values()) == zeros
    routers = [n for n in rep["not_pruned"].get("router", {"names": []})["names"] if n in block]
    assert sum(p.numel() for p in block.values()) == numel + sum(params[n].numel()
                                                                 for n in routers)


@pytest.mark.parametrize("arch", ARCHS)
def test_nm_runs_along_the_input_dimension_of_every_layout(arch):
    model = _model(arch)
    S.prune(model, "magnitude", pattern="2:4")
    params = dict(model.named_parameters())
    for w in prunable_weights(model):
        p = params[w.name]
        # by hand: move the input dimension last, whatever the storage
        by_hand = (p.t() if w.layout == "conv1d" else
                   p.transpose(1, 2) if w.layout == "experts_t" else p)
        assert bool(((by_hand != 0).reshape(-1, 4).sum(-1) == 2).all()), w.name
        assert nm_ok(p, 2, 4, dim=w.in_dim), w.name
        if w.layout in ("conv1d", "experts_t"):  # the stored last dim is the output
            assert not nm_ok(p, 2, 4), w.name


def test_gpt2_conv1d_wanda_equals_the_hand_made_transposed_scores():
    """Independent of the pruner's layout code: Σx² from a test-side hook on each Conv1D, the
    score |W| · ‖x‖ on the (in, out) weight, 2:4 groups of 4 consecutive *rows* (inputs)."""
    model = _model("gpt2")
    ref = copy.deepcopy(model)
    calib = _calib()
    sums, hooks = {}, []
    for n, m in ref.named_modules():
        if type(m).__name__ == "Conv1D":
            def hook(_m, args, n=n):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[n] = sums.get(n, 0) + x.pow(2).sum(0)
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        ref(calib)
    for h in hooks:
        h.remove()
    masks = S.prune(model, "wanda", pattern="2:4", calib=calib, sequential=False)
    assert len(masks) == len(sums) == 8
    for n, s in sums.items():
        w = dict(ref.named_modules())[n].weight.detach()  # (in, out)
        score = w.abs().float() * s.sqrt().float().unsqueeze(1)
        groups = score.reshape(-1, 4, score.shape[1])  # (in/4, 4, out)
        drop = groups.argsort(dim=1, stable=True)[:, :2, :]
        want = torch.ones_like(groups, dtype=torch.bool).scatter_(1, drop, False)
        assert torch.equal(masks[f"{n}.weight"], want.reshape(w.shape)), n


def test_mixtral_wanda_norms_are_those_of_the_tokens_routed_to_each_expert(monkeypatch):
    """The eager Mixtral forward calls F.linear(x, W[e]) per expert: record the inputs it
    really passes (by the storage offset of W[e]) and compare with the pruner's norms."""
    model = _model("mixtral", experts_implementation="eager")
    calib = _calib(n=3)
    ws = prunable_weights(model)
    ours = _collect_norms(model, ws, calib)
    seen = {}
    experts = {w.name: w for w in ws if w.layout == "experts"}
    storage = {w.weight.untyped_storage().data_ptr(): w for w in experts.values()}
    real_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        w = storage.get(weight.untyped_storage().data_ptr())
        if w is not None:
            e = weight.storage_offset() // weight.numel()
            acc = seen.setdefault(w.name, torch.zeros(w.matrices, w.in_features,
                                                      dtype=torch.float64))
            acc[e] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        return real_linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with torch.no_grad():
        model(calib)
    monkeypatch.undo()
    assert set(seen) == set(experts) and len(seen) == 4
    routed = 0
    for n, acc in seen.items():
        # inputs of the same tokens; h differs from F.linear's only by float32 rounding of
        # two products of length <= 64 (relative 64 * 2^-24 per element, squared and summed)
        assert torch.allclose(ours[n], acc, rtol=1e-5, atol=0), n
        routed += int((acc.sum(1) > 0).sum())
        # experts differ: each sees its own tokens, not the layer's
        assert not torch.allclose(acc[0], acc[1])
    assert routed == 4 * 4  # every expert got tokens here (2 of 4 per token, 48 tokens)


def test_wanda_refuses_an_experts_module_it_would_misread():
    """If the recomputation differs from the module's own forward (here: an eager Mixtral
    whose _apply_gate, unused by its forward, is swapped), Wanda refuses and names the way
    out; magnitude still works."""
    model = _model("mixtral", experts_implementation="eager")
    ex = model.model.layers[0].mlp.experts
    ex._apply_gate = lambda h: torch.nn.functional.silu(h.chunk(2, -1)[1]) * h.chunk(2, -1)[0]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts.*method='magnitude'"):
        S.prune(model, "wanda", calib=_calib())
    assert S.prune(model, "magnitude")


def test_an_expert_no_token_reaches_is_scored_by_magnitude_and_noted():
    model = _model("gpt_oss")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[3] = -1e4  # never in the top 2
    ref = copy.deepcopy(model)
    masks = S.prune(model, "wanda", 0.5, calib=_calib())
    mag = S.prune(ref, "magnitude", 0.5)
    name = "model.layers.0.mlp.experts.down_proj"
    assert any(f"expert [3] of {name} " in n for n in masks.notes), masks.notes
    assert torch.equal(masks[name][3], mag[name][3])  # |W| alone for the silent expert
    assert not torch.equal(masks[name][0], mag[name][0])  # activations for the others


def test_routers_are_never_pruned_even_when_a_regex_matches_them():
    for arch, router in (("mixtral", "mlp.gate"), ("llama4", "feed_forward.router"),
                         ("qwen2_moe", "mlp.shared_expert_gate")):
        model = _model(arch)
        masks = S.prune(model, "magnitude", layers=r"mlp|feed_forward")
        assert masks and not any(router in n for n in masks), arch
        w = dict(model.named_parameters())[f"model.layers.0.{router}.weight"]
        assert bool((w != 0).all()), arch


def test_an_unknown_3d_layout_is_refused_naming_it_and_the_way_out():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.Parameter(torch.randn(2, 8, 8))
            self.proj = torch.nn.Linear(8, 8)

    model = torch.nn.Sequential(torch.nn.ModuleList([Odd()]))
    with pytest.raises(ValueError, match=r"0\.0\.experts .*layers="):
        S.prune(model, "magnitude")
    masks = S.prune(model, "magnitude", layers=r"proj")
    assert set(masks) == {"0.0.proj.weight"}


def test_masks_from_zeros_and_the_cli_line_cover_experts_and_conv1d():
    from zoengine.run.pruning import masks_for_run

    for arch in ("mixtral", "gpt2"):
        model = _model(arch)
        lines = []
        masks = masks_for_run(model, None, prune_spec="magnitude:2:4", log=lines.append)
        again = S.masks_from_zeros(model)
        assert set(again) == set(masks)
        assert all(torch.equal(again[n], masks[n]) for n in masks)
        line = lines[0]
        rep = S.sparsity_report(model, masks)
        assert describe_report(rep) in line and "sparsity 0.5000" in line
        if arch == "mixtral":
            assert "experts 0.5000 of 49,152" in line and "router 256 (2 tensors)" in line
        else:
            assert "attention 0.5000" in line and "mlp 0.5000" in line


def _lm_closure(model, seed):
    ids = _calib(seed=100 + seed, n=2, t=12)
    return lambda: model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("arch, method, backend", [("mixtral", "wanda", "reference"),
                                                   ("mixtral", "magnitude", "native"),
                                                   ("gpt2", "wanda", "native"),
                                                   ("llama4", "magnitude", "native")])
def test_zeros_stay_exactly_zero_through_mezo_steps(arch, method, backend):
    model = _model(arch)
    masks = S.prune(model, method, pattern="2:4",
                    calib=_calib() if method == "wanda" else None)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = zoengine.MeZO(model.named_parameters(), lr=1e-3, eps=1e-3, weight_decay=0.1,
                        masks=masks, backend=backend)
    for s in range(3):
        opt.step(_lm_closure(model, s))
    params = dict(model.named_parameters())
    for n, keep in masks.items():
        p = params[n]
        assert torch.equal(p[~keep], torch.zeros_like(p[~keep])), n  # bit-exact +0.0
        assert not torch.signbit(p[~keep]).any(), n
        assert torch.all(p[keep] != start[n][keep]), n  # the live weights trained
    w = next(w for w in prunable_weights(model) if w.layout != "linear")
    assert nm_ok(params[w.name], 2, 4, dim=w.in_dim)
