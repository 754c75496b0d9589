"""Scoring prompts with a causal LM: option log-likelihoods for classification (MeZO's
``train_as_classification``, research/algorithms.md §0.2), cached last-position features, and
LM loss / perplexity on token blocks."""

from __future__ import annotations

import math

import torch

from zoengine.tasks.data import TaskError


def encode_prompts(tok, prompts, max_length: int) -> list[list[int]]:
    """Token ids per prompt; long prompts keep their end (where the question is)."""
    ids = tok(list(prompts), add_special_tokens=True)["input_ids"]
    return [x[-max_length:] for x in ids]


def left_pad(seqs, pad_id: int):
    """Left padding: the last real token sits at position -1 in every row (RoPE is relative,
    so the shift does not change the result)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, n - len(s):] = 1
    return ids, mask


def length_batches(seqs, batch_size: int):
    """Index batches of similar length (less padding)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _last_logits(model, ids, mask, keep: int):
    try:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[:, -keep:]
    except TypeError:  # models without logits_to_keep
        return model(input_ids=ids, attention_mask=mask).logits[:, -keep:]


class OptionScorer:
    """Mean log-likelihood of each option's tokens after each prompt: (n, K) scores."""

    def __init__(self, tok, options):
        self.tok = tok
        self.option_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
        if any(len(o) == 0 for o in self.option_ids):
            raise TaskError("--options", f"{options!r}: an option encodes to no tokens")
        self.single_token = all(len(o) == 1 for o in self.option_ids)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def scores(self, model, seqs) -> torch.Tensor:
        if self.single_token:
            ids, mask = left_pad(seqs, self.pad_id)
            logp = torch.log_softmax(_last_logits(model, ids, mask, 1)[:, -1].float(), -1)
            return logp[:, [o[0] for o in self.option_ids]]
        cols = []
        for opt in self.option_ids:
            ids, mask = left_pad([s + opt for s in seqs], self.pad_id)
            m = len(opt)
            logp = torch.log_softmax(_last_logits(model, ids, mask, m + 1)[:, :m].float(), -1)
            tgt = torch.tensor(opt).expand(len(seqs), m)
            cols.append(logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).mean(-1))
        return torch.stack(cols, 1)

    @torch.no_grad()
    def score_all(self, model, seqs, batch_size: int) -> torch.Tensor:
        out = torch.empty(len(seqs), len(self.option_ids))
        for b in length_batches(seqs, batch_size):
            out[b] = self.scores(model, [seqs[i] for i in b])
        return out


@torch.no_grad()
def last_features(model, seqs, pad_id: int, batch_size: int, progress: bool = False
                  ) -> torch.Tensor:
    """The final hidden state (after the last norm) at each prompt's last token: (n, hidden)."""
    from tqdm.auto import tqdm

    base = getattr(model, model.base_model_prefix)
    out = None
    for b in tqdm(length_batches(seqs, batch_size), desc="features", unit="batch",
                  disable=not progress, dynamic_ncols=True):
        ids, mask = left_pad([seqs[i] for i in b], pad_id)
        h = base(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1].float()
        if out is None:
            out = torch.empty(len(seqs), h.shape[-1])
        out[b] = h
    return out


def lm_blocks(tok, text: str, block_size: int) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // block_size
    if n == 0:
        raise TaskError("--block-size", f"{block_size}: the text has only {len(ids)} tokens")
    return torch.tensor(ids[:n * block_size]).view(n, block_size)


def lm_loss(model, blocks: torch.Tensor) -> torch.Tensor:
    return model(input_ids=blocks, labels=blocks).loss


@torch.no_grad()
def lm_eval(model, blocks: torch.Tensor, batch_size: int, max_blocks: int = 64) -> dict:
    blocks = blocks[:max_blocks]
    total = 0.0
    for i in range(0, len(blocks), batch_size):
        b = blocks[i:i + batch_size]
        total += float(lm_loss(model, b)) * len(b)
    loss = total / len(blocks)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "blocks": len(blocks)}
