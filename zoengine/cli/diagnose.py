"""``zoengine diagnose bias``: the central difference against ∇L·u along random directions,
per ε (zoengine.run.diagnose; docs/cli.md)."""

from __future__ import annotations

from zoengine.checks import (
    OPTIONS,
    OUTPUT_FILE,
    POSITIVE_INT,
    SEED,
    TEMPLATE,
    Check,
    is_number,
)
from zoengine.cli.flags import UsageError, _options_list, _Parser, checked
from zoengine.run.config import MODEL, TASK

DISTS = ("normal", "uniform", "rademacher")
DEFAULT_EPS = "1e-1,1e-2,1e-3,1e-4"


def eps_list(text: str) -> list[float]:
    """``1e-2,1e-3``: comma-separated numbers."""
    return [float(x) for x in text.split(",")]


EPS_LIST = Check(lambda v: isinstance(v, list) and len(v) > 0
                 and all(is_number(x) and x > 0 for x in v),
                 "must be comma-separated finite numbers > 0 (e.g. 1e-2,1e-3)")


def add_diagnose_command(subparsers) -> None:
    """Register ``zoengine diagnose bias``."""
    d = subparsers.add_parser("diagnose", help="measurements of the ZO estimate on a model "
                                               "(bias: central difference vs backprop)")
    kinds = d.add_subparsers(dest="diagnostic", parser_class=_Parser)
    b = kinds.add_parser("bias", help="central difference (L(θ+εu) − L(θ−εu))/(2ε) against "
                                      "∇L·u from one backward pass, along random directions, "
                                      "per ε")
    b.add_argument("--model", default="smollm2-135m", type=checked(MODEL, str),
                   help="the embedded model or a local Hugging Face model folder")
    b.add_argument("--task", default="shakespeare", type=checked(TASK, str),
                   help="a bundled task or a task file, as for train (default shakespeare)")
    b.add_argument("--template", default=None, type=checked(TEMPLATE, str),
                   help="user classification task: prompt template with {text}")
    b.add_argument("--options", type=checked(OPTIONS, _options_list), default=None,
                   help="user classification task: comma-separated answer words")
    b.add_argument("--batch-size", type=checked(POSITIVE_INT), default=8,
                   help="examples in the one batch the loss is measured on (default 8)")
    b.add_argument("--max-length", type=checked(POSITIVE_INT), default=128,
                   help="prompt tokens kept (classification tasks; default 128)")
    b.add_argument("--block-size", type=checked(POSITIVE_INT), default=128,
                   help="tokens per block (LM tasks; default 128)")
    b.add_argument("--eps", type=checked(EPS_LIST, eps_list), default=eps_list(DEFAULT_EPS),
                   metavar="E1,E2,...", help=f"the ε values (default {DEFAULT_EPS})")
    b.add_argument("--directions", type=checked(POSITIVE_INT), default=8,
                   help="random directions u per ε (default 8)")
    b.add_argument("--dist", choices=DISTS, default="normal",
                   help="distribution of u, from the noise contract (default normal)")
    b.add_argument("--seed", type=checked(SEED), default=0,
                   help="seed of the batch and of the directions (default 0)")
    b.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="the dtype the model loads in (float64 separates the bias from the "
                        "rounding of the two losses; default float32)")
    b.add_argument("--output", default=None, type=checked(OUTPUT_FILE, str), metavar="FILE",
                   help="also write the table as CSV to FILE")
    b.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")


def cmd_diagnose(args) -> int:
    if args.diagnostic is None:
        raise UsageError("diagnose", "needs a diagnostic: bias (zoengine diagnose bias --help)")
    from zoengine.run.diagnose import run_bias

    run_bias(model=args.model, task=args.task, template=args.template, options=args.options,
             batch_size=args.batch_size, max_length=args.max_length,
             block_size=args.block_size, dtype=args.dtype, eps_list=args.eps,
             directions=args.directions, dist=args.dist, seed=args.seed,
             output=args.output, progress=args.progress)
    return 0
