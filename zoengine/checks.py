"""The value checks of every configuration: ``RunConfig`` (``zoengine train``, ``run_train``)
and ``ZOTrainingArguments`` (the Hugging Face Trainer) validate with these same objects, so a
bad value gets the same words wherever it is given.

A ``Check`` is a predicate and the sentence that says what is allowed; calling it with a name
(a flag such as ``--steps``, or a field such as ``zo_eps``) and a value returns the value or
raises ``ConfigError``: ``--steps: -1: must be an integer > 0``. Standard library only (layer 0):
checks whose choices live higher up (the method registry) take them as a function.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration value is not allowed. ``flag`` is the name given (the CLI exits 2 with
    the message), ``field`` the dataclass field where that differs, ``allowed`` the rule."""

    def __init__(self, name: str, value: Any, allowed: str, *, field: str | None = None):
        super().__init__(f"{name}: {value!r}: {allowed}")
        self.flag, self.value, self.allowed = name, value, allowed
        self.field = field or name


@dataclass(frozen=True)
class Check:
    """``ok(value)`` says whether a value is allowed; ``allowed`` says what is (a string, or a
    function returning one when it depends on a registry)."""

    ok: Callable[[Any], bool]
    allowed: str | Callable[[], str]

    def describe(self) -> str:
        return self.allowed() if callable(self.allowed) else self.allowed

    def accepts(self, value) -> bool:
        """``ok(value)``, False where it raises ``TypeError``/``ValueError``."""
        try:
            return bool(self.ok(value))
        except (TypeError, ValueError, OverflowError):
            return False

    def __call__(self, name: str, value, *, field: str | None = None):
        if not self.accepts(value):
            raise ConfigError(name, value, self.describe(), field=field)
        return value


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# counts fit int64 (torch's index type, the journal's step field)
INT64 = 2**63
POSITIVE_INT = Check(lambda v: is_int(v) and 0 < v < INT64, "must be an integer > 0 (below 2^63)")
# numpy's RandomState (data splits, batches) takes seeds below 2^32
SEED = Check(lambda v: is_int(v) and 0 <= v < 2**32, "must be an integer in [0, 2^32)")
NONNEGATIVE_INT = Check(lambda v: is_int(v) and 0 <= v < INT64,
                        "must be an integer >= 0 (below 2^63)")
POSITIVE_NUMBER = Check(lambda v: is_number(v) and v > 0, "must be a finite number > 0")
NONNEGATIVE_NUMBER = Check(lambda v: is_number(v) and v >= 0, "must be a finite number >= 0")
FRACTION = Check(lambda v: is_number(v) and 0 < v < 1, "must be a fraction in (0, 1)")
PROBABILITY = Check(lambda v: is_number(v) and 0 <= v <= 1, "must be a number in [0, 1]")
STRING = Check(lambda v: isinstance(v, str), "must be a string")
NAME = Check(lambda v: isinstance(v, str) and v.strip() != "", "must be a non-empty string")
BOOL = Check(lambda v: isinstance(v, bool), "must be true or false (a JSON/YAML boolean, not a "
                                           "string)")
STRINGS = Check(lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                and all(isinstance(x, str) and x.strip() for x in v),
                "must be a non-empty list of names")


def _is_root(v: str) -> bool:
    return os.path.dirname(os.path.abspath(v)) == os.path.abspath(v)


# an output folder: not "" (the current folder) nor a file system's root
OUTPUT_DIR = Check(lambda v: isinstance(v, str) and v.strip() != "" and not _is_root(v),
                   "must name a folder to write into (not empty, not the root of the file "
                   "system)")
# an output file: a path that is not "" and not an existing folder
OUTPUT_FILE = Check(lambda v: isinstance(v, str) and v.strip() != "" and not os.path.isdir(v),
                    "must name a file to write (not empty, not an existing folder)")
EXISTING_FILE = Check(lambda v: isinstance(v, str) and os.path.isfile(v),
                      "must be an existing file")
EXISTING_DIR = Check(lambda v: isinstance(v, str) and os.path.isdir(v),
                     "must be an existing folder")


def template_ok(v) -> bool:
    """A prompt template: a str whose only replacement field is ``{text}`` (used at least once)
    and that ``str.format`` accepts (``{{`` / ``}}`` are literal braces)."""
    if not isinstance(v, str) or "{text}" not in v:
        return False
    names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
    if names != {"text"}:
        return False
    v.format(text="")  # a bad conversion or format spec raises ValueError
    return True


TEMPLATE = Check(template_ok, "must contain {text} and no other {field} (write a literal "
                              "brace as {{ or }})")

OPTIONS = Check(lambda v: STRINGS.ok(v) and len(v) >= 2 and len({x.strip() for x in v}) == len(v),
                "must be at least 2 distinct comma-separated answer words")


def one_of(choices) -> Check:
    """A value among ``choices`` (a sequence, or a function returning one: a registry)."""
    def get():
        return tuple(choices() if callable(choices) else choices)

    return Check(lambda v: v in get(), lambda: f"must be one of {', '.join(map(str, get()))}")


def optional(check: Check) -> Check:
    """``check``, or None (the default for the run's mode applies)."""
    return Check(lambda v: v is None or check.ok(v), check.allowed)


def parsed_by(parse: Callable[[Any], Any], allowed: str) -> Check:
    """A value ``parse`` accepts (does not raise ``ValueError``)."""
    def ok(v) -> bool:
        parse(v)
        return True

    return Check(ok, allowed)
