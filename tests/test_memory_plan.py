"""The memory planner: sizes, choices, refusals, and its activation model against measured RSS."""

import json
import os
import subprocess
import sys

import pytest

from zoengine.sparsity import memory as M

SMOL = {"hidden_size": 576, "intermediate_size": 1536, "vocab_size": 49152,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "tie_word_embeddings": True}


def test_parse_size():
    assert M.parse_size("2GiB") == 2 * 2**30
    assert M.parse_size("1.5G") == int(1.5 * 2**30)
    assert M.parse_size("800 MiB") == 800 * 2**20
    assert M.parse_size("4GB") == 4 * 10**9
    assert M.parse_size(12345) == 12345
    for bad in ("lots", "-1G", "2 parsecs", 0, "", True):
        with pytest.raises(ValueError, match="max_memory="):
            M.parse_size(bad)


def test_config_shape_counts_smollm2_parameters():
    shape = M.ModelShape.of(SMOL)
    assert abs(shape.params - 134_515_008) / 134_515_008 < 0.01  # SmolLM2-135M


def test_refuses_impossible_budget_naming_budget_and_smallest_fit():
    with pytest.raises(M.MemoryBudgetError) as err:
        M.plan(SMOL, "300MiB", "mezo", batch_size=8, seq_len=128)
    msg = str(err.value)
    assert "max_memory=300MiB" in msg and "300.00 MiB" in msg
    small = err.value.smallest
    assert (small.batch_size, small.seq_len, small.dtype) == (1, 32, "bfloat16")
    assert "batch 1, seq 32, bfloat16" in msg and M.fmt_size(small.predicted) in msg
    # ... and that smallest configuration is accepted by a budget of exactly its size
    ok = M.plan(SMOL, small.predicted, "mezo", batch_size=8, seq_len=128)
    assert ok.predicted <= small.predicted


def test_shrinks_batch_first_then_sequence_then_dtype():
    big = M.plan(SMOL, "64GiB", "mezo", batch_size=16, seq_len=256)
    assert (big.batch_size, big.seq_len, big.dtype) == (16, 256, "float32")
    need_b4 = M.predict(SMOL, "mezo", 4, 256, "float32").predicted
    p = M.plan(SMOL, need_b4, "mezo", batch_size=16, seq_len=256)
    assert (p.batch_size, p.seq_len, p.dtype) == (4, 256, "float32")
    assert M.predict(SMOL, "mezo", 8, 256, "float32").predicted > need_b4
    assert p.fits and "predicted peak" in str(p)


def test_method_extras():
    base = M.predict(SMOL, "mezo", 4, 128)
    dizo = M.predict(SMOL, "dizo", 4, 128)
    pezo = M.predict(SMOL, "pezo", 4, 128, pool_size=1 << 20)
    masked = M.predict(SMOL, "mezo", 4, 128, masks=True)
    shape = M.ModelShape.of(SMOL)
    assert dizo.breakdown["dizo_anchors"] == 30 * 2 * 576 * 192 * 4
    assert pezo.breakdown["pezo_pool"] == 4 << 20
    assert masked.breakdown["masks"] == (shape.masked + 7) // 8 + 3 * shape.largest_masked
    assert base.predicted < masked.predicted < 1.1 * base.predicted  # bits: a few % at most
    adam = M.predict(SMOL, "adam", 4, 128)
    assert adam.predicted > 2 * base.predicted
    with pytest.raises(ValueError, match="method="):
        M.predict(SMOL, "sgd")


_WORKER = r"""
import json, sys, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from zoengine.sparsity import memory
V, D, I, B, T = map(int, sys.argv[1:6])
cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
torch.manual_seed(0)
m = LlamaForCausalLM(cfg).eval()
with torch.no_grad():
    x = torch.randint(0, V, (1, 8)); m(input_ids=x, labels=x)  # lazy initialisation
rss = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])
before = rss() * 1024
memory.reset_peak()
x = torch.randint(0, V, (B, T))
with torch.no_grad():
    m(input_ids=x, labels=x).loss
print(json.dumps({"before": before, "peak": memory.peak_memory(),
                  "pred": memory.predict(m, "inference", B, T).__dict__}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dims", [(8000, 256, 1024, 4, 256),  # logits dominate
                                  (512, 512, 2048, 8, 256)],  # decoder blocks dominate
                         ids=["logits", "blocks"])
def test_activation_model_matches_measured_rss(dims, tmp_path):
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "-c", _WORKER, *map(str, dims)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    act_measured = r["peak"] - r["before"]
    act_pred = r["pred"]["breakdown"]["activations"]
    # measured spread of glibc RSS over repeated runs: 0.7x-1.2x of the prediction
    assert 0.6 * act_pred <= act_measured <= 1.35 * act_pred, (act_measured, act_pred)
    total_pred = r["pred"]["predicted"]
    assert abs(r["peak"] - total_pred) <= 0.2 * total_pred, (r["peak"], total_pred)


def test_resident_runtime_excludes_the_model():
    import torch

    from zoengine.sparsity.memory import resident_runtime

    small = torch.nn.Linear(4, 4)
    big = torch.nn.Linear(2048, 4096)  # 32 MiB of fp32 weights
    base = resident_runtime(small)
    if base is None:
        pytest.skip("no /proc/self/statm on this platform")
    assert base > 50 * 2**20  # at least the interpreter and torch
    # both models are resident; only the one passed is subtracted, so the difference is its size
    big_bytes = sum(p.numel() * 4 for p in big.parameters())
    diff = resident_runtime(small) - resident_runtime(big)
    assert abs(diff - big_bytes) < 4 * 2**20
