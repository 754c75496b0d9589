"""The two problems of bench_methods.py: a tiny pretrained LLaMA fine-tuned on new text, and
SmolLM2-135M on the shipped tweet-sentiment task (final norm + label rows on cached features).

Each setup gives ``named_parameters()``, ``train_closure(idx)`` (the loss on training batch
``idx``), ``sample(rng)`` (a batch index), ``metrics()`` (dev/test loss and accuracy) and
``numel()``. Both are deterministic given the seed of the batch stream.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import _common

ROOT = Path(__file__).resolve().parent.parent
SEQ, BATCH = 32, 16


# ---- tiny pretrained LLaMA ---------------------------------------------------------------------
def _encode(text: str, vocab: dict) -> torch.Tensor:
    unk = vocab["?"]
    return torch.tensor([vocab.get(c, unk) for c in text], dtype=torch.int64)


def _tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=SEQ)
    return LlamaForCausalLM(cfg)


def pretrained_tiny(steps: int = 800) -> tuple[torch.nn.Module, dict]:
    """A character-level LLaMA (hidden 64, 2 layers, ~94k parameters) pretrained with Adam and
    backprop on Macbeth (zoengine/corpora/macbeth.txt): ``steps`` of batch 32 x 32 at lr 3e-3,
    seed 0. Cached under zoengine's cache folder (a few seconds to rebuild)."""
    path = _common.cache_dir("bench_methods", f"tiny-macbeth-{steps}.pt")
    text = (ROOT / "zoengine" / "corpora" / "macbeth.txt").read_text(encoding="utf-8")
    chars = sorted({c for c in text if 32 <= ord(c) < 127} | {"?", "\n"})
    vocab = {c: i for i, c in enumerate(chars)}
    torch.manual_seed(0)
    model = _tiny_model(len(vocab))
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval(), vocab
    ids = _encode(text, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        start = torch.randint(0, len(ids) - SEQ, (32,), generator=g)
        x = torch.stack([ids[s:s + SEQ] for s in start.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"pretrained the tiny LLaMA on Macbeth: loss {float(loss):.3f} after {steps} steps "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), vocab


class TinyLM:
    """The Macbeth-pretrained tiny LLaMA, every parameter trained, on tweets (new text): the
    next-character loss on windows of 32 characters; dev/test: 64 fixed windows each of the
    tweet data set's dev and test splits; accuracy: next-character accuracy."""

    name = "tiny-llama-tweets"

    def __init__(self):
        from zoengine.tasks import tweet_sentiment

        self.model, vocab = pretrained_tiny()
        task = tweet_sentiment(seed=0)
        streams = {s: _encode("\n".join(task.splits[s][:]["text"]), vocab)
                   for s in ("train", "dev", "test")}
        self.train_ids = streams["train"]
        self.eval_sets = {}
        for s in ("dev", "test"):
            g = torch.Generator().manual_seed(1 if s == "dev" else 2)
            ids = streams[s]
            start = torch.randint(0, len(ids) - SEQ, (64,), generator=g).tolist()
            self.eval_sets[s] = torch.stack([ids[t:t + SEQ] for t in start])

    def named_parameters(self):
        return list(self.model.named_parameters())

    def numel(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def sample(self, rng):
        return rng.randint(0, len(self.train_ids) - SEQ, BATCH)

    def train_closure(self, idx):
        x = torch.stack([self.train_ids[s:s + SEQ] for s in idx.tolist()])
        return lambda: self.model(input_ids=x, labels=x).loss

    @torch.no_grad()
    def metrics(self) -> dict:
        out = {}
        for s, x in self.eval_sets.items():
            logits = self.model(input_ids=x).logits[:, :-1]
            target = x[:, 1:]
            out[f"{s}_loss"] = float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1)))
            out[f"{s}_acc"] = float((logits.argmax(-1) == target).float().mean())
        return out


class SmolHead:
    """SmolLM2-135M on tweet sentiment: the final RMSNorm gains and the two label-word rows
    (1,728 numbers) trained on the frozen model's cached last-position features, with the
    two-label cross-entropy (bench_convergence.py builds and checks the cache)."""

    name = "smollm2-135m-sentiment-head"

    def __init__(self):
        import bench_convergence as bc

        self.head = bc.Head(bc.build_features())
        y = self.head.feats["y_train"].numpy()
        self.pos, self.neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)

    def named_parameters(self):
        return self.head.named_parameters()

    def numel(self) -> int:
        return self.head.numel()

    def sample(self, rng):
        half = BATCH // 2
        return np.concatenate([rng.choice(self.pos, half, replace=False),
                               rng.choice(self.neg, half, replace=False)])

    def train_closure(self, idx):
        idx = torch.as_tensor(idx)
        return lambda: self.head.loss("train", idx)

    def metrics(self) -> dict:
        m = self.head.metrics()
        return {k: m[k] for k in ("dev_loss", "dev_acc", "test_loss", "test_acc")}


SETUPS = {"tiny": TinyLM, "smollm2": SmolHead}
