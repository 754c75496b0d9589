"""The noise contract: every random number zoengine uses is a pure function of
``(seed, step, sample, tensor key, element index)``.

Element ``i`` of the stream of tensor ``key`` for perturbation ``sample`` at ``step`` is

    key64          = stream_key(seed, step, sample)                # SplitMix64, zoengine.kernels.keys
    w0, w1, w2, w3 = Philox4x32-10(key=(key64_lo, key64_hi),
                                   counter=(b_lo, b_hi, key, stream_word))   with b = i // 4
    z_i            = lane i % 4 of dist(w0, w1, w2, w3)

where ``dist`` is Box-Muller on (w0, w1) and (w2, w3) for ``normal`` (cos, sin, cos, sin),
an exact fp32 map of each word for ``uniform`` (U(-sqrt 3, sqrt 3), unit variance) and the top
bit of each word for ``rademacher``. Nothing in it depends on device, dtype, parameter order,
chunking or backend. docs/noise_contract.md has the derivation and known-answer vectors.
"""

from __future__ import annotations

import torch

from zoengine.kernels.keys import stream_key, tensor_key, tensor_keys
from zoengine.kernels.philox import (  # noqa: F401  (STREAM_ROUNDING: documented here)
    DISTRIBUTIONS,
    STREAM_ROUNDING,
    STREAM_Z,
    noise_blocks,
)

__all__ = ["DISTRIBUTIONS", "generate", "stream_key", "tensor_key", "tensor_keys", "CHUNK_ELEMENTS"]

# 65,536 elements per chunk: the int64 Philox temporaries are ~10 tensors of 16,384 words
# (~1.3 MiB in all), whatever the tensor size.
CHUNK_ELEMENTS = 1 << 16


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < hi:
        raise ValueError(f"{name}={value!r}: must be an int in [{lo}, {hi})")
    return value


def generate(
    numel: int,
    *,
    seed: int,
    step: int,
    key: int,
    sample: int = 0,
    dist: str = "normal",
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    stream_word: int = STREAM_Z,
) -> torch.Tensor:
    """Elements ``[offset, offset + numel)`` of the noise stream of one tensor.

    Args:
        numel: how many elements to return (>= 0).
        seed, step, sample: name the perturbation (non-negative ints < 2**64).
        key: the tensor's 32-bit key (``zoengine.noise.tensor_key(name)`` for a named parameter).
        dist: ``"normal"``, ``"uniform"`` (unit variance) or ``"rademacher"``.
        offset: first element index, so a shard generates exactly its slice of z.
        dtype, device: of the result; values are computed in fp32 and cast once.
        stream_word: Philox counter word 3 (0 = z; 1 = stochastic rounding).

    Returns:
        A 1-D tensor of ``numel`` values. Generation runs in chunks of ``CHUNK_ELEMENTS``, so
        temporaries stay bounded.

    Example:
        >>> z = generate(5, seed=0, step=0, key=tensor_key("weight"))
        >>> torch.equal(z[2:], generate(3, seed=0, step=0, key=tensor_key("weight"), offset=2))
        True
    """
    _check_int("numel", numel, 0, 1 << 62)
    _check_int("offset", offset, 0, 1 << 62)
    _check_int("key", key, 0, 1 << 32)
    _check_int("stream_word", stream_word, 0, 1 << 32)
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist={dist!r}: must be one of {DISTRIBUTIONS}")
    key64 = stream_key(seed, step, sample)
    out = torch.empty(numel, dtype=dtype, device=device)
    pos = 0
    while pos < numel:
        n = min(CHUNK_ELEMENTS, numel - pos)
        first = offset + pos
        b0, b1 = first // 4, (first + n - 1) // 4 + 1
        z = noise_blocks(b0, b1 - b0, key64=key64, tensor_key=key, dist=dist,
                         stream_word=stream_word, device=device)
        lead = first - 4 * b0
        out[pos : pos + n] = z[lead : lead + n]
        pos += n
    return out
