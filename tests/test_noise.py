"""The noise contract: Philox known answers, slicing, independence, distributions."""

import math

import pytest
import torch

from zoengine import noise
from zoengine.kernels.keys import splitmix64, stream_key, tensor_key, tensor_keys
from zoengine.kernels.philox import philox4x32


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123 kat_vectors, philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_known_answers(counter, key, expected):
    c0, c1, c2, c3 = counter
    out = philox4x32(torch.tensor([c0]), c1, c2, c3, *key)
    assert tuple(int(w[0]) for w in out) == expected


def test_philox_vectorised_equals_scalar():
    ctr = torch.randint(0, 2**32, (64,), dtype=torch.int64)
    words = philox4x32(ctr, 7, 11, 13, 0xDEADBEEF, 0x12345678)
    for i in (0, 17, 63):
        one = philox4x32(ctr[i : i + 1], 7, 11, 13, 0xDEADBEEF, 0x12345678)
        assert [int(w[0]) for w in one] == [int(w[i]) for w in words]


def test_splitmix64_known_answer():
    # SplitMix64 seeded 0: first output is 0xE220A8397B1DCDAF (Vigna's reference generator)
    assert splitmix64(0) == 0xE220A8397B1DCDAF


def test_stream_keys_differ_and_validate():
    keys = {stream_key(0, t, k) for t in range(50) for k in range(4)}
    assert len(keys) == 200
    with pytest.raises(ValueError, match="step=-1"):
        stream_key(0, -1, 0)


def test_tensor_keys_stable_and_distinct():
    assert tensor_key("model.layers.0.q_proj.weight") == tensor_key("model.layers.0.q_proj.weight")
    names = [f"layer.{i}.weight" for i in range(2000)]
    assert len(set(tensor_keys(names))) == 2000
    with pytest.raises(ValueError, match="unique"):
        tensor_keys(["a", "a"])


def test_tensor_key_collision_is_rehashed(monkeypatch):
    import zoengine.kernels.keys as seeds

    monkeypatch.setattr(seeds, "tensor_key", lambda name: 5 if "#" not in name else len(name))
    assert seeds.tensor_keys(["x", "y"]) == [5, len("y#1")]


@pytest.mark.parametrize("dist", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("chunks", [[1], [3, 4, 100], [4097, 1], [65536 + 5, 7]])
def test_whole_equals_concatenated_slices(dist, chunks):
    total = sum(chunks)
    kw = dict(seed=3, step=9, key=tensor_key("w"), sample=1, dist=dist)
    whole = noise.generate(total, **kw)
    parts, off = [], 0
    for n in chunks:
        parts.append(noise.generate(n, offset=off, **kw))
        off += n
    assert torch.equal(whole, torch.cat(parts))


def test_stream_is_pure_function_of_its_inputs():
    kw = dict(seed=1, step=2, key=3, sample=0)
    base = noise.generate(1000, **kw)
    assert torch.equal(base, noise.generate(1000, **kw))
    for change in (dict(seed=2), dict(step=3), dict(key=4), dict(sample=1)):
        other = noise.generate(1000, **{**kw, **change})
        assert not torch.equal(base, other), change
    # dtype only rounds the fp32 value, once
    half = noise.generate(1000, dtype=torch.float16, **kw)
    assert torch.equal(half, base.to(torch.float16))
    # the global torch RNG is neither used nor disturbed
    torch.manual_seed(123)
    before = torch.get_rng_state()
    noise.generate(10, **kw)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("dist, fourth", [("normal", 3.0), ("uniform", 1.8), ("rademacher", 1.0)])
def test_moments(dist, fourth):
    n = 1 << 20
    z = noise.generate(n, seed=0, step=0, key=1, dist=dist).double()
    se = 1 / math.sqrt(n)  # standard error of the mean of a unit-variance variable
    assert abs(z.mean()) < 5 * se
    assert abs((z**2).mean() - 1) <= 5 * math.sqrt(fourth - 1) * se  # exact 1 for Rademacher
    assert abs((z**4).mean() - fourth) < 0.05 * fourth
    lag = (z[1:] * z[:-1]).mean()
    assert abs(lag) < 5 * se


def test_normal_ks_statistic():
    n = 200_000
    z = noise.generate(n, seed=5, step=1, key=2).double().sort().values
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = torch.max(torch.abs(cdf - emp)).item()
    assert d < 1.63 / math.sqrt(n)  # KS critical value at alpha = 0.01


def test_uniform_and_rademacher_values():
    u = noise.generate(4096, seed=0, step=0, key=0, dist="uniform")
    assert u.abs().max() < math.sqrt(3)
    r = noise.generate(4096, seed=0, step=0, key=0, dist="rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}


def test_worked_vectors_of_the_doc():
    """The values printed in docs/noise_contract.md (uniform/Rademacher exact, normal to 1e-6)."""
    key = tensor_key("weight")
    assert key == 0x50A09EB9
    assert stream_key(0, 0, 0) == 0x238275BC38FCBE91
    kw = dict(seed=0, step=0, key=key)
    u = noise.generate(4, dist="uniform", **kw)
    assert u.tolist() == [0.10859829932451248, 1.1173381805419922, -1.2305725812911987,
                          1.6476823091506958]
    r = noise.generate(4, dist="rademacher", **kw)
    assert r.tolist() == [-1.0, -1.0, 1.0, -1.0]
    z = noise.generate(4, **kw)
    expected = torch.tensor([0.4950483441352844, -1.0097510814666748, 1.943061113357544,
                             -0.29968443512916565])
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(numel=-1), "numel"), (dict(key=2**32), "key"), (dict(dist="cauchy"), "dist"),
    (dict(offset=-3), "offset"), (dict(seed=-1), "seed"),
])
def test_generate_rejects_bad_input(bad, match):
    kw = dict(numel=4, seed=0, step=0, key=0)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        noise.generate(**kw)


def test_chunk_bounds_temporaries():
    # a tensor 8x larger than a chunk still uses chunk-sized temporaries: the generator is
    # called once per chunk, never on the whole tensor
    calls = []
    import zoengine.noise as nz

    real = nz.noise_blocks

    def spy(first, n, **kw):
        calls.append(n)
        return real(first, n, **kw)

    nz.noise_blocks = spy
    try:
        nz.generate(8 * nz.CHUNK_ELEMENTS + 3, seed=0, step=0, key=0)
    finally:
        nz.noise_blocks = real
    assert max(calls) * 4 <= nz.CHUNK_ELEMENTS + 4 and len(calls) == 9
