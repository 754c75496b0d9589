"""`zoengine train | eval`: bad input exits 2 naming the flag; runs write complete outputs only.

Most tests use a tiny LLaMA built from a config with a word-level tokenizer (milliseconds per
forward); one test runs the real SmolLM2 for a few steps.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess

import pytest
import torch

from zoengine.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("<pad> <unk> <eos> tweet : sentiment negative positive neutral good bad great terrible "
         "love hate the a is i it this movie day flight").split()


def make_tiny_model(folder: str, *, layers: int = 2, hidden: int = 32) -> str:
    """A tiny LlamaForCausalLM + word-level tokenizer saved as a local HF model folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<eos>")
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
                      eos_token_id=2, bos_token_id=2)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_task(path: str, n: int = 60) -> str:
    """A CSV with text/label columns: 'good/great/love' tweets positive, 'bad/hate' negative."""
    pos, neg = ["good", "great", "love"], ["bad", "terrible", "hate"]
    fill = ["the movie", "this day", "a flight", "it is", "i", "the day is"]
    rows = []
    for i in range(n):
        w = (pos if i % 2 else neg)[i % 3]
        rows.append({"text": f"{fill[i % 6]} {w} {fill[(i // 6) % 6]} {i}",
                     "label": "positive" if i % 2 else "negative"})
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["text", "label"])
        wr.writeheader()
        wr.writerows(rows)
    return path


def tiny_args(tiny, out, *extra):
    return ["train", "--model", tiny["model"], "--task", tiny["task"], "--options",
            "negative,positive", "--template", "Tweet: {text} Sentiment:", "--output-dir",
            str(out), "--no-progress", *extra]


# ---- bad input: exit 2, the flag named, no traceback ------------------------------------------

@pytest.mark.parametrize("extra, flag", [
    (["--method", "adamw"], "--method"),
    (["--steps", "-3"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--lr", "nan"], "--lr"),
    (["--eps", "0"], "--eps"),
    (["--batch-size", "x"], "--batch-size"),
    (["--train", "everything"], "--train"),
    (["--text-column", "tweet"], "--text-column"),
    (["--label-column", "y"], "--label-column"),
    (["--template", "no placeholder"], "--template"),
])
def test_bad_input_exits_2_naming_the_flag(tiny, tmp_path, capsys, extra, flag):
    rc = main(tiny_args(tiny, tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert flag in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out" / "metrics.json")


def test_missing_model_path_and_task(tmp_path, capsys):
    assert main(["train", "--model", str(tmp_path / "nope")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["train", "--task", str(tmp_path / "nope.csv")]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["train", "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err


def test_config_file_errors(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"steps": 5, "colour": "red"}))
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "colour" in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_hwsim_and_methods(capsys):
    from zoengine.optim import available_methods

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()  # name, class(fixed options), what it is
    assert [ln.split()[0] for ln in lines] == list(available_methods())
    assert "ZO(update='adam')" in next(ln for ln in lines if ln.startswith("zo-adam "))
    assert main(["hwsim", "--help"]) == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_subprocess_error_has_no_traceback(forkserver, tmp_path):
    # `python -m zoengine train --steps -1` forked from the fork server (conftest.forkserver);
    # tests/test_import.py and tests/test_root_path.py run `python -m zoengine` from scratch
    r = forkserver.run(["train", "--steps", "-1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "--steps" in r.stderr and "Traceback" not in r.stderr


# ---- runs on the tiny model -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["head", "full", "lora"])
def test_train_tiny_writes_outputs(tiny, tmp_path, mode):
    out = tmp_path / mode
    extra = ["--lora"] if mode == "lora" else ["--train", mode]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 6\nbatch-size: 4\nseed: 1\neval_every: 3\n")
    assert main(tiny_args(tiny, out, "--config", str(cfg), *extra)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["steps"] == 6 and m["config"]["batch_size"] == 4
    for when in ("before", "after"):
        assert {"accuracy", "auc", "calibrated_accuracy"} <= set(m[when]["test"])
    assert len(m["curve"]["loss"]) == 6
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    weights = {"head": "head.safetensors", "full": "model/model.safetensors",
               "lora": "adapter/adapter_model.safetensors"}[mode]
    assert (out / weights).exists()
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    # zoengine eval reads the output folder back
    assert main(["eval", "--model", tiny["model"], "--task", tiny["task"], "--options",
                 "negative,positive", "--template", "Tweet: {text} Sentiment:",
                 "--weights", str(out)]) == 0


def test_train_lm_text_file(tiny, tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(f"the movie is good {i}. i love this day." for i in range(60)))
    out = tmp_path / "lm"
    assert main(["train", "--model", tiny["model"], "--task", str(txt), "--steps", "3",
                 "--batch-size", "2", "--block-size", "8", "--output-dir", str(out),
                 "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["train"] == "lora" and "perplexity" in m["after"]["test"]


def test_interrupted_run_leaves_no_half_written_files(forkserver, tiny, tmp_path):
    """SIGINT mid-training: no metrics/curve/weights, no temp files; a rerun then succeeds.

    The signal is sent when the run prints LOOP_STARTED (an explicit event), never after a
    guessed delay: a sleep passes on an idle machine and fails on a loaded one."""
    from zoengine.run import LOOP_STARTED

    out = tmp_path / "intr"
    # a shell's background job (`cmd &`, nohup) starts with SIGINT ignored and Python keeps
    # it so; the child restores Ctrl-C as a terminal gives it (this test hung 120 s under `&`)
    code = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1); "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from zoengine.cli import main; sys.exit(main(sys.argv[1:]))")
    args = tiny_args(tiny, out, "--train", "head", "--steps", "2000000", "--batch-size", "4")
    # `python -u -c code ARGS`, forked from the fork server (conftest.forkserver: a separate
    # process without the ~8 CPU-s of imports)
    p = forkserver.popen(args, code=code, unbuffered=True, cwd=tmp_path, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    for line in p.stdout:  # blocks until the child prints; the child flushes every line
        seen.append(line)
        if LOOP_STARTED in line:
            break
    else:
        p.wait(timeout=60)
        pytest.fail(f"the run ended (rc {p.returncode}) without starting its loop: {seen}")
    p.send_signal(signal.SIGINT)
    try:
        log, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # seen once in a fresh clone: keep where it hung
        p.send_signal(signal.SIGUSR1)  # faulthandler prints every thread's stack, runs on
        try:
            log, _ = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            log, _ = p.communicate()
        pytest.fail("no exit within 120 s of SIGINT; output and stacks:\n" + "".join(seen)
                    + (log or "")[-6000:])
    log = "".join(seen) + log
    assert p.returncode == 130, log
    assert "Traceback" not in log and "interrupted" in log
    left = set(os.listdir(out))
    assert not left & {"metrics.json", "curve.png", "head.safetensors"}, left
    assert not [n for n in left if ".tmp-" in n], left
    # a fresh run over the interrupted one is refused (when the signal came before the first
    # step committed, nothing was trained and a fresh run would take the folder over:
    # tests/test_edges.py); --resume completes it
    from zoengine.run.resume import steps_done

    if steps_done(str(out)) > 0:
        assert main(tiny_args(tiny, out, "--train", "head", "--steps", "3")) == 2
    assert main(["train", "--resume", str(out), "--steps", "40", "--no-progress"]) == 0
    assert (out / "metrics.json").exists()


# ---- the real model ---------------------------------------------------------------------------

def _real_model_reason():
    from zoengine.models import default_model_available

    return default_model_available()


# slow (real model, ~40 s) but run by default: the one real-model CLI test CI always runs
@pytest.mark.slow
@pytest.mark.skipif(_real_model_reason() is not None, reason=str(_real_model_reason()))
def test_default_model_few_head_steps(tmp_path, capsys):
    """The embedded default job's path end to end, shortened (few prompts, few steps)."""
    out = tmp_path / "real"
    rc = main(["train", "--steps", "30", "--train-examples", "16", "--eval-limit", "24", "--output-dir", str(out),
               "--no-progress", "--threads", "1"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["model"] == "smollm2-135m" and m["config"]["train"] == "head"
    assert m["trainable_params"] == 2 * 576
    assert 0.0 <= m["after"]["test"]["auc"] <= 1.0
    assert "dev-calibrated zero-shot" in capsys.readouterr().out


def test_option_scores_match_unpadded_mean_loglik(tiny):
    """Padded, batched option scoring == mean token log-prob of each option, one row at a time
    (multi-token options take the general path, single-token ones the fast path)."""
    import torch

    from zoengine.run import load_model
    from zoengine.tasks import OptionScorer

    model, tok = load_model(tiny["model"])
    prompts = [tok("the movie is")["input_ids"], tok("i love this flight day")["input_ids"]]
    for options in ([" bad movie", " good day is"], [" negative", " positive"]):
        sc = OptionScorer(tok, options)
        assert sc.single_token == (options[0] == " negative")
        got = sc.score_all(model, prompts, batch_size=2)
        for i, p in enumerate(prompts):
            for k, o in enumerate(sc.option_ids):
                ids = torch.tensor([p + o])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                want = torch.stack([logp[len(p) - 1 + j, t] for j, t in enumerate(o)]).mean()
                assert torch.allclose(got[i, k], want, atol=1e-4), (options, i, k)


# ---- pruned models: --prune / --keep-zeros / --max-memory -------------------------------------

def test_train_full_with_prune_keeps_the_sparsity(tiny, tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(f"the movie is good {i}. i love this day." for i in range(60)))
    out = tmp_path / "pruned"
    assert main(["train", "--model", tiny["model"], "--task", str(txt), "--train", "full",
                 "--prune", "magnitude:2:4", "--steps", "3", "--batch-size", "2",
                 "--block-size", "8", "--max-memory", "8GiB", "--output-dir", str(out),
                 "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["sparsity_after"]["sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert m["memory"]["measured_peak_bytes"] > 0 and m["memory"]["budget_bytes"] == 8 * 2**30


def test_full_run_keeps_no_bool_masks_after_setup(tiny, tmp_path):
    """The optimizer holds the masks as bits; setup hands the run only their names."""
    from zoengine.run.config import RunConfig
    from zoengine.run.job import resolve, setup

    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(f"the movie is good {i}. i love this day." for i in range(60)))
    cfg, task = resolve(RunConfig(model=tiny["model"], task=str(txt), train="full",
                                  prune="magnitude", steps=1, block_size=8))
    _, _, masks, _, _, opt = setup(cfg, task, {"timing": {}})
    assert masks and all(v is None for v in masks.values())
    bits = [s["mask_bits"] for s in opt.state.values() if "mask_bits" in s]
    assert len(bits) == len(masks) and all(b.dtype == torch.uint8 for b in bits)


@pytest.mark.parametrize("extra, flag", [
    (["--prune", "random"], "--prune"),
    (["--prune", "wanda:3:4x"], "--prune"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--prune-sparsity", "2"], "--prune-sparsity"),
    (["--train", "head", "--prune", "magnitude"], "--prune"),
    (["--train", "full", "--max-memory", "1KiB"], "--max-memory"),
])
def test_sparsity_and_budget_errors_exit_2(tiny, tmp_path, capsys, extra, flag):
    rc = main(tiny_args(tiny, tmp_path / "out", "--steps", "2", *extra))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert flag in err and "Traceback" not in err
