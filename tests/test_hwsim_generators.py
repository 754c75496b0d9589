"""Bit-accurate generator models: agreement with bit-serial / scalar references, statistics,
reuse semantics, the noise-contract wrapper, and the no-torch import."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from zoengine.hwsim import generators as G
from zoengine.hwsim import sources as S

HWSIM_DIR = os.path.dirname(os.path.abspath(G.__file__))


# ---- bit accuracy ----------------------------------------------------------------------------
def _lfsr_rtl_outputs(state: int, w: int, clocks: int) -> list[int]:
    """What the RTL ``lfsr_leap`` shows on q after each clock: W single steps, q = s[W-1:0]."""
    out = []
    for _ in range(clocks):
        for _ in range(w):
            state = G.lfsr_step1(state)
        out.append(state & ((1 << w) - 1))
    return out


@pytest.mark.parametrize("w", [1, 3, 8, 13, 16, 32])
def test_lfsr_model_matches_bit_serial_rtl(w):
    seed, inst, clocks = 7, 3, 25
    words = G.source_words("lfsr", seed=seed, instances=inst, clocks=clocks, bits=w)
    s0 = S._seed_words(seed, inst, 1)[0]
    for i in range(inst):
        assert words[:, i, 0].tolist() == _lfsr_rtl_outputs(int(s0[i]), w, clocks)


def test_lfsr_leap_equals_repeated_single_steps():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 2**63, size=16, dtype=np.uint64)
    for j in (1, 7, 31, 60):
        got = S._lfsr_leap(s, j, np)
        for a, b in zip(s, got, strict=True):
            x = int(a)
            for _ in range(j):
                x = G.lfsr_step1(x)
            assert x == int(b)


def _taus88_ref(s1, s2, s3, n):
    m = 0xFFFFFFFF
    out = []
    for _ in range(n):
        b = (((s1 << 13) & m) ^ s1) >> 19
        s1 = (((s1 & 0xFFFFFFFE) << 12) & m) ^ b
        b = (((s2 << 2) & m) ^ s2) >> 25
        s2 = (((s2 & 0xFFFFFFF8) << 4) & m) ^ b
        b = (((s3 << 3) & m) ^ s3) >> 11
        s3 = (((s3 & 0xFFFFFFF0) << 17) & m) ^ b
        out.append(s1 ^ s2 ^ s3)
    return out


def _xoshiro_ref(s, n):
    m = 0xFFFFFFFF
    rotl = lambda x, r: ((x << r) | (x >> (32 - r))) & m
    s = list(s)
    out = []
    for _ in range(n):
        out.append((rotl((s[1] * 5) & m, 7) * 9) & m)
        t = (s[1] << 9) & m
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 11)
    return out


def test_word_sources_match_scalar_references():
    init = S._seed_words(5, 2, 4) & np.uint64(0xFFFFFFFF)
    w = G.source_words("taus88", seed=5, instances=2, clocks=20, bits=32)
    for i in range(2):
        s = [int(init[k, i]) | m for k, m in enumerate((2, 8, 16))]
        assert w[:, i, 0].tolist() == _taus88_ref(*s, 20)
    w = G.source_words("xoshiro128ss", seed=5, instances=2, clocks=20, bits=32)
    for i in range(2):
        s = [int(init[k, i]) for k in range(4)]
        s[0] |= 1
        assert w[:, i, 0].tolist() == _xoshiro_ref(s, 20)
    # W-bit samples are the 32-bit words cut MSB first
    w8 = G.source_words("taus88", seed=5, instances=2, clocks=20, bits=8)
    w32 = G.source_words("taus88", seed=5, instances=2, clocks=20, bits=32)
    assert (w8[:, :, 0] == w32[:, :, 0] >> np.uint64(24)).all()
    assert (w8[:, :, 3] == w32[:, :, 0] & np.uint64(0xFF)).all()


def test_philox_matches_zoengine_oracle():
    torch = pytest.importorskip("torch")
    from zoengine.kernels.philox import philox4x32

    c0 = np.arange(50, dtype=np.uint64) * np.uint64(2654435761) & np.uint64(0xFFFFFFFF)
    ours = G.philox4x32_10(c0, 3, 0x12345678, 9, 0xDEADBEEF, 0x01234567)
    ref = philox4x32(torch.from_numpy(c0.astype(np.int64)), 3, 0x12345678, 9, 0xDEADBEEF,
                     0x01234567)
    for a, b in zip(ours, ref, strict=True):
        assert a.tolist() == b.tolist()


def test_icdf_rom_is_the_half_normal_quantile():
    rom = G.icdf_rom(8, 8)
    assert rom.shape == (256,) and rom.min() >= 0 and rom.max() <= 127
    assert (np.diff(rom) >= 0).all()
    assert rom[-1] == round(3.0967 * 16)  # Phi^-1(0.5 + 255.5/512) = 3.0967


# ---- statistics ------------------------------------------------------------------------------
SPECS = ["lfsr-uniform", "lutsr-uniform", "taus88-uniform", "xoshiro128ss-uniform",
         "philox-uniform", "lfsr-rademacher", "lfsr-clt4", "taus88-clt12", "lfsr16-icdf10",
         "philox-w16-icdf10", "lfsr-boxmuller", "xoshiro128ss-w12-boxmuller"]


@pytest.mark.parametrize("spec", SPECS)
def test_stream_statistics(spec):
    x = G.stream(spec, 60_000, seed=3)
    assert x.dtype == np.float32 and x.shape == (60_000,)
    st = G.check_stream(x, reference="uniform" if "uniform" in spec else "normal")
    assert abs(st["mean"]) < 5 / np.sqrt(x.size)
    assert abs(st["var"] - 1) < 0.03
    assert abs(st["lag1"]) < 5 / np.sqrt(x.size)
    if "uniform" in spec:  # 64 cells of 4 levels each at W=8: exact equiprobable cells
        assert st["chi2_p"] > 1e-4, st
    elif "rademacher" not in spec:
        # KS distance to N(0,1) = sampling noise + the generator's own approximation error
        # (Irwin-Hall k=4 ~0.01, coarse W-bit output rounding)
        assert st["ks_stat"] < 0.03, st


def test_clt_ks_distance_shrinks_with_terms():
    d4 = G.check_stream(G.stream("lfsr-clt4", 100_000, seed=1))["ks_stat"]
    d12 = G.check_stream(G.stream("lfsr-clt12", 100_000, seed=1))["ks_stat"]
    assert d12 < d4


def test_seeds_and_instances_decorrelate():
    a = G.stream("lfsr-uniform", 20_000, seed=1)
    b = G.stream("lfsr-uniform", 20_000, seed=2)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
    assert np.array_equal(a, G.stream("lfsr-uniform", 20_000, seed=1))


# ---- reuse semantics ---------------------------------------------------------------------------
def test_on_the_fly_rotation():
    n, lanes = 4, 16
    z = G.stream(f"lfsr-uniform-otf{n}x{lanes}", 10 * lanes, seed=9).reshape(10, lanes)
    x = G.stream("lfsr-uniform", 10 * n, seed=9, instances=n).reshape(10, n)
    for c in range(10):
        for i in range(lanes):
            assert z[c, i] == x[c, (i + c) % n]


def test_pool_reuse_and_pointer():
    p = 1000
    z = G.stream(f"lfsr-uniform-pool{p}", 3000, seed=4, pool_pointer=17)
    assert np.array_equal(z[:p], z[p:2 * p])
    q = G.stream(f"lfsr-uniform-pool{p}", p, seed=4)
    assert np.array_equal(z[:10], q[17:27])


def test_offset_gives_the_same_slice():
    for spec in ("lfsr-clt4", "lfsr-uniform-otf16x256", "philox-uniform"):
        full = G.stream(spec, 5000, seed=2)
        assert np.array_equal(full[1234:2234], G.stream(spec, 1000, seed=2, offset=1234))


def test_hw_noise_contract():
    kw = dict(seed=0, step=3, key=11)
    a = G.hw_noise("hw:lfsr-uniform-otf16x256", 4096, **kw)
    assert np.array_equal(a, G.hw_noise("hw:lfsr-uniform-otf16x256", 4096, **kw))
    assert not np.array_equal(a, G.hw_noise("hw:lfsr-uniform-otf16x256", 4096, seed=0, step=4,
                                            key=11))
    assert not np.array_equal(a, G.hw_noise("hw:lfsr-uniform-otf16x256", 4096, seed=0, step=3,
                                            key=11, sample=1))
    assert np.array_equal(a[100:200], G.hw_noise("hw:lfsr-uniform-otf16x256", 100, offset=100,
                                                 **kw))
    # a pool is one per run: other steps read the same numbers from another start
    p1 = G.hw_noise("hw:lfsr-uniform-pool512", 512, seed=0, step=1, key=0)
    p2 = G.hw_noise("hw:lfsr-uniform-pool512", 512, seed=0, step=2, key=0)
    assert sorted(p1.tolist()) == sorted(p2.tolist())


@pytest.mark.parametrize("spec", ["hw:", "hw:mt-uniform", "hw:lfsr", "hw:lfsr-cauchy",
                                  "hw:lfsr-uniform-otf32x16", "hw:lfsr99-uniform",
                                  "hw:lfsr-uniform-pool0", "hw:lfsr-uniform-otf4x16-x"])
def test_bad_specs_are_errors(spec):
    with pytest.raises(ValueError, match="spec="):
        G.parse_spec(spec)


def test_parse_spec_forms():
    assert G.parse_spec("hw:lfsr32-uniform").bits == 32
    sp = G.parse_spec("taus88-w16-icdf10-otf8x64")
    assert (sp.source, sp.bits, sp.dist, sp.reuse, sp.n_generators, sp.lanes) == \
        ("taus88", 16, "icdf10", "otf", 8, 64)


def test_lfsr_at_benchmark_sizes():
    """The calls benchmarks/bench_hwsim_generators.py times (their throughput is measured
    there, never asserted here): shapes, dtypes, and a longer run extends a shorter one."""
    u = G.source_words("lfsr", seed=0, instances=4096, clocks=256, bits=8)
    assert u.shape == (256, 4096, 1) and u.dtype == np.uint8
    assert np.array_equal(u[:64], G.source_words("lfsr", seed=0, instances=4096, clocks=64,
                                                 bits=8))
    x = G.stream("lfsr-uniform", 4_000_000, seed=0)
    assert x.shape == (4_000_000,) and x.dtype == np.float32 and bool(np.isfinite(x).all())
    assert np.array_equal(x[:100_000], G.stream("lfsr-uniform", 100_000, seed=0))


# ---- imports -----------------------------------------------------------------------------------
def test_hwsim_sources_do_not_import_torch():
    for fn in os.listdir(HWSIM_DIR):
        if fn.endswith(".py"):
            tree = ast.parse(open(os.path.join(HWSIM_DIR, fn)).read())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                for n in names:
                    assert n.split(".")[0] not in ("torch", "triton"), (fn, n)
                    assert not (n.startswith("zoengine.") and not n.startswith("zoengine.hwsim")), \
                        (fn, n)


def test_hwsim_runs_with_torch_blocked(tmp_path):
    """``import zoengine.hwsim`` and its CLI work with torch (and cupy) unimportable."""
    code = """
import sys
sys.modules['torch'] = None
sys.modules['cupy'] = None
import zoengine.hwsim as m
import zoengine.hwsim.cli, zoengine.hwsim.rtl, zoengine.hwsim.report, zoengine.hwsim.calibration
b = m.estimate(m.Workload.from_model(1e6, method='pezo'), 'asic-45nm')
assert b.e_step_j > 0
assert m.stream('lfsr-uniform', 1000, seed=0).shape == (1000,)
assert not m.generators.cupy_available()
assert zoengine.hwsim.cli.main(['--params', '1e6', '--json']) == 0
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")
