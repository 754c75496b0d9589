"""Scoring suite samples with a causal LM, batched (left padding, ``length_batches`` from
``zoengine.tasks.scoring``):

- classification and multiple choice: each candidate's mean log-probability over its option
  tokens (MeZO's default, length-normalised: ``log_probs.mean()``), the prediction its argmax;
- generation: greedy decoding of up to 50 new tokens, stopped at a newline or the EOS token,
  decoded without special tokens and stripped (MeZO's run.py ``forward(generation=True)``);
- the training losses: cross-entropy over the candidates' mean log-probabilities
  (classification, MeZO's ``train_as_classification``) and the mean negative log-likelihood of
  the correct candidate's option tokens (multiple choice and generation, MeZO's
  ``only_train_option`` teacher forcing).

Evaluation runs under ``torch.inference_mode``; the losses run under the optimizer's
``no_grad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoengine.tasks.scoring import _last_logits, left_pad, length_batches
from zoengine.tasks.suite.encoding import (
    MAX_NEW_TOKENS,
    Encoded,
    encode_candidates,
    encode_prompt,
    encode_target,
)
from zoengine.tasks.suite.registry import Sample, TaskSpec


def pad_id_of(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def option_token_logprobs(model, seqs: list[Encoded], pad_id: int):
    """(log-probabilities of each sequence's last ``option_len`` tokens, their mask): two
    (n, m) tensors, m the longest option; the log-softmax is taken in float32."""
    ids, mask = left_pad([s.ids for s in seqs], pad_id)
    m = max(s.option_len for s in seqs)
    logits = _last_logits(model, ids, mask, m + 1)[:, :m].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, -m:].unsqueeze(-1)).squeeze(-1)
    lens = torch.tensor([s.option_len for s in seqs])
    keep = torch.arange(m).unsqueeze(0) >= (m - lens).unsqueeze(1)
    return logp.masked_fill(~keep, 0.0), keep


def mean_option_logprob(model, seqs: list[Encoded], pad_id: int) -> torch.Tensor:
    """Each sequence's mean log-probability over its option tokens: (n,)."""
    logp, keep = option_token_logprobs(model, seqs, pad_id)
    return logp.sum(1) / keep.sum(1)


@torch.inference_mode()
def candidate_scores(model, tok, spec: TaskSpec, samples: list[Sample], *, max_length: int,
                     batch_size: int) -> list[list[float]]:
    """Every candidate's length-normalised log-likelihood, per sample, batched over all
    (sample, candidate) sequences of similar length."""
    flat, owner = [], []
    for i, s in enumerate(samples):
        enc = encode_candidates(tok, spec, s, max_length)
        flat += enc
        owner += [i] * len(enc)
    out = torch.empty(len(flat), dtype=torch.float64)
    pad = pad_id_of(tok)
    for b in length_batches([e.ids for e in flat], batch_size):
        out[b] = mean_option_logprob(model, [flat[i] for i in b], pad).double()
    scores: list[list[float]] = [[] for _ in samples]
    for i, v in zip(owner, out.tolist()):
        scores[i].append(v)
    return scores


def stop_ids(tok) -> list[int]:
    """MeZO's stop tokens: the last token of a newline, and the EOS token."""
    out = []
    nl = tok.encode("\n", add_special_tokens=False)
    if nl:
        out.append(nl[-1])
    if tok.eos_token_id is not None and tok.eos_token_id not in out:
        out.append(tok.eos_token_id)
    return out


def _until_stop(row: list[int], stops: list[int]) -> list[int]:
    for j, t in enumerate(row):
        if t in stops:
            return row[:j]
    return row


@torch.inference_mode()
def greedy_answers(model, tok, prompts: list[list[int]], *, batch_size: int,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids), cut at the first stop token, decoded
    without special tokens and stripped."""
    stops, pad = stop_ids(tok), pad_id_of(tok)
    out: list[str] = [""] * len(prompts)
    for b in length_batches(prompts, batch_size):
        ids, mask = left_pad([prompts[i] for i in b], pad)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                             pad_token_id=pad)
        for row, i in zip(gen[:, ids.shape[1]:].tolist(), b):
            out[i] = tok.decode(_until_stop(row, stops), skip_special_tokens=True).strip()
    return out


def predict(model, tok, spec: TaskSpec, samples: list[Sample], *, max_length: int,
            batch_size: int) -> list:
    """The model's answer per sample: the argmax candidate's index (classification, multiple
    choice; the first on a tie) or the decoded text (generation)."""
    if spec.kind == "generation":
        prompts = [encode_prompt(tok, spec, s, max_length) for s in samples]
        return greedy_answers(model, tok, prompts, batch_size=batch_size)
    scores = candidate_scores(model, tok, spec, samples, max_length=max_length,
                              batch_size=batch_size)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def classification_loss(model, tok, spec: TaskSpec, samples: list[Sample], max_length: int
                        ) -> torch.Tensor:
    """Cross-entropy over the candidates' mean option log-probabilities, averaged over the
    samples (MeZO's ``train_as_classification``); one forward over all candidates."""
    flat, counts = [], []
    for s in samples:
        enc = encode_candidates(tok, spec, s, max_length)
        flat += enc
        counts.append(len(enc))
    scores = mean_option_logprob(model, flat, pad_id_of(tok))
    losses, start = [], 0
    for s, k in zip(samples, counts):
        losses.append(F.cross_entropy(scores[start:start + k].unsqueeze(0),
                                      torch.tensor([s.gold[0]])))
        start += k
    return torch.stack(losses).mean()


def target_loss(model, tok, spec: TaskSpec, samples: list[Sample], max_length: int
                ) -> torch.Tensor:
    """Mean negative log-likelihood of the correct candidate's option tokens over all option
    tokens of the batch (MeZO's teacher forcing on the option only)."""
    seqs = [encode_target(tok, spec, s, max_length) for s in samples]
    logp, keep = option_token_logprobs(model, seqs, pad_id_of(tok))
    return -logp.sum() / keep.sum()


def training_loss(model, tok, spec: TaskSpec, samples: list[Sample], max_length: int
                  ) -> torch.Tensor:
    """The loss MeZO trains ``spec`` with: ``classification_loss`` for classification tasks,
    ``target_loss`` for multiple choice and generation (MeZO's mezo.sh)."""
    if spec.kind == "classification":
        return classification_loss(model, tok, spec, samples, max_length)
    return target_loss(model, tok, spec, samples, max_length)
