"""Small shared builders for tests (tiny models from configs; nothing is downloaded)."""

import torch

import zoengine
from zoengine.optim import ZO


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


def virtual(opt, model):
    """``opt`` after ``opt.attach_virtual(model)``: virtual perturbation in one expression."""
    opt.attach_virtual(model)
    return opt


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Unit in the last place of |x| for a float tensor (smallest subnormal step at 0)."""
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


# Every preset and allowed combination, as factories (params, **kw) -> optimizer.
CONFIGS = {
    "mezo": lambda ps, **kw: zoengine.MeZO(ps, **kw),
    "mezo-rademacher": lambda ps, **kw: zoengine.MeZO(ps, dist="rademacher", **kw),
    "kerzoo": lambda ps, **kw: zoengine.KerZOO(ps, **kw),
    "kerzoo-a0.5-uniform": lambda ps, **kw: zoengine.KerZOO(ps, r_range=0.5, dist="uniform", **kw),
    "pezo-pool": lambda ps, **kw: zoengine.PeZO(ps, pool_size=4099, **kw),
    "pezo-rotate": lambda ps, **kw: zoengine.PeZO(ps, reuse="rotate", lanes=7, **kw),
    "pezo-fresh-adaptive": lambda ps, **kw: zoengine.PeZO(ps, reuse=None, **kw),
    "pezo-fresh-static": lambda ps, **kw: zoengine.PeZO(ps, reuse=None, scaling="static", **kw),
    "kerzoo+pezo-pool": lambda ps, **kw: ZO(ps, noise="pool", estimator="kernel",
                                            pool_size=4099, **kw),
    "kerzoo+pezo-rotate": lambda ps, **kw: ZO(ps, noise="rotate", estimator="kernel", lanes=5,
                                              **kw),
}
