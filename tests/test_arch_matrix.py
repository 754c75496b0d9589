"""Every architecture of the zoo (tests/archs.py) through the command line: each feature either
works, checked by a property only a correct run has, or is refused (exit 2, the message
naming the flag to change). Nothing else is accepted: an exit 1, a traceback or a wrong result
fails the test. The outcomes are the table of docs/models.md, which must match this run
(``ZOENGINE_WRITE_MODELS_MD=1`` rewrites it after a deliberate change).

API-level checks of the same zoo: tests/test_arch_virtual.py (virtual = in place, losses and
projected gradients), tests/test_arch_pruning.py (what is pruned, per-expert Wanda),
tests/test_planner_count.py (the planner's exact parameter count).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re

import pytest
import torch
from archs import ARCHS, save
from safetensors.torch import load_file
from test_cli import make_tiny_task, tiny_args

from zoengine.cli import main

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS_MD = ROOT / "docs" / "models.md"
FEATURES = ("full", "virtual", "dizo", "norms", "lora", "lm-lora", "prune", "prune+lora+merge",
            "journal", "structured")
RESULTS: dict[str, dict[str, str]] = {}
COMMON = ("--steps", "2", "--batch-size", "2", "--eval-limit", "4")


def _cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            rc = exc.code
    return rc, err.getvalue()


class Refused(Exception):
    """A clean refusal: exit 2 and the flag named."""


def _run(argv) -> None:
    rc, err = _cli(argv)
    if rc == 2 and re.search(r"--[a-z][a-z-]+", err) and "Traceback" not in err:
        flag = re.search(r"error: (.*)", err)
        raise Refused((flag.group(1) if flag else err.strip().splitlines()[-1])[:110])
    assert rc == 0, f"exit {rc}: {err.strip()[-400:]}"


def _train(model, task, out, *extra) -> dict:
    _run(tiny_args({"model": model, "task": task}, out, *COMMON, *extra))
    return json.loads((out / "metrics.json").read_text())


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(pathlib.Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _check_full(model, task, tmp) -> None:
    m = _train(model, task, tmp / "full", "--train", "full")
    losses = m["curve"]["loss"]
    assert len(losses) == 2 and all(map(lambda v: v == v and abs(v) < 1e6, losses))
    base, new = _weights(model), _weights(tmp / "full" / "model")
    assert any(not torch.equal(base[k], new[k]) for k in new if k in base)  # it trained


def _check_virtual(model, task, tmp) -> None:
    v = _train(model, task, tmp / "virtual", "--train", "full", "--perturbation", "virtual")
    i = json.loads((tmp / "full" / "metrics.json").read_text())
    # the same losses within fp32 rounding of the perturbed weights (test_virtual: 1e-4)
    assert v["curve"]["loss"] == pytest.approx(i["curve"]["loss"], rel=1e-4)


def _check_dizo(model, task, tmp) -> None:
    m = _train(model, task, tmp / "dizo", "--train", "full", "--method", "dizo",
               "--dizo-interval", "1")
    assert len(m["curve"]["loss"]) == 2


def _check_norms(model, task, tmp) -> None:
    _train(model, task, tmp / "norms", "--train", "norms")
    base, new = _weights(model), _weights(tmp / "norms" / "model")
    changed = {k for k in new if k in base and not torch.equal(base[k], new[k])}
    assert changed and all(re.search(r"norm|ln_|layernorm", k, re.I) for k in changed), changed


def _check_lora(model, task, tmp) -> None:
    _train(model, task, tmp / "lora", "--train", "lora")
    assert (tmp / "lora" / "adapter" / "adapter_model.safetensors").exists()


def _check_lm_lora(model, task, tmp) -> None:
    _run(["train", "--model", model, "--task", "shakespeare", "--output-dir", tmp / "lm",
          "--no-progress", "--block-size", "16", *COMMON])
    assert (tmp / "lm" / "adapter" / "adapter_model.safetensors").exists()


def _check_prune(model, task, tmp) -> None:
    m = _train(model, task, tmp / "prune", "--train", "full", "--prune", "magnitude")
    sp = m["sparsity_after"]
    # magnitude pruning removes half of every pruned tensor; training keeps each zero
    assert sp["per_tensor"] and all(s >= 0.5 for s in sp["per_tensor"].values()), sp


def _check_prune_lora_merge(model, task, tmp) -> None:
    m = _train(model, task, tmp / "pl", "--train", "lora", "--prune", "wanda")
    _run(["merge", tmp / "pl", tmp / "merged"])
    from transformers import AutoModelForCausalLM

    # through transformers: MoE checkpoints store experts per expert on disk
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged").state_dict()
    for name, share in m["sparsity_after"]["per_tensor"].items():
        t = merged[name]
        assert float((t == 0).float().mean()) >= min(share, 0.5), name  # merge refilled none


def _check_journal(model, task, tmp) -> None:
    _run(["export-journal", tmp / "full", tmp / "run.zoj"])
    _run(["apply-journal", model, tmp / "run.zoj", tmp / "rebuilt"])
    want, got = _weights(tmp / "full" / "model"), _weights(tmp / "rebuilt" / "model")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _check_structured(model, task, tmp) -> None:
    _run(["prune", "--model", model, "--output-dir", tmp / "heads", "--structure", "heads",
          "--sparsity", "0.5", "--calib-blocks", "2"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp / "heads")  # transformers reloads it


CHECKS = {"full": _check_full, "virtual": _check_virtual, "dizo": _check_dizo,
          "norms": _check_norms, "lora": _check_lora, "lm-lora": _check_lm_lora,
          "prune": _check_prune, "prune+lora+merge": _check_prune_lora_merge,
          "journal": _check_journal, "structured": _check_structured}


# curve.png is drawn from a run's numbers, never from the model: see conftest.no_curve_plot
pytestmark = pytest.mark.usefixtures("no_curve_plot")


@pytest.fixture(scope="module")
def task_csv(tmp_path_factory):
    return make_tiny_task(str(tmp_path_factory.mktemp("task") / "t.csv"))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_feature(arch, task_csv, tmp_path):
    model = save(arch, str(tmp_path / "model"))
    row, failures = {}, []
    for feature in FEATURES:
        try:
            CHECKS[feature](model, task_csv, tmp_path)
            row[feature] = "ok"
        except Refused as exc:
            row[feature] = f"refused: {exc}"
        except Exception as exc:  # noqa: BLE001 - every other outcome is a failure, listed
            row[feature] = "FAIL"
            failures.append(f"{feature}: {type(exc).__name__}: {str(exc)[:300]}")
    RESULTS[arch] = row
    assert not failures, "\n".join(failures)


def render(results: dict[str, dict[str, str]]) -> str:
    """The docs/models.md table: one row per architecture, one column per feature."""
    lines = ["| architecture | " + " | ".join(FEATURES) + " |",
             "| --- |" + " --- |" * len(FEATURES)]
    notes = []
    for arch in ARCHS:
        cells = []
        for f in FEATURES:
            v = results[arch][f]
            if v.startswith("refused"):
                notes.append(f"- {arch}, {f}: {v}")
                v = f"refused ({len(notes)})"
            cells.append(v)
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


BEGIN, END = "<!-- matrix: generated by tests/test_arch_matrix.py -->", "<!-- end of matrix -->"


def test_models_md_shows_this_run():
    if set(RESULTS) != set(ARCHS):
        pytest.skip("the full matrix did not run in this session (run the whole file)")
    table = render(RESULTS)
    text = MODELS_MD.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    if os.environ.get("ZOENGINE_WRITE_MODELS_MD") == "1":
        MODELS_MD.write_text(text[:start] + "\n" + table + text[end:])
        return
    assert text[start:end].strip() == table.strip(), (
        "docs/models.md differs from this run's outcomes; rerun with "
        "ZOENGINE_WRITE_MODELS_MD=1 if the change is deliberate")
