"""The pieces ``RunConfig``'s fields are built from (``zoengine.run.config``): ``option`` (a
field with its help, check, choices and flag settings), the parsers of list-valued flags and the
checks that need more than ``zoengine.checks`` (a model folder, a task, a prune spec, a size).
They import their owners (the method registry, the tasks, the sparsity helpers) only when a value
is checked, so building the parser (``zoengine --help``) imports no torch."""

from __future__ import annotations

import os
import re
from dataclasses import field

from zoengine.checks import POSITIVE_INT, Check, is_number, one_of, optional, parsed_by

DEFAULT_MODEL = "smollm2-135m"


def csv_list(s: str) -> list[str]:
    """``--lora-targets q_proj,v_proj`` -> ["q_proj", "v_proj"]."""
    return [x for x in s.split(",") if x != ""]


def options_list(s: str) -> list[str]:
    """``--options neg,pos`` -> [" neg", " pos"] (an option keeps a leading space if given)."""
    return [x if x.startswith(" ") else " " + x for x in s.split(",") if x.strip()]


def _methods():
    from zoengine.optim import available_methods

    return available_methods()


def _bundled():
    from zoengine.tasks import BUNDLED

    return tuple(BUNDLED)


def _file_tasks():
    """The tasks read from ``--data-dir`` (MeZO's suite and any registered later)."""
    from zoengine.tasks import FILE_TASKS

    return tuple(FILE_TASKS)


def split_sizes(s: str) -> list[int]:
    """``--split-sizes 1000,500,1000`` -> [1000, 500, 1000] (train, dev, test)."""
    return [int(x) for x in s.split(",")]


def _prune_spec(v):
    from zoengine.sparsity import parse_prune_spec

    return parse_prune_spec(v)


def _size(v):
    from zoengine.sparsity.memory import parse_size

    return parse_size(v)


METHOD = one_of(_methods)
MODEL = Check(lambda v: v == DEFAULT_MODEL or (isinstance(v, str) and v.strip() != "" and
                                               os.path.isfile(os.path.join(v, "config.json"))),
              f"not {DEFAULT_MODEL!r} and not a local Hugging Face model folder with config.json")
TASK = Check(lambda v: isinstance(v, str) and (v in _bundled() or v in _file_tasks()
                                               or os.path.isfile(v)),
             lambda: f"neither a bundled task ({', '.join(_bundled())}), a task read from "
                     f"--data-dir ({', '.join(_file_tasks())}) nor an existing file")
SPLIT_SIZES = Check(lambda v: isinstance(v, (list, tuple)) and len(v) == 3
                    and all(POSITIVE_INT.ok(x) for x in v),
                    "must be three integers > 0: TRAIN,DEV,TEST (e.g. 1000,500,1000)")


def _regex_ok(v) -> bool:
    try:
        re.compile(v)
    except re.error:
        return False
    return isinstance(v, str) and v.strip() != ""


DIZO_SET = Check(_regex_ok, "must be code, paper, lora, all or a valid, non-empty regex of "
                            "parameter names")
PRUNE = parsed_by(_prune_spec, "must be wanda or magnitude, optionally with :2:4 or :4:8 "
                               "(e.g. wanda:2:4)")
SIZE = parsed_by(_size, "must be a size such as 2GiB, 1.5G, 800MiB, 4GB or a number of bytes")
JOURNAL_FSYNC = Check(lambda v: str(v) in ("step", "checkpoint") or (
    str(v).isdigit() and int(v) > 0), "must be 'step', 'checkpoint' or a number of steps > 0")


def option(default, help: str, check: Check | None = None, *, choices=None, **cli):
    """A ``RunConfig`` field: its default, help and check. ``choices`` (a tuple) become the
    check when none is given; ``cli`` holds the parser's settings where the defaults do not
    fit: ``flag`` (default ``--`` + the name with dashes), ``parse`` (the flag's type; default
    the annotation's), ``metavar``, ``action`` (``store_true``/``store_false``), ``show_default``."""
    if check is None:
        check = one_of(choices)
        if default is None:
            check = optional(check)
    meta = {"help": help, "check": check, "choices": choices, **cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


KERNEL_ORDER = Check(lambda v: not isinstance(v, bool) and v in (1, 3, 5),
                     "must be 1, 3 or 5 (KerZOO's kernels)")
TAU = Check(lambda v: is_number(v) and 0 <= v < 1,
            "must be a number in [0, 1) (DiZO's γ stays within (1 ± τ)·‖Δ‖)")
