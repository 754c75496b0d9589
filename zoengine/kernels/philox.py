"""Philox4x32-10 and the word -> float maps, in plain PyTorch.

This module is the oracle of the noise contract (docs/noise_contract.md): every other
generator in zoengine (the compiled CPU path, the Triton kernels) is tested against it.
It is written for clarity and exactness, not speed: 32-bit words live in int64 tensors and
every operation is masked back to 32 bits.

Counter layout used by zoengine (see zoengine.noise):

    key     = (k0, k1)      the 64-bit stream key, derived from (seed, step, sample)
    counter = (block_lo, block_hi, tensor_key, stream_word)

With ``tensor_key = stream_word = 0`` this is exactly Triton's ``tl.randint4x(seed, offset)``
(key = seed split in lo/hi, counter = (offset_lo, offset_hi, 0, 0)).
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # round multipliers (Salmon et al. 2011, Random123)
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # Weyl key increments
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# 2**-24 and 2**-25 are exact in fp32; so are the integer-to-float conversions below
# (|n| < 2**25), which is why uniform and Rademacher values are bit-identical on every backend.
_TWO_POW_M24 = 2.0**-24
_TWO_POW_M25 = 2.0**-25
# Counter word 3 ("stream word") of every Philox stream zoengine draws. One table, so two
# consumers can never share a stream by accident (tests/test_layers.py checks uniqueness).
STREAM_WORDS = {
    "z": 0,  # the perturbation z itself (every backend)
    "rounding": 1,  # stochastic-rounding bits of fp16/bf16 updates
    "kerzoo_r": 2,  # KerZOO's per-sample scalar radius r
    "pezo_lanes": 3,  # PeZO's rotating lane generators (and its pool, on lane POOL_LANE)
    "dizo_zeta": 4,  # DiZO's per-tensor projection perturbation ζ
    "lowrank_u": 5,  # low-rank noise: U of a 2-D tensor, per (step, sample)
    "lowrank_v": 6,  # low-rank noise: V of a 2-D tensor, per block of resample_every steps
}
STREAM_Z = STREAM_WORDS["z"]
STREAM_ROUNDING = STREAM_WORDS["rounding"]
STREAM_KERZOO_R = STREAM_WORDS["kerzoo_r"]
STREAM_PEZO_LANES = STREAM_WORDS["pezo_lanes"]
STREAM_DIZO_ZETA = STREAM_WORDS["dizo_zeta"]
# Counter word 2 of PeZO's pool: the lane id no rotate lane can take (lanes < 2**32 - 1).
POOL_LANE = 0xFFFFFFFF

SQRT3_F32 = float(torch.tensor(math.sqrt(3.0), dtype=torch.float32))
TWO_PI_F32 = float(torch.tensor(2.0 * math.pi, dtype=torch.float32))


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a*b < 2**64 wraps in int64 two's complement; the 64 bits are still the exact product,
    # so masking recovers both halves.
    prod = b * a
    return (prod >> 32) & MASK32, prod & MASK32


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor | int,
    c2: torch.Tensor | int,
    c3: torch.Tensor | int,
    k0: int,
    k1: int,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with ``rounds`` rounds on int64 tensors holding uint32 values.

    Returns the four output words, each an int64 tensor with values in [0, 2**32).
    Counter words may be tensors or Python ints (broadcast); the key is two Python ints.
    """
    c0 = c0.to(torch.int64) & MASK32
    like = c0
    c1, c2, c3 = (
        (c & MASK32) if isinstance(c, torch.Tensor) else torch.full_like(like, int(c) & MASK32)
        for c in (c1, c2, c3)
    )
    k0 &= MASK32
    k1 &= MASK32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def words_to_open_unit(w: torch.Tensor) -> torch.Tensor:
    """uint32 word -> fp32 in the open interval (0, 1): ((w >> 8) * 2 + 1) * 2**-25, exact."""
    return ((w >> 8) * 2 + 1).to(torch.float32) * _TWO_POW_M25


def words_to_uniform(w: torch.Tensor) -> torch.Tensor:
    """uint32 word -> U(-sqrt 3, sqrt 3) in fp32 (unit variance), bit-exact on every backend.

    v = ((w >> 8) * 2 + 1 - 2**24) * 2**-24 is an odd multiple of 2**-24 in (-1, 1), symmetric
    around 0 (exactly mean 0 over all words); one fp32 multiply by sqrt(3) rounds it.
    """
    v = ((w >> 8) * 2 + 1 - (1 << 24)).to(torch.float32) * _TWO_POW_M24
    return v * SQRT3_F32


def words_to_rademacher(w: torch.Tensor) -> torch.Tensor:
    """uint32 word -> +-1 in fp32 from the word's top bit."""
    return (1 - 2 * (w >> 31)).to(torch.float32)


def box_muller(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two words -> two independent N(0, 1) values (r cos t, r sin t), in fp32.

    ua lies in [2**-25, 1 - 2**-25], so r <= sqrt(50 ln 2) = 5.89: the tail beyond 5.89 sigma
    (probability 4e-9) is cut, which no ZO estimator can notice.
    """
    r = torch.sqrt(torch.log(words_to_open_unit(wa)) * -2.0)
    t = words_to_open_unit(wb) * TWO_PI_F32
    return r * torch.cos(t), r * torch.sin(t)


DISTRIBUTIONS = ("normal", "uniform", "rademacher")


def noise_blocks(
    first_block: int,
    n_blocks: int,
    *,
    key64: int,
    tensor_key: int,
    dist: str,
    stream_word: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The fp32 noise of Philox blocks ``[first_block, first_block + n_blocks)``.

    Block b holds elements 4b .. 4b+3 of a tensor's stream (one Philox call, 4 words, 4 values):
    returns a flat tensor of ``4 * n_blocks`` values.
    """
    blocks = torch.arange(first_block, first_block + n_blocks, dtype=torch.int64, device=device)
    return _block_lanes(blocks, key64, tensor_key, dist, stream_word).reshape(-1)


def noise_at(index: torch.Tensor, *, key64: int, tensor_key: int, dist: str) -> torch.Tensor:
    """The fp32 noise of the elements at ``index`` (int64, any shape) of a tensor's stream.

    Each distinct Philox block among ``index // 4`` is computed once, so a gather of whole
    embedding rows costs what those rows cost in a full pass (virtual perturbation of
    ``nn.Embedding``, zoengine/optim/virtual.py).
    """
    flat = index.reshape(-1).to(torch.int64)
    blocks, where = torch.unique(flat // 4, return_inverse=True)
    lanes = _block_lanes(blocks, key64, tensor_key, dist, 0)
    return lanes[where, flat % 4].reshape(index.shape)


def _block_lanes(blocks: torch.Tensor, key64: int, tensor_key: int, dist: str,
                 stream_word: int) -> torch.Tensor:
    """(len(blocks), 4) fp32 noise: lane j of row i is element 4·blocks[i] + j."""
    w0, w1, w2, w3 = philox4x32(
        blocks & MASK32, blocks >> 32, tensor_key, stream_word, key64 & MASK32, key64 >> 32
    )
    if dist == "normal":
        z0, z1 = box_muller(w0, w1)
        z2, z3 = box_muller(w2, w3)
        out = (z0, z1, z2, z3)
    elif dist == "uniform":
        out = tuple(words_to_uniform(w) for w in (w0, w1, w2, w3))
    elif dist == "rademacher":
        out = tuple(words_to_rademacher(w) for w in (w0, w1, w2, w3))
    else:
        raise ValueError(f"dist={dist!r}: must be one of {DISTRIBUTIONS}")
    return torch.stack(out, dim=1)  # (n_blocks, 4): element order 4b + lane
