"""Small shared builders for tests (tiny models from configs; nothing is downloaded)."""

import torch


def tiny_mlp(seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def regression_batch(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    return x, y


def mse_closure(model, x, y):
    return lambda: torch.nn.functional.mse_loss(model(x), y)


def tiny_llama(vocab: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Unit in the last place of |x| for a float tensor (smallest subnormal step at 0)."""
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a
