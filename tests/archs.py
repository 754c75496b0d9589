"""Tiny random models of many Hugging Face architectures, built from configs (2 layers, hidden
32, vocab 128; no download): the zoo the architecture tests run every feature on.

``ARCHS``: name -> config factory. ``build(name)`` -> the model in eval mode, seeded.
Layout notes, which the tests rely on: OPT has learned positions (called with the attention
mask), Gemma 1/2/3 scale the embedding's output, GPT-2 uses Conv1D (weight stored in × out),
GPT-2/Phi-3/GPT-NeoX/Falcon/BLOOM fuse q/k/v, Mixtral/Qwen2-MoE/Qwen3-MoE/Llama4 store experts
as 3-D tensors, Llama4's router is an nn.Linear subclass with its own forward.
"""

from __future__ import annotations

import torch

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64)


def _configs():
    import transformers as T

    c, kv = _COMMON, dict(num_key_value_heads=2)
    moe = dict(num_experts_per_tok=2, **kv)
    return {
        "llama": lambda: T.LlamaConfig(intermediate_size=64, **kv, **c),
        "mistral": lambda: T.MistralConfig(intermediate_size=64, **kv, **c),
        "qwen2": lambda: T.Qwen2Config(intermediate_size=64, **kv, **c),
        "qwen3": lambda: T.Qwen3Config(intermediate_size=64, head_dim=8, **kv, **c),
        "gemma": lambda: T.GemmaConfig(intermediate_size=64, head_dim=8, **kv, **c),
        "gemma2": lambda: T.Gemma2Config(intermediate_size=64, head_dim=8, **kv, **c),
        "gemma3": lambda: T.Gemma3TextConfig(intermediate_size=64, head_dim=8, **kv, **c),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, ffn_dim=64,
                                   max_position_embeddings=64, word_embed_proj_dim=32),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=0, eos_token_id=0),
        "phi": lambda: T.PhiConfig(intermediate_size=64, **c),
        "phi3": lambda: T.Phi3Config(intermediate_size=64, pad_token_id=0, bos_token_id=0,
                                     eos_token_id=0, **kv, **c),
        "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4),
        "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        "gpt_neox": lambda: T.GPTNeoXConfig(intermediate_size=64, **c),
        "mixtral": lambda: T.MixtralConfig(intermediate_size=64, num_local_experts=4, **moe, **c),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=32,
                                              num_experts=4, **moe, **c),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16,
                                              num_experts=4, head_dim=8, **moe, **c),
        "llama4": lambda: T.Llama4TextConfig(intermediate_size=64, intermediate_size_mlp=64,
                                             head_dim=8, num_local_experts=4,
                                             num_experts_per_tok=1, **kv, **c),
    }


ARCHS = tuple(_configs())


def config(name: str):
    return _configs()[name]()


def build(name: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(name)).eval()


def batch(seed: int = 3, shape=(3, 9)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, shape, generator=g)


def save_word_tokenizer(folder: str, size: int | None = None) -> None:
    """The CLI tests' word-level tokenizer (test_cli.WORDS first, then fillers ``w<i>`` up to
    ``size`` entries), saved into ``folder``."""
    from test_cli import WORDS
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab.update({f"w{i}": i for i in range(len(WORDS), size or len(WORDS))})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                            eos_token="<eos>").save_pretrained(folder)


def save(name: str, folder: str, seed: int = 0) -> str:
    """The zoo model ``name`` and a word-level tokenizer of VOCAB entries, saved as a local
    Hugging Face model folder."""
    model = build(name, seed)
    for key, value in (("pad_token_id", 0), ("eos_token_id", 2), ("bos_token_id", 2)):
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    save_word_tokenizer(folder, VOCAB)
    return folder
