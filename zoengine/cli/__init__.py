"""The ``zoengine`` command line: ``main`` (also ``python -m zoengine``), its parser and flags."""

from zoengine.cli.flags import (
    EXIT_USAGE,
    UsageError,
    add_config_flags,
    make_run_config,
    validate,
)
from zoengine.cli.main import build_parser, main

__all__ = ["EXIT_USAGE", "UsageError", "add_config_flags", "build_parser", "main",
           "make_run_config", "validate"]
