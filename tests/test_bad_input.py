"""The bad-input table (issue 29): every flag of every command and every argument of every
public optimizer, given bad values, is refused before any work starts, in words that name it.

The cases are generated, not listed: the CLI cases walk the argparse parsers of ``train``,
``eval``, ``prune``, ``merge``, ``export-journal`` and ``apply-journal`` and derive bad values
from each option's type and choices; the API cases walk the constructor signatures of MeZO,
KerZOO, PeZO, DiZO, ZO and every registered method. So a new flag or argument without
validation fails here, unless ``ALLOWED`` lists the value with the reason it is legitimate.

Expected outcome of a CLI case: exit status 2, the flag (or positional argument) named in
stderr, no traceback, and none of the commands' work functions reached (they are replaced by
one that fails the case). Of an API case: ``ValueError`` or ``TypeError`` at construction,
whose message names the argument. All in-process: the whole table takes seconds.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import warnings

import numpy as np
import pytest
import torch

import zoengine
from zoengine.cli import main
from zoengine.cli.main import build_parser
from zoengine.optim import available_methods, create
from zoengine.optim.deprecations import ENGINE_KEYWORDS

torch.set_num_threads(1)

# ---- the CLI table ----------------------------------------------------------------------------

INT_BAD = ["-1", "0", "1e20", "x", "", str(2**64), "2.5"]
FLOAT_BAD = ["nan", "inf", "-inf", "-1", "x", "", "1e400"]
CHOICE_BAD = ["nope", ""]
LIST_BAD = ["", ","]
STR_BAD = ["", " "]
OUTPUTS = {"output_dir", "out"}  # + "/" (the root: never a place to write)
INPUTS = {"model", "task", "weights", "config", "resume", "calib_task", "run", "journal", "base"}

# values a flag's type does not reveal as bad
EXTRA = {
    "--seed": [str(2**32)],
    "--method": ["adamw"],
    "--template": ["no placeholder", "{text} {other}", "{0} {text}", "{text!z}", "{text"],
    "--options": ["one", "a,a"],
    "--journal-fsync": ["0", "-1", "never"],
    "--prune": ["random", "wanda:3:4x"],
    "--max-memory": ["lots", "-1GiB"],
    "--dizo-projected": ["("],
    "--pattern": ["3:2", "0:4", "2:4:8"],
    "--lora-targets": [","],
}

# (command, flag, value): legitimately allowed values among the generated ones, and why
ALLOWED = {
    ("train", "--seed", "0"): "seed 0 is the default",
    ("eval", "--seed", "0"): "seed 0 is the default",
    ("prune", "--seed", "0"): "seed 0 is the default",
    ("train", "--eval-limit", "0"): "0: score every row",
    ("train", "--eval-every", "0"): "0: the per-mode default",
    ("train", "--checkpoint-every", "0"): "0: never checkpoint",
    ("train", "--replica-check-every", "0"): "0: never compare the ranks' weights",
    ("train", "--warmup-steps", "0"): "0: no warm-up (the default)",
}

# commands whose work must never be reached by a bad value
WORK = [("zoengine.run.job", "run_train"), ("zoengine.run.evaluate", "run_eval"),
        ("zoengine.run.pruning", "run_prune"), ("zoengine.run.pruning", "run_prune_structured"),
        ("zoengine.run.merge", "merge_run"), ("zoengine.run.shipping", "export_journal"),
        ("zoengine.run.shipping", "apply_journal")]

COMMANDS = ("train", "eval", "prune", "merge", "export-journal", "apply-journal")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _kind(action) -> str:
    if action.choices is not None or str(action.metavar or "").startswith("{"):
        return "choice"
    parse = getattr(action.type, "parse", action.type)
    return {int: "int", float: "float", None: "str", str: "str"}.get(parse, "list")


def _bad_values(action) -> list[str]:
    kind, name = _kind(action), action.dest
    values = {"int": INT_BAD, "float": FLOAT_BAD, "choice": CHOICE_BAD, "list": LIST_BAD,
              "str": STR_BAD}[kind]
    values = list(values) + (["/"] if name in OUTPUTS else [])
    values += ["/nonexistent/zoengine-bad-input"] if name in INPUTS else []
    label = action.option_strings[0] if action.option_strings else None
    return values + EXTRA.get(label, [])


def _cli_cases() -> list:
    cases = []
    for command, parser in _subparsers().items():
        if command not in COMMANDS:
            continue
        for action in parser._actions:
            if action.nargs == 0 or action.nargs == argparse.REMAINDER:
                continue  # --help, store_true flags: no value to get wrong
            label = action.option_strings[0] if action.option_strings else action.dest
            for value in dict.fromkeys(_bad_values(action)):
                if (command, label, value) not in ALLOWED:
                    cases.append(pytest.param(command, label, value,
                                              id=f"{command} {label} {value!r}"))
    return cases


CLI_CASES = _cli_cases()


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """The commands' work functions fail the case; the valid values of the other arguments."""
    import importlib

    def reached(*a, **k):
        raise AssertionError("a bad value was accepted: the command's work started")

    for module, name in WORK:
        monkeypatch.setattr(importlib.import_module(module), name, reached)
    run = tmp_path / "run"
    run.mkdir()
    journal = tmp_path / "j.zoj"
    journal.write_bytes(b"")
    return {"run": str(run), "journal": str(journal), "base": "smollm2-135m",
            "out": str(tmp_path / "out"), "--output-dir": str(tmp_path / "pruned")}


def _argv(command: str, label: str, value: str, good: dict) -> list[str]:
    positionals = {"merge": ["run", "out"], "export-journal": ["run", "out"],
                   "apply-journal": ["base", "journal", "out"]}.get(command, [])
    argv = [command] + [value if p == label else good[p] for p in positionals]
    if command == "prune" and label != "--output-dir":
        argv += ["--output-dir", good["--output-dir"]]
    return argv + ([label, value] if label.startswith("-") else [])


def test_the_cli_table_is_large_and_covers_every_command():
    assert len(CLI_CASES) >= 300, len(CLI_CASES)
    assert {c.values[0] for c in CLI_CASES} == set(COMMANDS)


@pytest.mark.parametrize("command, label, value", CLI_CASES)
def test_cli_bad_value(no_work, capsys, command, label, value):
    rc = main(_argv(command, label, value, no_work))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{label}:" in err and "Traceback" not in err, err


# ---- the API table ----------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
FLOAT_API = [NAN, INF, -INF, -1.0, "0.1", [1.0]]
INT_API = [-1, 1.5, "1", [1]]
STR_API = ["nope", 5, ""]
BOOL_API = ["yes", 1, None]
# arguments whose default does not reveal their type, and values their type does not refuse
SPECIAL = {
    "masks": ["nope", 5, {"missing.weight": True}],
    "projection_closure": [5, "abc", [5]],
    "projected": ["(", "", 5, "nomatch$"],
    "eps": [0.0, 1e-45],
    "seed": [2**64],
    "tau": [1.0],
    "kernel_order": [7],
    "lr": [True],
}
# ZO's keywords that presets pass through **kwargs
PASSED_ON = ("seed", "n_samples", "backend", "nonfinite", "masks", "stochastic_rounding")
CLASSES = (zoengine.MeZO, zoengine.KerZOO, zoengine.PeZO, zoengine.DiZO, zoengine.ZO)


def _params():
    torch.manual_seed(0)
    return list(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
                .named_parameters())


def _values(name: str, default, annotation) -> list:
    if name in SPECIAL and default is None and name != "clip":
        return SPECIAL[name]
    optional = default is None or "None" in str(annotation)
    if isinstance(default, bool):
        values = BOOL_API
    elif isinstance(default, int):
        values = INT_API
    elif isinstance(default, float) or name in ("clip", "tau"):
        values = FLOAT_API
    else:
        values = STR_API
    values = [v for v in values if not (v is None and optional)] + SPECIAL.get(name, [])
    return [v for i, v in enumerate(values) if repr(v) not in map(repr, values[:i])]


def _arguments(cls) -> dict:
    sig = inspect.signature(cls.__init__).parameters
    out = {n: (p.default, p.annotation) for n, p in sig.items()
           if n not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if any(p.kind is p.VAR_KEYWORD for p in sig.values()) and cls is not zoengine.ZO:
        zo = inspect.signature(zoengine.ZO.__init__).parameters
        out.update({n: (zo[n].default, zo[n].annotation) for n in PASSED_ON if n not in out})
    return out


def _base_kwargs(cls_or_name) -> dict:
    return {"projected": "all"} if cls_or_name in (zoengine.DiZO, "dizo") else {}


def _api_cases() -> list:
    cases = []
    for cls in CLASSES:
        for name, (default, annotation) in _arguments(cls).items():
            for v in _values(name, default, annotation):
                cases.append(pytest.param(cls, name, v, id=f"{cls.__name__} {name}={v!r}"))
        for name in ENGINE_KEYWORDS:  # the deprecated engine keywords: checked at once too
            for v in ({"journal": [5, "", "/nonexistent/zoengine/j.zoj"],
                       "journal_fsync": [0, "never"], "model": [5],
                       "perturbation": ["nope"], "distributed": ["nope"]}[name]):
                cases.append(pytest.param(cls, name, v, id=f"{cls.__name__} {name}={v!r}"))
    zo = inspect.signature(zoengine.ZO.__init__).parameters
    for method in available_methods():
        for name in ("lr", "eps", "weight_decay", *PASSED_ON):
            for v in _values(name, zo[name].default, zo[name].annotation):
                cases.append(pytest.param(method, name, v, id=f"create({method!r}) {name}={v!r}"))
    return cases


API_CASES = _api_cases()


def test_the_api_table_is_large_and_covers_every_class_and_method():
    assert len(API_CASES) >= 300, len(API_CASES)
    built = {c.values[0] for c in API_CASES}
    assert set(CLASSES) <= built and set(available_methods()) <= built


@pytest.mark.parametrize("target, name, value", API_CASES)
def test_api_bad_value_refused_at_construction(tmp_path, target, name, value):
    kw = {**_base_kwargs(target), name: value}
    if name == "journal_fsync":
        kw["journal"] = str(tmp_path / "j.zoj")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated keywords warn; that is not the point
        with pytest.raises((ValueError, TypeError)) as info:
            if isinstance(target, str):
                create(target, _params(), **kw)
            else:
                target(_params(), **kw)
    assert name in str(info.value), str(info.value)


# ---- issue 29 item 10, one by one -------------------------------------------------------------

def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_template_with_another_field_is_refused_by_the_task_too(tmp_path):
    from zoengine.tasks import TaskError, task_from_file

    csv = _write(tmp_path / "t.csv", b"text,label\ngood,pos\nbad,neg\n" * 5)
    with pytest.raises(TaskError, match="--template"):
        task_from_file(csv, template="{text} {other}", options=[" pos", " neg"])


@pytest.mark.parametrize("content, words", [(b"", "is empty"),
                                            ("text,label\ncaf\xe9,pos\n".encode("latin-1"),
                                             "UTF-8")])
def test_empty_or_latin1_csv_names_the_task(tmp_path, content, words):
    from zoengine.tasks import TaskError, task_from_file

    with pytest.raises(TaskError, match="--task") as info:
        task_from_file(_write(tmp_path / "t.csv", content), options=[" pos", " neg"])
    assert words in str(info.value)


def test_model_folder_without_tokenizer_says_so(tmp_path):
    from zoengine.run.resources import load_model
    from zoengine.tasks import TaskError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(TaskError, match="--model") as info:
        load_model(str(tmp_path))
    assert "no tokenizer" in str(info.value) and "install" not in str(info.value)


def test_config_string_false_is_refused_not_counted_true(no_work, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"keep_zeros": "false"}))
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "--keep-zeros" in err and "boolean" in err


def test_eval_options_empty_blames_options(no_work, capsys):
    assert main(["eval", "--options", ""]) == 2
    err = capsys.readouterr().err
    assert "--options" in err and "--block-size" not in err


def test_api_engine_arguments_checked_at_construction(tmp_path):
    p = _params()
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="journal="):
        zoengine.MeZO(p, journal=5)
    opt = zoengine.MeZO(_params())
    with pytest.raises(ValueError, match="journal_fsync="):
        opt.set_journal(str(tmp_path / "j.zoj"), fsync=-1)
    with pytest.raises(ValueError, match="appears twice"):
        zoengine.MeZO([("a", p[0][1]), ("a", p[1][1])])
    for bad in (5, "abc", [5]):
        with pytest.raises(TypeError, match="projection_closure"):
            zoengine.DiZO(_params(), projected="all", projection_closure=bad)


def test_eps_that_rounds_away_is_refused_or_warned():
    with pytest.raises(ValueError, match="eps=1e-45"):
        zoengine.MeZO(_params(), eps=1e-45)
    with pytest.warns(RuntimeWarning, match="eps=1e-30"):
        opt = zoengine.MeZO(_params(), eps=1e-30)
    opt.param_groups[0]["eps"] = 1e-45  # a scheduler: refused at the step, weights untouched
    before = [p.clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises(ValueError, match="eps"):
        opt.step(lambda: 0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, opt.param_groups[0]["params"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoengine.MeZO(_params(), eps=1e-3)  # the usual ε: no warning
        zoengine.MeZO([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], eps=1e-2)


def test_pezo_backend_and_state_checked():
    with pytest.raises(ValueError, match="backend='triton'"):
        zoengine.PeZO(_params(), backend="triton")
    zoengine.PeZO(_params(), backend="reference")
    opt = zoengine.PeZO(_params(), pool_size=64)
    good = opt.state_dict()
    for key, value, match in (("step", -5, "step"), ("pool", torch.zeros(10), "pool"),
                              ("pool_pointer", 64, "pool_pointer"),
                              ("pool_scale", math.nan, "pool_scale")):
        sd = opt.state_dict()
        sd["state"]["zo"][key] = value
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
    opt.load_state_dict(good)


@pytest.mark.parametrize("make", [np.float16, np.float32, np.float64])
def test_numpy_scalar_losses_are_accepted(make):
    p = _params()
    opt = zoengine.MeZO(p, lr=1e-2, eps=1e-3)
    w = p[0][1]
    before = w.detach().clone()
    loss = opt.step(lambda: make(float(w.sum()) * 100))
    assert torch.isfinite(loss) and not torch.equal(before, w)


@pytest.mark.parametrize("exc, words", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                  "writing file data/0: file write failed"), "data/0"),
    (Exception("No space left on device (os error 28)"), "disk is most likely full"),
    (OSError(28, "No space left on device", "/out/model/tokenizer.json"), "tokenizer.json"),
])
def test_disk_full_is_said_in_words(monkeypatch, capsys, exc, words):
    import zoengine.run.job

    def full(*a, **k):
        raise exc

    monkeypatch.setattr(zoengine.run.job, "run_train", full)
    assert main(["train", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "disk is" in err and words in err and "--resume" in err, err
