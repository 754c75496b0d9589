"""rng_budget() against an independent count: every Philox4x32 call and every generated value of
one real step, counted by wrapping the generator functions the kernels call."""

import pytest
import torch

import zoengine
from zoengine.kernels import philox, reference, reuse
from zoengine.optim import ZO, estimators


class Counter:
    def __init__(self, monkeypatch):
        self.blocks = self.numbers = 0
        for module in (philox, reference, reuse, estimators):  # every importer of philox4x32
            monkeypatch.setattr(module, "philox4x32", self._philox(module.philox4x32))
        monkeypatch.setattr(reference, "noise_blocks", self._values(reference.noise_blocks))
        lanes = self._values(reuse.lane_uniform)
        # lanes, and the pool drawn at construction (reuse.make_pool)
        monkeypatch.setattr(reuse, "lane_uniform", lanes)

    def _philox(self, fn):
        def counted(c0, *args, **kwargs):
            self.blocks += c0.numel()
            return fn(c0, *args, **kwargs)
        return counted

    def _values(self, fn):
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.numbers += out.numel()
            return out
        return counted


def _params(sizes, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype) * 0.1) for n in sizes]


CASES = {
    "mezo-normal-1": (lambda ps: zoengine.MeZO(ps, backend="reference"), [7, 300, 5]),
    "mezo-uniform-3": (lambda ps: zoengine.MeZO(ps, dist="uniform", n_samples=3,
                                                backend="reference"), [70001, 9]),
    "kerzoo-2": (lambda ps: zoengine.KerZOO(ps, n_samples=2, backend="reference"), [13, 4]),
    "rotate-adaptive-d300": (lambda ps: zoengine.PeZO(ps, reuse="rotate", lanes=8), [300]),
    "rotate-adaptive-shared-window": (lambda ps: zoengine.PeZO(ps, reuse="rotate", n_samples=2),
                                      [100, 20000, 3]),
    "rotate-static": (lambda ps: zoengine.PeZO(ps, reuse="rotate", scaling="static"),
                      [70000, 11]),
    "fresh-adaptive": (lambda ps: zoengine.PeZO(ps, reuse=None), [50]),
    "pool": (lambda ps: zoengine.PeZO(ps, pool_size=1000, n_samples=2), [300, 9]),
    "kerzoo+pool": (lambda ps: ZO(ps, noise="pool", estimator="kernel", pool_size=999), [40]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_budget_counts_what_one_step_generates(name, monkeypatch):
    factory, sizes = CASES[name]
    params = _params(sizes)
    opt = factory(params)
    budget = opt.rng_budget()
    count = Counter(monkeypatch)
    opt.step(lambda: sum((p.double() ** 2).sum() for p in params))
    assert budget["philox_blocks_per_step"] == count.blocks
    assert budget["numbers_generated_per_step"] == count.numbers
    assert budget["d"] == sum(sizes)
    assert budget["numbers_used_per_step"] == sum(sizes) * (4 * opt.n_samples - 1)


def test_adaptive_rotate_at_d300_is_49152_blocks():
    opt = zoengine.PeZO(_params([300]), reuse="rotate")
    b = opt.rng_budget()
    assert b["philox_blocks_per_step"] == 3 * 16384 == b["numbers_generated_per_step"]
    assert b["numbers_used_per_step"] == 900 and b["window"] == 16384


def test_stochastic_rounding_bits_are_counted(monkeypatch):
    params = _params([37, 8], torch.bfloat16)
    opt = zoengine.MeZO(params, backend="reference", stochastic_rounding=True)
    budget = opt.rng_budget()
    count = Counter(monkeypatch)
    opt.step(lambda: sum((p.float() ** 2).sum() for p in params))
    assert budget["philox_blocks_per_step"] == count.blocks == 3 * (10 + 2) + (10 + 2)
    assert budget["rounding_numbers_per_step"] == 4 * 12


def test_pool_is_generated_once(monkeypatch):
    count = Counter(monkeypatch)
    opt = zoengine.PeZO(_params([10]), pool_size=777)
    assert count.blocks == opt.rng_budget()["philox_blocks_once"] == 777
    assert count.numbers == opt.rng_budget()["numbers_generated_once"] == 777


def test_class_accounting_matches_the_instance():
    sizes = [300, 17]
    for name, kwargs in [("pezo-rotate", {}), ("kerzoo+pezo", {"pool_size": 500}),
                         ("mezo", {"n_samples": 2})]:
        spec = zoengine.optim.registry.method_spec(name)
        opt = zoengine.optim.create(name, _params(sizes), **kwargs)
        by_class = spec.cls.rng_accounting(sizes, **spec.fixed, **kwargs)
        assert by_class == opt.rng_budget(), name
