"""hwsim cost model: workload validation, the dossier's rows and worked example, invariants,
the PeZO comparison and the CLI. Reference numbers: research/hwsim.md §5 and §7.4."""

from __future__ import annotations

import json
import math

import pytest

from zoengine.hwsim import Workload, estimate, generator_cost
from zoengine.hwsim.calibration import (
    PEZO_PUBLISHED,
    PREDICTION,
    pezo_comparison,
    pezo_prediction,
)
from zoengine.hwsim.cli import main
from zoengine.hwsim.costs import CATALOGUE, PLATFORMS, get_platform
from zoengine.hwsim.report import budget_json, format_budget, format_table, has_matplotlib


# ---- workload -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(d=-5), "d"), (dict(d=0), "d"), (dict(d=10, bits=0), "bits"),
    (dict(d=10, bits=40), "bits"), (dict(d=10, source="mt19937"), "source"),
    (dict(d=10, dist="cauchy"), "dist"), (dict(d=10, reuse="sometimes"), "reuse"),
    (dict(d=10, reuse="on-the-fly", reuse_factor=3, lanes=256), "reuse_factor"),
    (dict(d=10, reuse="on-the-fly", reuse_factor=512, lanes=256), "reuse_factor"),
    (dict(d=10, reuse="pool"), "pool_size"), (dict(d=10, pool_size=64), "pool_size"),
    (dict(d=10, clock_hz=-1.0), "clock_hz"), (dict(d=10, uses=0.5), "uses"),
    (dict(d=10, lanes=0), "lanes"), (dict(d=10, reuse_factor=4), "reuse_factor"),
])
def test_workload_errors_name_field_value_and_range(kw, field):
    with pytest.raises(ValueError) as ei:
        Workload(**kw)
    msg = str(ei.value)
    assert msg.startswith(f"Workload.{field}=")
    assert "must" in msg


def test_from_model_counts_and_presets():
    assert Workload.from_model(125e6).d == 125_000_000
    assert Workload.from_model(1000, method="pezo").reuse == "on-the-fly"

    class P:
        def __init__(self, n, rg=True):
            self.n, self.requires_grad = n, rg

        def numel(self):
            return self.n

    class M:
        def parameters(self):
            return [P(100), P(20), P(7, rg=False)]

    w = Workload.from_model(M(), method="mezo", bits=16)
    assert (w.d, w.bits, w.uses, w.dist) == (120, 16, 4.0, "normal")
    with pytest.raises(ValueError, match="method="):
        Workload.from_model(10, method="sgd")
    with pytest.raises(ValueError, match="model="):
        Workload.from_model(-3)


def test_from_optimizer_duck_typed_and_real():
    class P:
        requires_grad = True

        def __init__(self, n):
            self.n = n

        def numel(self):
            return self.n

    class Opt:
        param_groups = [{"params": [P(10), P(30)]}]
        n_samples = 2
        dist = "uniform"

    w = Workload.from_optimizer(Opt())
    assert (w.d, w.q, w.dist) == (40, 2, "uniform")
    assert w.n_use == 40 * (4 * 2 - 1)  # zoengine: 3 passes for the last sample, 4 for others

    Opt.dist = "hw:lfsr16-clt4-otf16x256"
    w = Workload.from_optimizer(Opt())
    assert (w.bits, w.method, w.clt_k, w.reuse, w.reuse_factor) == (16, "clt", 4,
                                                                    "on-the-fly", 16)

    torch = pytest.importorskip("torch")
    import zoengine

    m = torch.nn.Linear(8, 4)
    opt = zoengine.MeZO(m.parameters(), lr=1e-3)
    w = Workload.from_optimizer(opt)
    assert w.d == 36 and w.uses == 3 and w.dist == "normal"
    if hasattr(zoengine, "PeZO"):
        w = Workload.from_optimizer(zoengine.PeZO(m.parameters(), reuse="pool", pool_size=1000))
        assert (w.d, w.reuse, w.pool_size, w.dist) == (36, "pool", 1000, "uniform")
        opt = zoengine.PeZO(m.parameters(), reuse="rotate", lanes=16)
        w = Workload.from_optimizer(opt)
        # every lane number is used once (docs/methods/pezo.md): L = n lanes, R = 1, and
        # N_gen is the budget's count: 3 passes x one whole 16,384-number window per tensor
        assert (w.reuse, w.lanes, w.reuse_factor) == ("on-the-fly", 16, 1)
        assert w.n_gen == opt.rng_budget()["numbers_generated_per_step"] == 3 * 2 * 16384


def test_doubling_d_doubles_numbers_and_energy():
    for reuse in ({}, dict(reuse="on-the-fly", reuse_factor=8)):
        a = estimate(Workload(d=10**8, **reuse), "asic-45nm")
        b = estimate(Workload(d=2 * 10**8, **reuse), "asic-45nm")
        assert b.n_use == 2 * a.n_use and b.n_gen == 2 * a.n_gen
        assert b.e_step_j == pytest.approx(2 * a.e_step_j)
        assert b.ge == a.ge  # the hardware does not grow with d at fixed lanes


# ---- catalogue rows and rules (dossier §5) --------------------------------------------------
@pytest.mark.parametrize("row", [r for r in CATALOGUE if r.tag == "S" and r.method in
                                 ("lfsr", "clt", "icdf", "uscale") and r.ge is not None],
                         ids=lambda r: r.key)
def test_model_reproduces_synthesis_rows(row):
    if row.method == "lfsr":
        c = generator_cost("lfsr", "uniform", row.width)
    elif row.method == "uscale":
        c = generator_cost("lfsr", "uniform", row.width, scale="separate")
    elif row.method == "clt":
        c = generator_cost("lfsr", "clt", row.width, clt_k=row.param("k"))
    else:
        c = generator_cost("lfsr", "icdf", row.width, icdf_bits=row.param("m"),
                           use_bram=row.param("rom") == "bram")
    assert (c.lut, c.ff, c.dsp, c.bram18) == (row.lut, row.ff, row.dsp, row.bram18)
    assert c.ge == pytest.approx(row.ge)
    assert not c.interpolated


def test_fitted_rules_within_their_stated_tolerance():
    # LFSR GE = 7.1N + 3.9W; CLT LUT ~ (2k-1)W +-30 %; CLT GE rule +-6 %; ICDF LUT-ROM +-25 %
    for r in CATALOGUE:
        if r.method == "lfsr" and r.tag == "S":
            n = r.param("N")
            assert 7.1 * n + 3.9 * r.width == pytest.approx(r.ge, rel=0.02), r.key
        if r.method == "clt":
            k, w, n = r.param("k"), r.width, r.param("N")
            assert (2 * k - 1) * w == pytest.approx(r.lut, rel=0.30), r.key
            lg = math.ceil(math.log2(k))
            ge = 5.67 * r.ff + 1.4 * n + 3.9 * k * w + 5.5 * (k - 1) * (w + lg)
            # the dossier says +-6 %; its k=12 point is in fact +6.2 % off (docs/hwsim.md)
            assert ge == pytest.approx(r.ge, rel=0.065), r.key
            assert n + w + lg == r.ff, r.key
    for key in ("icdf-m10-w16-nobram", "icdf-m12-w16-nobram"):
        r = next(x for x in CATALOGUE if x.key == key)
        assert 25 + (1 << r.param("m")) * (r.width - 1) / 55 == pytest.approx(r.lut, rel=0.25)


def test_interpolated_configurations_are_marked():
    c = generator_cost("lfsr", "clt", 8, clt_k=6)
    assert any("CLT-6" in s for s in c.interpolated)
    b = estimate(Workload(d=1000, bits=12, dist="uniform"), "fpga-xc7")
    assert b.interpolated and "LFSR" in b.interpolated[0]
    assert all(p.tag in "MPSE?" for p in b.provenance)


def test_uniform_never_costs_more_luts_than_a_gaussian_from_the_same_source():
    # per generator unit: the Gaussian is the same source instance(s) plus a transform. (Per
    # *sample*, an ICDF that draws m+1 < W bits can beat a W-bit uniform on a wide-word source:
    # it needs fewer random bits, not less logic per bit.)
    for src in ("lfsr", "lutsr", "taus88", "xorshift32", "xoshiro128ss", "philox"):
        for w in (8, 16):
            u = generator_cost(src, "uniform", w)
            for kw in (dict(dist="clt", clt_k=4), dict(dist="clt", clt_k=12),
                       dict(dist="icdf", icdf_bits=8), dict(dist="icdf", icdf_bits=10)):
                g = generator_cost(src, bits=w, **kw)
                assert u.lut <= g.lut, (src, w, kw)


def test_more_reuse_never_needs_more_generators():
    for src in ("lfsr", "taus88", "philox"):
        last = math.inf
        for r in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            w = Workload(d=10**6, dist="uniform", source=src, lanes=256,
                         reuse="on-the-fly" if r > 1 else "none", reuse_factor=r)
            n = estimate(w, "fpga-xc7").n_generators
            assert n <= last
            last = n


# ---- the worked example (dossier §7.4): OPT-1.3B, q=1, g=4, W=8, L=256, 200 MHz ---------------
WE = dict(d=1_300_000_000, q=1, uses=4, bits=8, lanes=256, clock_hz=200e6)


@pytest.mark.parametrize("kw, n, lut, ff, e_mj", [
    (dict(dist="normal", method="clt", clt_k=4), 256, 14.6e3, 18.9e3, 2.0),
    (dict(dist="uniform"), 256, 2.0e3, 16.4e3, 1.25),
    (dict(dist="uniform", reuse="on-the-fly", reuse_factor=16), 16, 128 + 256, 1024, 0.21),
    (dict(dist="uniform", reuse="pool", pool_size=65536, refresh_every=1,
          pool_reads="aligned"), 1, None, None, 6.6),
])
def test_worked_example(kw, n, lut, ff, e_mj):
    w = Workload(**WE, **kw)
    assert w.n_use == 5.2e9
    a = estimate(w, "asic-45nm")
    f = estimate(w, "fpga-xc7")
    assert a.n_generators == f.n_generators == n
    # the dossier's E_step has no glue term; the rotator's own energy is charged on top
    assert (a.e_step_j - a.e_glue_j) * 1e3 == pytest.approx(e_mj, rel=0.03)
    if w.reuse == "on-the-fly":  # 2.33 GE x 16*8*4 mux2 + 4 counter bits, 0.45 fJ/GE, 2.5 fJ/FF
        per_clock = (2.33 * 16 * 8 * 4 + 3.3 * 4) * 0.45e-15 + 4 * 2.5e-15
        assert a.e_glue_j == pytest.approx(5.2e9 / 256 * per_clock, rel=1e-3)
        assert a.e_glue_j < 0.1 * a.e_step_j
    assert a.t_step_s == pytest.approx(0.1, rel=0.03)  # ">= 0.1 s/step RNG-bound"
    if lut is not None:
        assert f.lut == pytest.approx(lut, rel=0.03)
        assert f.ff == pytest.approx(ff, rel=0.03)
    else:  # "8 LUT + 29-57 BRAM18 (capacity vs bandwidth)"
        assert (f.bram18_capacity, f.bram18_bandwidth, f.bram18) == (29, 57, 57)
    # FPGA logic energies ~14x the ASIC ones (Kuon-Rose), within the dossier's +-3x band;
    # pool reads hit hard BRAM (5 pJ) vs SRAM (5 pJ / 32 b): no such gap
    if w.reuse != "pool":
        assert 14 / 3 < f.e_step_j / a.e_step_j < 14 * 3


def test_energy_per_sample_matches_dossier_table_6_2():
    p = get_platform("asic-45nm")
    from zoengine.hwsim.costs import asic_energy_per_cycle_fj

    for args, fj in [(("lfsr", "uniform", 8), 214), (("lfsr", "clt", 8), 359),
                     (("lfsr", "uniform", 8, ), 214)]:
        c = generator_cost(*args)
        assert asic_energy_per_cycle_fj(c, p) == pytest.approx(fj, rel=0.01)
    c = generator_cost("xorshift32", "uniform", 8)  # 32 b/cyc -> 4 x 8 b
    assert asic_energy_per_cycle_fj(c, p) / c.spc == pytest.approx(37, rel=0.03)


def test_pool_vs_regenerate_crossover_where_read_exceeds_generation():
    for dist, kw in (("uniform", {}), ("normal", dict(method="clt")),
                     ("normal", dict(method="boxmuller")), ("normal", dict(method="icdf"))):
        for src in ("lfsr", "philox"):
            base = dict(d=10**7, bits=8, dist=dist, source=src, **kw)
            if kw.get("method") == "icdf":
                base["bits"] = 16
            regen = estimate(Workload(**base), "asic-45nm")
            pool = estimate(Workload(**base, reuse="pool", pool_size=4096, refresh_every=1),
                            "asic-45nm")
            e_read, e_gen = pool.e_read_per_number_j, regen.e_gen_per_sample_j
            assert (pool.e_step_j > regen.e_step_j) == (e_read > e_gen), (dist, kw, src)
    # both regimes occur: cheap LFSR uniform (pool loses) and Box-Muller (pool wins)
    u = estimate(Workload(d=10**7, dist="uniform"), "asic-45nm")
    bm = estimate(Workload(d=10**7, dist="normal", method="boxmuller"), "asic-45nm")
    assert u.e_gen_per_sample_j < 1.25e-12 < bm.e_gen_per_sample_j


def test_pool_larger_than_memory_is_an_error():
    with pytest.raises(ValueError, match=r"Workload.pool_size=.*allowed pool_size <="):
        estimate(Workload(d=10, dist="uniform", reuse="pool", pool_size=10**9), "fpga-xc7z020")


def test_asic_nodes_scale_area_and_energy():
    w = Workload(d=10**6, dist="uniform")
    b45, b130, b7 = (estimate(w, p) for p in ("asic-45nm", "asic-130nm", "asic-7nm"))
    assert b45.ge == b130.ge == b7.ge
    assert b130.area_um2 / b45.area_um2 == pytest.approx(3.7536 / 0.798)
    assert b7.e_step_j < b45.e_step_j < b130.e_step_j
    assert any(c.tag == "?" for c in b7.provenance)  # unverified ASAP7 NAND2 area is flagged


def test_target_step_time_reports_lanes_needed():
    w = Workload(d=10**9, dist="uniform", lanes=256, target_step_s=0.01)
    b = estimate(w, "fpga-xc7")
    assert b.meets_target is False and b.lanes_for_target == math.ceil(4e9 / (0.01 * 200e6))
    b2 = estimate(w.replace(lanes=b.lanes_for_target), "fpga-xc7")
    assert b2.meets_target


# ---- PeZO calibration (reported, not fitted) -------------------------------------------------
def test_pezo_like_configuration_large_lut_small_ff_reduction():
    rows = pezo_comparison("fpga-xc7")
    best = rows[0]
    assert best.distance == min(r.distance for r in rows)
    otf = next(r for r in rows if "on-the-fly R=16 vs CLT-4 on-the-fly" in r.name)
    assert otf.d_lut < -0.40 and -0.30 < otf.d_ff < 0  # large LUT, small FF reduction
    unit = next(r for r in rows if r.name.startswith("1 generator: uniform LFSR 8b vs CLT-4"))
    assert unit.d_lut == pytest.approx(-0.86, abs=0.01)  # dossier §1.3: -86 % LUT, -14 % FF
    assert unit.d_ff == pytest.approx(-0.14, abs=0.01)
    # the largest modelled power saving is of PeZO's "up to 86 %" order
    assert min(r.d_power for r in rows) < -0.8
    assert PEZO_PUBLISHED["lut"] == -0.486


def test_pezo_prediction_is_one_configuration_priced_once():
    # the configuration stated in advance (docs/hwsim.md §5): MeZO-style CLT-4 per lane vs a
    # uniform LFSR array on the fly, R = 16, 256 lanes of 8 b
    b, c = PREDICTION["baseline"], PREDICTION["candidate"]
    assert (b["method"], b["reuse"], b["lanes"], b["bits"]) == ("clt", "none", 256, 8)
    assert (c["dist"], c["reuse"], c["reuse_factor"], c["scale"]) == ("uniform", "on-the-fly",
                                                                       16, "folded")
    p = pezo_prediction("fpga-xc7")
    assert (p.base_lut, p.base_ff, p.cand_lut, p.cand_ff) == (14592, 18944, 385, 1028)
    assert p.d_lut == pytest.approx(-0.974, abs=5e-4) and p.d_ff == pytest.approx(-0.946, abs=5e-4)
    assert p.distance == pytest.approx(1.306, abs=1e-3)  # 48.8 + 81.9 points: a miss
    assert abs(p.d_power - PEZO_PUBLISHED["power_max"]) < 0.03  # -87.9 % vs "up to 86 %"
    # the sensitivity search finds closer rows: that is a fit, reported separately
    assert pezo_comparison("fpga-xc7")[0].distance < p.distance


# ---- report and CLI ------------------------------------------------------------------------------
def test_report_table_and_json():
    bs = [estimate(Workload.from_model(1e6, method=m), "fpga-xc7") for m in ("mezo", "pezo")]
    t = format_table(bs)
    assert "mezo" in t and "pezo" in t
    d = json.loads(budget_json(bs[0]))
    assert d["platform"] == "fpga-xc7" and d["provenance"][0]["tag"] in "MPSE?"
    assert "provenance" in format_budget(bs[1])


def test_cli_estimate_and_json(capsys):
    assert main(["--params", "125e6", "--method", "pezo", "--platform", "asic-45nm"]) == 0
    assert "energy/step" in capsys.readouterr().out
    assert main(["estimate", "--params", "1e6", "--method", "mezo", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["workload"]["d"] == 10**6 and d["lut"] > 0
    assert main(["pezo", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["rows"] and d["prediction"]["why"] and "not a prediction" in d["rows_are"]
    assert main(["pezo"]) == 0
    out = capsys.readouterr().out
    assert out.index("PREDICTION") < out.index("SENSITIVITY TABLE")
    assert main(["catalogue"]) == 0
    assert "[S]" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["--params", "-5"], "--params"),
    (["--params", "1e6", "--source", "foo"], "--source"),
    (["--params", "1e6", "--platform", "tpu"], "--platform"),
    (["--params", "1e6", "--method", "sgd"], "--method"),
    (["--params", "1e6", "--reuse", "pool", "--pool-size", "1e12"], "--pool-size"),
    (["--params", "1e6", "--method", "pezo", "--reuse-factor", "3"], "--reuse-factor"),
    (["--params", "1e6", "--bits", "99"], "--bits"),
    (["--from-config", "/nonexistent.json"], "--from-config"),
    (["synth", "--design", "dsp"], "--design"),
    ([], "--params"),
])
def test_cli_bad_input_exits_2_naming_the_flag(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_cli_from_config_and_plot(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "smollm2-135m", "method": "pezo", "params": 134e6,
                               "n_samples": 2, "hwsim": {"bits": 16}}))
    argv = ["estimate", "--from-config", str(cfg), "--json"]
    if has_matplotlib():
        pts = tmp_path / "cosim.json"
        pts.write_text(json.dumps([{"label": "gauss", "energy_j": 2e-3, "loss": 0.5},
                                   {"label": "lfsr-otf", "energy_j": 2e-4, "loss": 0.52}]))
        argv += ["--plot", str(tmp_path / "reuse.png"), "--cosim", str(pts)]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["workload"]["q"] == 2 and d["workload"]["bits"] == 16
    assert d["workload"]["reuse"] == "on-the-fly"
    if has_matplotlib():
        assert (tmp_path / "reuse.png").stat().st_size > 1000
        assert (tmp_path / "reuse_pareto.png").stat().st_size > 1000


def test_platform_table():
    assert {"fpga-xc7", "asic-45nm"} <= set(PLATFORMS)
    with pytest.raises(ValueError, match="platform="):
        get_platform("asic-3nm")


def test_from_optimizer_reads_hw_specs_from_zo_noise():
    import torch

    from zoengine.optim import ZO

    p = torch.nn.Parameter(torch.zeros(1000))
    w = Workload.from_optimizer(ZO([p], noise="hw:lfsr-uniform-pool65536"))
    assert w.reuse == "pool" and w.dist == "uniform"
