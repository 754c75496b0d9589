"""Shipping a fine-tune (``export-journal`` / ``apply-journal``), ``merge`` and ``eval`` in the
run's dtype (issue 25), and shipped journals that are complete or refused (issue 29 item 4).

Tiny LLaMA, OPT and GPT-2 models built from configs with a word-level tokenizer; every command
runs through the CLI in this process. docs/reliability.md, "Shipped journals" and "The run's
dtype", lists these tests with the rules they check."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib

import pytest
import torch
from archs import save_word_tokenizer
from safetensors.torch import load_file
from test_cli import WORDS, make_tiny_model, make_tiny_task, tiny_args

from zoengine import journal as J
from zoengine.cli import main
from zoengine.optim.journal_file import Layout

torch.set_num_threads(1)


def _make_model(folder: str, arch: str) -> str:
    """A tiny model folder (fp32 weights on disk) of ``arch``: llama, opt or gpt2."""
    if arch == "llama":
        return make_tiny_model(folder)
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 2}
    if arch == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=len(WORDS), hidden_size=32, ffn_dim=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=256, word_embed_proj_dim=32,
                                         **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2,
                                           n_head=4, n_positions=256, **ids))
    model.save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("shipping")
    txt = d / "lm.txt"
    txt.write_text("\n\n".join(f"the movie is good {i}. i love this day and the flight."
                               for i in range(120)))
    return {"task": make_tiny_task(str(d / "task.csv")), "lm": str(txt),
            **{arch: _make_model(str(d / arch), arch) for arch in ("llama", "opt", "gpt2")}}


def _tensors(path) -> dict:
    path = str(path)
    if path.endswith(".safetensors"):
        return load_file(path)
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def _bit_identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a)


def _train(models, arch, out, *extra):
    tiny = {"model": models[arch], "task": models["task"]}
    return main(tiny_args(tiny, out, "--steps", "3", "--batch-size", "2", "--eval-limit", "4",
                          *extra))


WEIGHTS = {"full": "model", "norms": "model", "head": "head.safetensors", "lora": "adapter"}


# ---- issue 25: the run's dtype -----------------------------------------------------------------

@pytest.mark.parametrize("arch, dtype, mode", [
    ("llama", "bfloat16", "full"), ("llama", "float16", "full"),  # float32: test_the_intact_…
    ("llama", "bfloat16", "head"), ("llama", "bfloat16", "norms"),
    ("opt", "float32", "full"), ("opt", "bfloat16", "full"), ("opt", "bfloat16", "lora"),
    ("gpt2", "bfloat16", "full"), ("gpt2", "float16", "head"),
])
def test_a_run_exported_and_applied_rebuilds_its_weights_in_its_dtype(models, tmp_path, capsys,
                                                                      arch, dtype, mode):
    """The base is stored fp32; a bf16/fp16 run loaded it in its --dtype, and apply-journal
    does too: the rebuilt weights equal the run's bit for bit, dtype included (before: 'SHA-256
    differs', exit 2). A head trains fp32 rows taken from the base in the run's dtype."""
    run = tmp_path / "run"
    assert _train(models, arch, run, "--train", mode, "--dtype", dtype, "--lr", "0.01") == 0
    shipped = tmp_path / "shipped.zoj"
    assert main(["export-journal", str(run), str(shipped)]) == 0
    rebuilt = tmp_path / "rebuilt"
    capsys.readouterr()
    assert main(["apply-journal", models[arch], str(shipped), str(rebuilt)]) == 0, \
        capsys.readouterr().err
    assert f"({dtype})" in capsys.readouterr().out
    want, got = _tensors(run / WEIGHTS[mode]), _tensors(rebuilt / WEIGHTS[mode])
    assert _bit_identical(got, want)
    if mode in ("full", "norms"):
        assert {str(t.dtype) for t in got.values()} == {f"torch.{dtype}"}


@pytest.mark.parametrize("arch, dtype", [("opt", "bfloat16"), ("llama", "float32")])
def test_merge_writes_the_runs_dtype(models, tmp_path, capsys, arch, dtype):
    """`zoengine merge` loads the base in the run's dtype and writes that dtype (before: a
    bf16 run was merged and written in fp32)."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert main(["train", "--model", models[arch], "--task", models["lm"], "--lora",
                 "--steps", "3", "--batch-size", "2", "--block-size", "8", "--eval-limit", "2",
                 "--lr", "0.5", "--eps", "0.05", "--dtype", dtype, "--output-dir", str(run),
                 "--no-progress"]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", str(run), str(merged)]) == 0, capsys.readouterr().err
    got = _tensors(merged)
    assert {str(t.dtype) for t in got.values() if t.is_floating_point()} == {f"torch.{dtype}"}
    base = AutoModelForCausalLM.from_pretrained(models[arch], dtype=getattr(torch, dtype))
    base = {k: v.detach() for k, v in base.state_dict().items()}
    targets = [k for k in got if "q_proj.weight" in k or "v_proj.weight" in k]
    others = [k for k in got if k not in targets and k in base]
    assert targets and others
    assert any(not torch.equal(got[k], base[k]) for k in targets)  # the adapter is merged in
    assert all(torch.equal(got[k], base[k]) for k in others)  # the rest is the base, as loaded


def test_eval_of_a_run_folder_uses_its_dtype_unless_told(models, tmp_path, capsys):
    """`zoengine eval --weights RUN` scores in the run's dtype: its LM loss is the run's own
    held-out loss exactly; `--dtype float32` overrides (another loss); a bad --dtype is exit 2."""
    run = tmp_path / "run"
    assert main(["train", "--model", models["opt"], "--task", models["lm"], "--train", "full",
                 "--steps", "2", "--batch-size", "2", "--block-size", "8", "--dtype",
                 "bfloat16", "--output-dir", str(run), "--no-progress"]) == 0
    after = json.loads((run / "metrics.json").read_text())["after"]["test"]
    capsys.readouterr()

    def evaluate(*extra):
        assert main(["eval", "--model", models["opt"], "--task", models["lm"], "--weights",
                     str(run), "--block-size", "8", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    res = evaluate()
    assert res["dtype"] == "bfloat16" and res["loss"] == after["loss"], (res, after)
    forced = evaluate("--dtype", "float32")
    assert forced["dtype"] == "float32" and forced["loss"] != after["loss"]
    assert main(["eval", "--model", models["opt"], "--task", models["lm"], "--weights",
                 str(run), "--dtype", "int8"]) == 2
    assert "--dtype" in capsys.readouterr().err


# ---- issue 29 item 4: a shipped journal is complete or refused ---------------------------------

@pytest.fixture(scope="module")
def shipped(models, tmp_path_factory):
    """A 4-step full run of the tiny LLaMA, its live journal and its shipped journal."""
    d = tmp_path_factory.mktemp("damage")
    assert _train(models, "llama", d / "run", "--train", "full", "--steps", "4") == 0
    assert main(["export-journal", str(d / "run"), str(d / "shipped.zoj")]) == 0
    header, start = J.read_header(str(d / "run" / "journal.zoj"))
    return {"dir": d, "data": (d / "shipped.zoj").read_bytes(), "start": start,
            "size": Layout(header).size, "live": (d / "run" / "journal.zoj").read_bytes()}


def _damaged(s, kind: str) -> bytes:
    data, start, size = bytearray(s["data"]), s["start"], s["size"]
    end = len(data) - J.TRAILER_SIZE  # the records end here
    assert (end - start) % size == 0 and (end - start) // size == 4

    def flip(i):
        data[i] ^= 0x10
        return bytes(data)
    if kind == "flip-last-record":
        return flip(end - size // 2)
    if kind == "flip-middle-record":
        return flip(start + size + size // 2)
    if kind == "flip-header":
        return flip(start // 2)
    if kind == "truncate-mid-record":
        return bytes(data[:end - size // 2])
    if kind == "truncate-at-record-boundary":
        return bytes(data[:end - size])
    if kind == "header-only":
        return bytes(data[:start])
    if kind == "empty":
        return b""
    if kind == "live-journal":
        return s["live"]
    if kind == "drop-last-record-keep-trailer":  # cut out of the middle, trailer kept
        return bytes(data[:end - size] + data[end:])
    if kind == "flip-trailer-count":
        return flip(end + len(J.SHIPPED_MAGIC))
    if kind == "forged-count":  # a consistent trailer (CRC redone) with a wrong count
        fields = bytearray(data[end:-4])
        struct.pack_into("<Q", fields, len(J.SHIPPED_MAGIC), 5)
        return bytes(data[:end] + fields + struct.pack("<I", zlib.crc32(bytes(fields))))
    if kind == "bytes-after-trailer":
        return bytes(data) + b"\0"
    raise AssertionError(kind)


DAMAGE = {  # kind -> words the refusal must contain
    "flip-last-record": "SHA-256",
    "flip-middle-record": "SHA-256",
    "flip-header": "SHA-256",
    "truncate-mid-record": "bytes into a record",
    "truncate-at-record-boundary": "truncated at a record boundary",
    "header-only": "only a journal header",
    "empty": "empty",
    "live-journal": "no trailer",
    "drop-last-record-keep-trailer": "bytes were cut out or added",
    "flip-trailer-count": "trailer",
    "forged-count": "trailer counts 5",
    "bytes-after-trailer": "no trailer",
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_shipped_journal_is_refused(models, shipped, tmp_path, capsys, kind):
    """Each damage exits 2 before any weight is written, naming the file and what is wrong
    (before: a damaged last record was dropped as 'torn', a cut at a record boundary and a
    header-only file were applied: exit 0, wrong weights)."""
    bad = tmp_path / f"{kind}.zoj"
    bad.write_bytes(_damaged(shipped, kind))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["apply-journal", models["llama"], str(bad), str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and DAMAGE[kind] in err and "Traceback" not in err, err
    assert not out.exists()
    with pytest.raises(J.JournalError):  # the Python reader of shipped journals agrees
        J.read_shipped(str(bad))


def test_the_intact_shipped_journal_applies_and_reads_as_before(models, shipped, tmp_path):
    """The undamaged file (the control of the test above) applies and equals the run; its
    records are the live journal's; an older reader sees the trailer as a torn tail."""
    path = shipped["dir"] / "shipped.zoj"
    assert main(["apply-journal", models["llama"], str(path), str(tmp_path / "r")]) == 0
    assert _bit_identical(_tensors(tmp_path / "r" / "model"),
                          _tensors(shipped["dir"] / "run" / "model"))
    header, records = J.read_shipped(str(path))
    _, live, torn = J.read_records(str(shipped["dir"] / "run" / "journal.zoj"))
    assert records == live and len(records) == 4 and torn == 0
    _, old_view, tail = J.read_records(str(path))  # what zoengine before the trailer reads
    assert old_view == records and tail == J.TRAILER_SIZE
    assert path.read_bytes()[:-J.TRAILER_SIZE] == shipped["live"]


def test_apply_in_place_of_a_run_folders_own_journal(models, shipped, tmp_path, capsys):
    """A run folder's journal.zoj, verified by its manifest, is accepted in place (a live
    journal: it ends where the run stopped); a copy elsewhere is refused ('live-journal')."""
    run = shipped["dir"] / "run"
    assert main(["apply-journal", models["llama"], str(run / "journal.zoj"),
                 str(tmp_path / "rebuilt")]) == 0, capsys.readouterr().err
    assert _bit_identical(_tensors(tmp_path / "rebuilt" / "model"), _tensors(run / "model"))


def test_another_base_is_refused_naming_the_dtypes_tried(models, shipped, tmp_path, capsys):
    capsys.readouterr()
    assert main(["apply-journal", models["opt"], str(shipped["dir"] / "shipped.zoj"),
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "base" in err and "float32" in err and "starting weights" in err, err
    assert not (tmp_path / "x").exists()


def test_export_drops_a_torn_tail_and_refuses_an_empty_journal(tmp_path):
    """A live journal may end torn: export ships its whole records only. A journal with no
    step is not shipped (applying it would rebuild the base)."""
    from helpers import regression_batch, tiny_mlp

    import zoengine

    model = tiny_mlp(0)
    opt = zoengine.MeZO(list(model.named_parameters()), lr=1e-2, eps=1e-3, seed=1)
    journal = tmp_path / "run.zoj"
    opt.set_journal(str(journal))
    for t in range(3):
        x, y = regression_batch(seed=t)
        opt.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
    opt.close_journal()
    empty = tmp_path / "empty.zoj"
    empty.write_bytes(journal.read_bytes()[:J.read_header(str(journal))[1]])
    with pytest.raises(J.JournalError, match="no steps"):
        J.shipped_bytes(str(empty))
    live = tmp_path / "live.zoj"
    shutil.copy(journal, live)
    with open(live, "ab") as f:
        f.write(b"\1" * 10)  # a torn record
    data, count = J.shipped_bytes(str(live))
    assert count == 3
    out = tmp_path / "out.zoj"
    out.write_bytes(data)
    assert J.read_shipped(str(out))[1] == J.read_records(str(journal))[1]
    assert J.shipped_bytes(str(out)) == (data, 3)  # shipping a shipped journal: the same bytes
