"""The memory planner counts parameters exactly from a config: ``ModelShape.of(config)`` against
``sum(p.numel())`` of the model built from that same config, for 15 architectures (tiny: 2
layers, hidden 32, vocabulary 128, 4 experts). Before the meta-device count the formula was off
by -84 % (Mixtral), -87 % (Qwen2-MoE), +21 % (GPT-2, OPT) and +38 % (Falcon) on real sizes."""

import pytest
import torch

from zoengine.sparsity import memory as M
from zoengine.sparsity.masks import prunable_weights

torch.set_num_threads(1)

BASE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, vocab_size=128,
            num_attention_heads=4, max_position_embeddings=64)


def _configs():
    import transformers as T

    gqa = dict(BASE, num_key_value_heads=2)
    return {
        "llama": lambda: T.LlamaConfig(**gqa),
        "opt": lambda: T.OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64,
                                   word_embed_proj_dim=32, vocab_size=128,
                                   num_attention_heads=4, max_position_embeddings=64),
        "gpt2": lambda: T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128,
                                     n_positions=64, bos_token_id=0, eos_token_id=0),
        "gemma": lambda: T.GemmaConfig(**gqa, head_dim=8),
        "gemma2": lambda: T.Gemma2Config(**gqa, head_dim=8),
        "qwen2": lambda: T.Qwen2Config(**gqa),
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=8),
        "mistral": lambda: T.MistralConfig(**gqa),
        "phi": lambda: T.PhiConfig(**BASE),
        "phi3": lambda: T.Phi3Config(**BASE, pad_token_id=0),
        "falcon": lambda: T.FalconConfig(num_hidden_layers=2, hidden_size=32, vocab_size=128,
                                         num_attention_heads=4),
        "bloom": lambda: T.BloomConfig(n_layer=2, hidden_size=32, vocab_size=128, n_head=4),
        "gpt_neox": lambda: T.GPTNeoXConfig(**BASE),
        "mixtral": lambda: T.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**gqa, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=16,
                                              shared_expert_intermediate_size=48),
    }


CONFIGS = sorted(_configs())


# each architecture with its default tying, and four with the other setting
CASES = [(a, None) for a in CONFIGS] + [("gpt2", False), ("opt", False), ("llama", True),
                                         ("mixtral", True)]


@pytest.mark.parametrize("arch, tied", CASES)
def test_config_count_equals_the_built_model(arch, tied):
    from transformers import AutoModelForCausalLM

    cfg = _configs()[arch]()
    if tied is not None:
        cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    built = sum(p.numel() for p in model.parameters())  # unique tensors: a tied head once
    shape = M.ModelShape.of(cfg)
    assert shape.source == "meta"
    assert shape.params == built, (arch, shape.params, built)
    assert shape.largest_tensor == max(p.numel() for p in model.parameters())
    ws = prunable_weights(model)
    assert shape.masked == sum(w.weight.numel() for w in ws)
    assert shape.largest_masked == max(w.weight.numel() for w in ws)
    # the loaded model gives the same shape as its config
    assert M.ModelShape.of(model).params == built


def test_a_dict_with_model_type_is_built_and_one_without_uses_the_formula():
    from transformers import MixtralConfig

    d = dict(BASE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    exact = M.ModelShape.of(MixtralConfig(**d)).params
    assert M.ModelShape.of({**d, "model_type": "mixtral"}).params == exact
    formula = M.ModelShape.of(d)
    assert formula.source == "formula" and formula.params < exact  # experts are not in it


def test_mixtral_8x7b_is_counted_from_its_config():
    """46.7 B parameters (Mistral AI's model card), from the config alone; the old formula
    said 7.2 B (-84 %)."""
    from transformers import MixtralConfig

    shape = M.ModelShape.of(MixtralConfig())  # its defaults are Mixtral-8x7B's
    assert shape.params == 46_702_792_704
    plan = M.predict(MixtralConfig(), "mezo", 1, 32, "bfloat16", runtime=0)
    assert plan.breakdown["params"] == 2 * 46_702_792_704
