"""Correct past 2^31 and 2^32 elements (issue 17, part 3).

A 7B model holds ~2^32.7 parameters and single tensors past 2^31 elements exist (a 256k-vocab
embedding at hidden 8,192 is 2^31). Index arithmetic must stay 64-bit everywhere: the element
index of z, PeZO's global coordinates (summed over all tensors), mask bits, DiZO's norms. Most
checks use offsets or small slices at large indices (cheap); one test allocates a real tensor of
2^31 + 4,096 bf16 elements (4 GiB, marked slow).
"""

import gc

import pytest
import torch

from zoengine.kernels import reference as R
from zoengine.kernels.dispatch import resolve_backend
from zoengine.kernels.keys import stream_key
from zoengine.kernels.philox import noise_at, noise_blocks
from zoengine.kernels.reuse import PoolSource, ReuseOps, RotateSource
from zoengine.optim.dizo import delta_norm
from zoengine.optim.masks import pack_mask, unpack_mask

torch.set_num_threads(2)
KEY, SEED, STEP = 0x5EED1234, 3, 9
BIG = [2**31 - 3, 2**31 + 1, 2**32 + 5, 2**33 + 2**20 + 7]  # element offsets around the edges


def _native_or_skip():
    if resolve_backend(None, [torch.zeros(1)]) != "native":
        pytest.skip("the native backend does not build here")
    from zoengine.kernels import native_ops

    return native_ops


@pytest.mark.parametrize("offset", BIG)
@pytest.mark.parametrize("dist", ["normal", "uniform", "rademacher"])
def test_reference_slice_far_out_is_the_contracts(offset, dist):
    """A 37-element shard at ``offset`` gets elements offset..offset+36 of the stream: the
    same numbers as noise_blocks (block = index // 4, 64-bit) and noise_at."""
    x = torch.zeros(37)
    R.perturb_([x], [KEY], seed=SEED, step=STEP, scale=1.0, dist=dist, offsets=[offset])
    key64 = stream_key(SEED, STEP, 0)
    b0 = offset // 4
    z = noise_blocks(b0, (offset + 37 - 1) // 4 - b0 + 1, key64=key64, tensor_key=KEY,
                     dist=dist)[offset - 4 * b0:offset - 4 * b0 + 37]
    assert torch.equal(x, z)
    at = noise_at(torch.arange(offset, offset + 37), key64=key64, tensor_key=KEY, dist=dist)
    assert torch.equal(x, at)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_element_i_does_not_depend_on_the_tensor_size(backend):
    ops = R if backend == "reference" else _native_or_skip()
    out = []
    for n in (10, 70_001, 1_000_003):
        x = torch.zeros(n)
        ops.perturb_([x], [KEY], seed=SEED, step=STEP, scale=1.0)
        out.append(x)
    assert torch.equal(out[0], out[1][:10]) and torch.equal(out[1], out[2][:70_001])


def test_pool_and_lanes_past_2_32_global_coordinates():
    """PeZO's coordinates add up over every tensor (a 7B model reaches 2^32.7): a tensor whose
    global offset is past 2^32 reads pool[(p + g) mod N] and lane values at those g."""
    pool = torch.linspace(-1, 1, 4099)
    base = 2**32 + 12_345
    x = torch.zeros(50)
    ReuseOps(PoolSource(pool, 1.0, pointer=17, stride=4099), {KEY: base}).perturb_(
        [x], [KEY], seed=SEED, step=STEP, scale=1.0)
    idx = (17 + base + torch.arange(50)) % 4099
    assert torch.equal(x, pool[idx])
    lanes = RotateSource(64, "static")
    y = torch.zeros(50)
    ReuseOps(lanes, {KEY: base}).perturb_([y], [KEY], seed=SEED, step=STEP, scale=1.0)
    assert torch.equal(y, lanes.values(base, base + 50, seed=SEED, step=STEP, sample=0,
                                       device="cpu").float())


def test_delta_norm_chunked_equals_float64():
    g = torch.Generator().manual_seed(0)
    p, a = torch.randn(100_003, generator=g), torch.randn(100_003, generator=g)
    exact = float((p.double() - a.double()).norm())
    assert delta_norm(p, a, chunk=4096) == pytest.approx(exact, rel=1e-13)
    assert delta_norm(p, a) == pytest.approx(exact, rel=1e-13)


@pytest.mark.slow
def test_native_tensor_past_2_31_elements():
    """MeZO's native op on one bf16 tensor of 2^31 + 4,096 elements: its first 4,096 numbers
    equal a small tensor's with the same key, its last 4,096 are elements 2^31.. of the stream
    (no wrap-around), and they look like unit-variance noise."""
    ops = _native_or_skip()
    n = 2**31 + 4096
    big = torch.zeros(n, dtype=torch.bfloat16)
    ops.perturb_([big], [KEY], seed=SEED, step=STEP, scale=1.0, dist="uniform")
    head, tail = big[:4096].clone(), big[-4096:].clone()
    del big
    gc.collect()
    small = torch.zeros(4096, dtype=torch.bfloat16)
    ops.perturb_([small], [KEY], seed=SEED, step=STEP, scale=1.0, dist="uniform")
    assert torch.equal(head, small)
    far = torch.zeros(4096, dtype=torch.bfloat16)
    R.perturb_([far], [KEY], seed=SEED, step=STEP, scale=1.0, dist="uniform", offsets=[2**31])
    assert torch.equal(tail, far)
    assert not torch.equal(tail, head)
    assert float(tail.float().pow(2).mean()) == pytest.approx(1.0, abs=0.1)


@pytest.mark.slow
def test_mask_bits_past_2_31_elements():
    n = 2**31 + 13
    m = torch.zeros(n, dtype=torch.bool)
    m[::7] = True
    m[-5:] = torch.tensor([True, False, True, True, False])
    bits = pack_mask(m)
    assert bits.numel() == -(-n // 8)
    back = unpack_mask(bits, (n,))
    for s in (slice(0, 64), slice(2**31 - 40, 2**31 + 40), slice(n - 64, n)):
        assert torch.equal(back[s], m[s]), s


@pytest.mark.gpu
def test_triton_tensor_past_2_31_elements():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the interpreter cannot walk 2^31 elements)")
    from zoengine.kernels import triton_ops

    n = 2**31 + 4096
    big = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    triton_ops.perturb_([big], [KEY], seed=SEED, step=STEP, scale=1.0, dist="uniform")
    tail = big[-4096:].cpu()
    del big
    far = torch.zeros(4096, dtype=torch.bfloat16)
    R.perturb_([far], [KEY], seed=SEED, step=STEP, scale=1.0, dist="uniform", offsets=[2**31])
    assert torch.equal(tail, far)
