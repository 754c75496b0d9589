"""``zoengine train | eval | methods | hwsim`` (also ``python -m zoengine``).

``zoengine train`` with no arguments runs the embedded default job: SmolLM2-135M-Instruct on
tweet sentiment, ZO on the option rows of the output layer (see docs/default_job.md).
Bad input exits with status 2 and a message that names the flag; never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import re
import sys

from zoengine.checks import (
    EXISTING_DIR,
    EXISTING_FILE,
    NAME,
    OPTIONS,
    OUTPUT_DIR,
    OUTPUT_FILE,
    POSITIVE_INT,
    SEED,
    TEMPLATE,
    Check,
    parsed_by,
)
from zoengine.cli.diagnose import add_diagnose_command, cmd_diagnose
from zoengine.cli.flags import (
    EXIT_USAGE,
    UsageError,
    _options_list,
    _Parser,
    add_config_flags,
    checked,
    make_run_config,
    validate,
)
from zoengine.run.config import MODEL, TASK


def _pattern(v):
    from zoengine.sparsity.masks import parse_pattern

    return parse_pattern(v)


# --sparsity of `zoengine prune` (unstructured and structured alike)
SPARSITY = Check(lambda v: isinstance(v, float) and 0 <= v < 1, "must be a number in [0, 1)")
PATTERN = parsed_by(_pattern, "must be 'unstructured' or 'N:M' with 0 < N < M (e.g. 2:4, 4:8)")
EXISTS = Check(lambda v: isinstance(v, str) and v != "" and os.path.exists(v),
               "no such file or folder")


def _add_prune_command(subparsers) -> None:
    """Register ``zoengine prune``: prune a model and save it (zeros in a dense checkpoint)."""
    p = subparsers.add_parser("prune", help="prune a model (magnitude or Wanda, unstructured "
                                            "or N:M) and save it")
    p.add_argument("--model", default="smollm2-135m", type=checked(MODEL, str))
    p.add_argument("--output-dir", required=True, type=checked(OUTPUT_DIR, str),
                   help="folder for the pruned model")
    p.add_argument("--method", choices=("magnitude", "wanda"), default="wanda")
    p.add_argument("--sparsity", type=checked(SPARSITY, float), default=None,
                   help="fraction removed per layer, in [0, 1) (default 0.5; N:M fixes it)")
    p.add_argument("--pattern", default="unstructured", type=checked(PATTERN, str),
                   help="unstructured | N:M with 0 < N < M (2:4, 4:8)")
    p.add_argument("--structure", choices=("heads", "channels"), default=None,
                   help="structured pruning instead: remove whole KV groups of attention heads "
                        "or MLP channels (a smaller dense model; --sparsity is the fraction "
                        "removed)")
    p.add_argument("--calib-task", default="shakespeare", type=checked(TASK, str),
                   help="task whose *train* split calibrates Wanda (default shakespeare)")
    p.add_argument("--calib-blocks", type=checked(POSITIVE_INT), default=16,
                   help="128-token blocks (default 16)")
    p.add_argument("--seed", type=checked(SEED), default=0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zoengine", description="Zeroth-order (forward-only) LLM fine-tuning.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    t = sub.add_parser("train", help="fine-tune with a ZO method (no arguments: the default job)")
    t.add_argument("--config", metavar="FILE", type=checked(EXISTING_FILE, str),
                   help="YAML (needs pyyaml) or JSON file with the same keys as the flags "
                        "(batch-size or batch_size); flags given on the command line win")
    add_config_flags(t)  # one flag per RunConfig field (zoengine.run.config)
    t.add_argument("--lora", action="store_true", default=None, help="same as --train lora")
    t.add_argument("--resume", metavar="DIR", default=None, type=checked(EXISTING_DIR, str),
                   help="continue the interrupted run in DIR (its last checkpoint, then its "
                        "journal, replayed without forward passes); a flag given beside it "
                        "must equal the run's value, except --steps (not below the steps "
                        "done), --no-progress, --checkpoint-* and --journal-fsync; the run's "
                        "--threads is reused")
    _add_prune_command(sub)
    add_diagnose_command(sub)
    e = sub.add_parser("eval", help="score a model on a task")
    e.add_argument("--model", default="smollm2-135m", type=checked(MODEL, str))
    e.add_argument("--task", default="sentiment", type=checked(TASK, str))
    e.add_argument("--weights", default=None, type=checked(EXISTS, str),
                   help="a `zoengine train` output folder, head .safetensors, adapter or model")
    e.add_argument("--split", default="test", choices=["dev", "test"])
    e.add_argument("--seed", type=checked(SEED), default=0)
    e.add_argument("--max-length", type=checked(POSITIVE_INT), default=128)
    e.add_argument("--batch-size", type=checked(POSITIVE_INT), default=16)
    e.add_argument("--block-size", type=checked(POSITIVE_INT), default=128)
    e.add_argument("--template", default=None, type=checked(TEMPLATE, str))
    e.add_argument("--options", type=checked(OPTIONS, _options_list), default=None)
    e.add_argument("--text-column", default="text", type=checked(NAME, str))
    e.add_argument("--label-column", default="label", type=checked(NAME, str))
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the dtype the model loads in (default: the run's --dtype when "
                        "--weights is a train output folder or in one, else float32)")
    sub.add_parser("methods", help="list the registered ZO methods")
    x = sub.add_parser("export-journal", help="copy a run's verified journal: the fine-tune as "
                                              "kilobytes, to apply to the base model")
    x.add_argument("run", type=checked(EXISTING_DIR, str), help="a `zoengine train` output "
                                                                "folder")
    x.add_argument("out", type=checked(OUTPUT_FILE, str), help="the journal file to write")
    a = sub.add_parser("apply-journal", help="rebuild a run's trained weights from the base "
                                             "model and its journal (no forward pass)")
    a.add_argument("base", type=checked(MODEL, str), help="the base model: 'smollm2-135m' or a local HF model folder")
    a.add_argument("journal", type=checked(EXISTING_FILE, str), help="a journal from `zoengine export-journal` (or a run's "
                                   "journal.zoj)")
    a.add_argument("out", type=checked(OUTPUT_DIR, str), help="output folder for the weights (head.safetensors, adapter/ or "
                              "model/)")
    m = sub.add_parser("merge", help="merge a LoRA run's adapter into its base model (a pruned "
                                     "base keeps its exact zeros)")
    m.add_argument("run", type=checked(EXISTING_DIR, str), help="a finished `zoengine train --lora` output folder")
    m.add_argument("out", type=checked(OUTPUT_DIR, str), help="folder for the merged model (plain transformers)")
    h = sub.add_parser("hwsim", help="hardware RNG cost simulator", add_help=False)
    h.add_argument("rest", nargs=argparse.REMAINDER)
    return p


# ---- commands ---------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from zoengine.run.stops import die_with_launcher

    die_with_launcher()  # under torchrun, before torch loads: a killed launcher takes us along
    from zoengine.run.job import run_train

    if args.resume is not None:
        from zoengine.run.resume import resume_config

        cfg = resume_config(args.resume, make_run_config(args, check=False))
        validate(cfg)
        run_train(cfg, resume=True)
        return 0
    cfg = make_run_config(args)
    run_train(cfg)
    return 0


def cmd_eval(args) -> int:
    from zoengine.run.evaluate import run_eval

    if args.weights is not None and not os.path.exists(args.weights):
        raise UsageError("--weights", f"{args.weights!r}: no such file or folder")
    kw = {}
    if args.options:
        kw = {"template": args.template, "options": args.options,
              "text_column": args.text_column, "label_column": args.label_column}
    res = run_eval(model_spec=args.model, task_name=args.task, weights=args.weights,
                   split=args.split, seed=args.seed, max_length=args.max_length,
                   batch_size=args.batch_size, block_size=args.block_size, task_kw=kw,
                   dtype=args.dtype)
    print(json.dumps(res, indent=2))
    return 0


def cmd_merge(args) -> int:
    from zoengine.run.merge import merge_run

    merge_run(args.run, args.out)
    return 0


def cmd_prune(args) -> int:
    try:
        return _prune(args)
    except ValueError as exc:
        # the pruners name their argument (``sparsity=0.25 ...``): that is a flag of this command
        m = re.match(r"(sparsity|pattern|method|structure|calib_blocks)=", str(exc))
        if getattr(exc, "flag", None) is not None:
            raise
        if m:
            raise UsageError("--" + m.group(1).replace("_", "-"), str(exc)) from None
        if args.structure is not None:  # a model whose layout structured pruning refuses
            raise UsageError("--structure", f"{exc}; prune unstructured instead (without "
                                            "--structure)") from None
        raise


def _prune(args) -> int:
    if args.structure is not None:
        from zoengine.run.pruning import run_prune_structured

        run_prune_structured(model_spec=args.model, output_dir=args.output_dir,
                             structure=args.structure, sparsity=args.sparsity,
                             calib_task=args.calib_task, calib_blocks=args.calib_blocks,
                             seed=args.seed)
        return 0
    from zoengine.run.pruning import run_prune

    run_prune(model_spec=args.model, output_dir=args.output_dir, method=args.method,
              pattern=args.pattern, sparsity=args.sparsity, calib_task=args.calib_task,
              calib_blocks=args.calib_blocks, seed=args.seed)
    return 0


def cmd_journal(args) -> int:
    from zoengine.run import shipping

    if args.command == "export-journal":
        shipping.export_journal(args.run, args.out)
    else:
        shipping.apply_journal(args.base, args.journal, args.out)
    return 0


def cmd_methods(_args) -> int:
    """Each registered name, the class it builds with the options the name fixes, and the
    first line of the class's docstring (what the method is)."""
    from zoengine.optim import available_methods
    from zoengine.optim.registry import method_spec

    for name in available_methods():
        spec = method_spec(name)
        fixed = ", ".join(f"{k}={v!r}" for k, v in spec.fixed.items())
        doc = (spec.cls.__doc__ or "").strip().splitlines()[0] if spec.cls.__doc__ else ""
        print(f"{name:<13} {spec.cls.__name__}({fixed})  {doc}")
    return 0


def cmd_hwsim(argv: list[str]) -> int:
    if importlib.util.find_spec("zoengine.hwsim.cli") is None:
        print("zoengine hwsim: error: hwsim is not built yet in this version "
              "(zoengine.hwsim.cli is missing)", file=sys.stderr)
        return EXIT_USAGE
    from zoengine.hwsim.cli import main as hwsim_main

    try:
        return int(hwsim_main(argv) or 0)
    except SystemExit as exc:  # argparse's --help / usage errors inside hwsim
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `zoengine ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hwsim"]:
        return cmd_hwsim(argv[1:])
    parser = build_parser()
    command = argv[0] if argv and not argv[0].startswith("-") else "zoengine"
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        commands = {"train": cmd_train, "eval": cmd_eval, "methods": cmd_methods,
                    "prune": cmd_prune, "merge": cmd_merge, "export-journal": cmd_journal,
                    "apply-journal": cmd_journal, "diagnose": cmd_diagnose}
        return commands[args.command](args)
    except UsageError as exc:
        print(f"zoengine {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # TaskError (names its flag) and validation in the optimizers
        flag = getattr(exc, "flag", None)
        named = f"{flag}: " if flag and not str(exc).startswith(flag) else ""
        print(f"zoengine {command}: error: {named}{exc}", file=sys.stderr)
        return EXIT_USAGE if flag else 1
    except KeyboardInterrupt as exc:
        if getattr(exc, "words", None):  # SIGTERM: zoengine.run.stops.Interrupted
            print(f"\nzoengine {command}: {exc.words}", file=sys.stderr)
            return exc.code
        print(f"\nzoengine {command}: interrupted; outputs of this run were not written "
              "(finished files are complete, unfinished ones absent); a training run goes on "
              "with `zoengine train --resume OUTPUT_DIR`", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a short message; ZOENGINE_DEBUG=1 for the traceback
        if os.environ.get("ZOENGINE_DEBUG"):
            raise
        full = disk_full(exc)
        if full:
            print(f"zoengine {command}: error: {full}; free space, then run the command again "
                  "(a training run continues with `zoengine train --resume OUTPUT_DIR`)",
                  file=sys.stderr)
            return 1
        print(f"zoengine {command}: error: {type(exc).__name__}: {exc} "
              "(set ZOENGINE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


_FULL_WORDS = ("no space left on device", "os error 28", "file write failed")


def disk_full(exc: BaseException) -> str | None:
    """What a disk-full failure wrote, in words, or None for any other error. ``torch.save``
    says only "[enforce fail at inline_container.cc] ... file write failed", the tokenizer's
    save a bare ``Exception`` with "os error 28"; an ``OSError`` carries ENOSPC and the file."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            where = f" writing {seen.filename}" if seen.filename else ""
            return f"the disk is full (no space left on device){where}"
        text = str(seen)
        if any(w in text.lower() for w in _FULL_WORDS):
            m = re.search(r"(?:writing file|file) (\S+?):", text)
            inner = f" (entry {m.group(1)} of a torch.save archive)" if "Pytorch" in text and m \
                else ""
            return (f"a write failed, the disk is most likely full{inner}: "
                    f"{type(seen).__name__}: {text.strip()[:200]}")
        seen = seen.__cause__ or seen.__context__
    return None
