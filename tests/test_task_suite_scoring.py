"""Suite scoring on a tiny random LLaMA (tests/archs.py, a word-level tokenizer): candidates'
length-normalised log-likelihoods, the training losses and batched greedy decoding equal
unbatched float64 recomputations; scoring runs under torch.inference_mode; long prompts keep
their end (and a BOS token) as MeZO truncates them."""

from __future__ import annotations

import math

import pytest
import torch
from test_task_suite import ROWS

from zoengine.tasks.suite import get_task, greedy_answers, predict
from zoengine.tasks.suite.encoding import (
    encode_candidates,
    encode_prompt,
    encode_target,
    truncate,
)
from zoengine.tasks.suite.scoring import (
    candidate_scores,
    classification_loss,
    stop_ids,
    target_loss,
)

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    import archs
    from transformers import PreTrainedTokenizerFast

    folder = str(tmp_path_factory.mktemp("tok"))
    archs.save_word_tokenizer(folder, archs.VOCAB)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    model = archs.build("llama", seed=1)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model, tok


def _samples(task, n=6):
    spec = get_task(task)
    return spec, [spec.build(ROWS[task](i)) for i in range(n)]


def _ref_logp(model, ids: list[int]) -> torch.Tensor:
    """float64 log-probabilities of tokens 1.. of one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _bound(model, ids) -> float:
    """float32 scoring error bound for one sequence: the logits come out of a float32 forward
    (padding changes the summation order) and the log-softmax sums V exponentials; allow 256
    roundings of the largest magnitude involved (|logit| + log V)."""
    with torch.no_grad():
        big = model(input_ids=torch.tensor([ids])).logits.abs().max().item()
    return 256 * EPS32 * (big + math.log(model.config.vocab_size))


@pytest.mark.parametrize("task", ["sst2", "cb", "copa", "record"])
def test_candidate_scores_equal_float64_mean_over_option_tokens(lm, task):
    model, tok = lm
    spec, samples = _samples(task)
    got = candidate_scores(model, tok, spec, samples, max_length=64, batch_size=4)
    for s, scores in zip(samples, got):
        encs = encode_candidates(tok, spec, s, 64)
        assert len(scores) == len(s.candidates) == len(encs)
        n_prompt = len(tok.encode(spec.encode(s).strip(" ")))
        for c, e, v in zip(s.candidates, encs, scores):
            opt = len(tok.encode(spec.verbalize(s, c).strip(" "))) - n_prompt
            assert e.option_len == max(1, opt)  # MeZO's option length
            ref = _ref_logp(model, e.ids)[-e.option_len:].mean().item()
            assert abs(v - ref) <= _bound(model, e.ids), (task, c)
    preds = predict(model, tok, spec, samples, max_length=64, batch_size=4)
    assert preds == [max(range(len(s)), key=s.__getitem__) for s in got]


def test_training_losses_equal_float64_recomputation(lm):
    model, tok = lm
    spec, samples = _samples("rte", 5)
    with torch.no_grad():
        got = classification_loss(model, tok, spec, samples, 64).item()
    ces, bound = [], 0.0
    for s in samples:
        encs = encode_candidates(tok, spec, s, 64)
        sc = torch.stack([_ref_logp(model, e.ids)[-e.option_len:].mean() for e in encs])
        ces.append(-torch.log_softmax(sc, 0)[s.gold[0]].item())
        bound = max(bound, *(_bound(model, e.ids) for e in encs))
    # the cross-entropy moves by at most twice the largest score error
    assert abs(got - sum(ces) / len(ces)) <= 2 * bound
    spec, samples = _samples("squad", 5)
    with torch.no_grad():
        got = target_loss(model, tok, spec, samples, 64).item()
    nll, count, bound = 0.0, 0, 0.0
    for s in samples:
        e = encode_target(tok, spec, s, 64)
        assert e.ids == tok.encode(f"{spec.encode(s).strip()} {s.gold[0]}")[-len(e.ids):]
        nll -= _ref_logp(model, e.ids)[-e.option_len:].sum().item()
        count += e.option_len
        bound = max(bound, _bound(model, e.ids))
    assert abs(got - nll / count) <= bound


def _greedy_ref(model, ids, stops, n):
    out = []
    for _ in range(n):
        with torch.no_grad():
            t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if t in stops:
            break
        out.append(t)
    return out


def test_batched_greedy_decoding_equals_unbatched_loop(lm):
    model, tok = lm
    model = model.double()  # ties closer than float64 rounding are the only way to differ
    try:
        spec, samples = _samples("drop", 6)
        prompts = [encode_prompt(tok, spec, s, 64, max_new_tokens=8)[-(4 + i):]
                   for i, s in enumerate(samples)]  # six lengths: left padding in the batch
        got = greedy_answers(model, tok, prompts, batch_size=3, max_new_tokens=8)
        stops = stop_ids(tok)
        want = [tok.decode(_greedy_ref(model, p, stops, 8), skip_special_tokens=True).strip()
                for p in prompts]
        assert got == want and any(got)
    finally:
        model.float()


def test_scoring_runs_under_inference_mode(lm):
    model, tok = lm
    seen = []
    h = model.register_forward_hook(lambda *a: seen.append(torch.is_inference_mode_enabled()))
    try:
        spec, samples = _samples("wic", 2)
        candidate_scores(model, tok, spec, samples, max_length=64, batch_size=8)
        spec, samples = _samples("squad", 1)
        predict(model, tok, spec, samples, max_length=60, batch_size=8)
    finally:
        h.remove()
    assert seen and all(seen)


class _Tok:
    add_bos_token, eos_token_id = True, 2

    def encode(self, text, add_special_tokens=True):
        return [5, 7] if text == "\n" else []


def test_truncation_keeps_the_end_and_bos_and_room_for_answers(lm):
    assert truncate(_Tok(), [1, 10, 11, 12, 13], 3) == [1, 12, 13]
    _, tok = lm
    assert truncate(tok, [1, 10, 11, 12, 13], 3) == [11, 12, 13]  # no BOS token added
    assert stop_ids(_Tok()) == [7, 2]  # a newline's last token, then EOS (MeZO's stops)
    spec, samples = _samples("squad", 1)
    assert len(encode_prompt(tok, spec, samples[0], 55)) <= 5  # 50 new tokens' room
    with pytest.raises(ValueError, match="--max-length"):
        encode_prompt(tok, spec, samples[0], 50)
