"""The ``zoengine train`` flags, generated from ``RunConfig``'s fields, and the run
configuration they build (validated by ``RunConfig`` itself).

Every error raises ``UsageError`` or ``ConfigError`` naming its flag; ``zoengine.cli.main``
turns it into exit status 2 with that message (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
from dataclasses import MISSING, fields

EXIT_USAGE = 2


class UsageError(Exception):
    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise (so every usage error takes the same exit-2 path)."""

    def error(self, message):
        m = re.match(r"argument (-{0,2}[\w-]+)(?:/\S+)?: (.*)", message, re.S)
        if m:  # "argument --batch-size: ..." -> "--batch-size: ..."
            raise UsageError(m.group(1), m.group(2))
        raise UsageError("argument", message)


def add_config_flags(parser: argparse.ArgumentParser, cls=None) -> None:
    """One flag per field of ``cls`` (``RunConfig``): its flag name, type, help, choices and
    default come from the field. Every flag defaults to None (not given), so ``--config`` and
    ``--resume`` know which values the command line set; the field's default shows in the
    help. Values are checked by the dataclass, not by argparse, so a flag and a config key get
    the same message."""
    from zoengine.run.config import RunConfig, flag_of, parse_of

    cls = cls or RunConfig
    for f in fields(cls):
        meta = f.metadata
        text = meta.get("help", "")  # every field has help (tests/test_config.py)
        default = f.default_factory() if f.default is MISSING else f.default
        if meta.get("show_default", True) and default is not None and "action" not in meta:
            shown = ",".join(default) if isinstance(default, list) else default
            text += f" (default {shown})"
        kw = {"dest": f.name, "default": None, "help": text.replace("%", "%%")}
        if "action" in meta:
            kw["action"] = meta["action"]
        else:
            kw["type"] = parse_of(cls, f)
            choices = meta.get("choices")
            kw["metavar"] = meta.get("metavar") or ("{" + ",".join(choices) + "}" if choices
                                                    else None)
        parser.add_argument(flag_of(f), **kw)


def checked(check, parse=int):
    """An argparse ``type=`` that parses with ``parse`` and applies ``check`` (zoengine.checks):
    a bad value is a usage error naming the flag, the value and the rule."""
    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r}: {check.describe()}") from None
        if not check.accepts(value):
            raise argparse.ArgumentTypeError(f"{text!r}: {check.describe()}")
        return value

    convert.__name__ = parse.__name__  # argparse names the type in its messages
    convert.check, convert.parse = check, parse  # tests/test_bad_input.py reads them
    return convert


def _options_list(s: str) -> list[str]:
    from zoengine.run.config import options_list

    return options_list(s)


# ---- config -----------------------------------------------------------------------------------

def read_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError("--config", f"{path!r}: no such file")
    text = open(path, encoding="utf-8").read()
    if path.endswith((".yaml", ".yml")):
        if importlib.util.find_spec("yaml") is None:
            raise UsageError("--config", "YAML needs pyyaml (pip install pyyaml); or use JSON")
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError("--config", f"{path}: not valid YAML ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError("--config", f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError("--config", f"{path}: must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def make_run_config(args, *, check: bool = True):
    """The ``RunConfig`` of a ``zoengine train`` command line: ``--config`` file values, then
    the flags given (they win). Built with ``check=False`` for ``--resume``: those values are
    merged into the run's saved configuration, which is validated then."""
    from zoengine.run.config import RunConfig, parse_of

    by_name = {f.name: f for f in fields(RunConfig)}
    values = {}
    if args.config:
        for k, v in read_config(args.config).items():
            if k not in by_name:
                raise UsageError("--config", f"unknown key {k!r} (known: {sorted(by_name)})")
            parse = parse_of(RunConfig, by_name[k])
            if isinstance(v, str) and parse not in (str, bool):
                try:  # as on the command line: YAML reads 1e-4 as a string
                    v = parse(v)
                except ValueError:
                    pass  # the field's check names the key's flag and the value
            values[k] = v
    for name in by_name:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    if args.lora:
        if values.get("train") not in (None, "auto", "lora"):
            raise UsageError("--lora", f"conflicts with --train {values['train']}")
        values["train"] = "lora"
    if check:
        return RunConfig(**values)
    cfg = RunConfig.unvalidated(**values)
    cfg.given_flags = frozenset(values)  # --resume compares exactly these with the run's
    return cfg


def validate(cfg) -> None:
    """Reject bad input before any work starts (``RunConfig.validate``; each error names its
    flag)."""
    cfg.validate()
