"""The ``zoengine`` command line: ``main`` (also ``python -m zoengine``), its parser and flags."""

from zoengine.cli.flags import EXIT_USAGE, TRAIN_FLAGS, UsageError, make_run_config, validate
from zoengine.cli.main import build_parser, main

__all__ = ["EXIT_USAGE", "TRAIN_FLAGS", "UsageError", "build_parser", "main", "make_run_config",
           "validate"]
