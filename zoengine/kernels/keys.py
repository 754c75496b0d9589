"""Per-step stream keys and per-tensor keys: pure integer functions, device independent.

A perturbation stream is named by (seed, step, sample); SplitMix64 folds the three into the
64-bit Philox key so that neighbouring steps and samples get unrelated streams. Tensor keys are
32-bit: parameter names hash to them (FNV-1a), so z does not depend on parameter order.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1


def splitmix64(x: int) -> int:
    """One SplitMix64 output for state ``x`` (Steele, Lea and Flood 2014): a 64-bit bijection."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, step: int, sample: int = 0) -> int:
    """The 64-bit Philox key of perturbation ``sample`` at ``step`` of a run seeded ``seed``."""
    for name, v in (("seed", seed), ("step", step), ("sample", sample)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > MASK64:
            raise ValueError(f"{name}={v!r}: must be an int in [0, 2**64)")
    h = splitmix64(seed)
    h = splitmix64(h ^ step)
    return splitmix64(h ^ sample)


def tensor_key(name: str) -> int:
    """Stable 32-bit key of a parameter name (FNV-1a over its UTF-8 bytes)."""
    h = 0x811C9DC5
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & MASK32
    return h


def tensor_keys(names: list[str]) -> list[int]:
    """Keys for a list of names, all distinct.

    FNV-1a collides for a pair of names with probability 2**-32; among 1,000 tensors that is
    1e-4 per model. A collision would give two tensors the same z, so a colliding name is
    re-hashed with a suffix ('#1', '#2', ...) in list order, deterministically.
    """
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parameter names must be unique; repeated: {dup[:5]}")
    keys: list[int] = []
    taken: set[int] = set()
    for name in names:
        k, i = tensor_key(name), 0
        while k in taken:
            i += 1
            k = tensor_key(f"{name}#{i}")
        taken.add(k)
        keys.append(k)
    return keys
