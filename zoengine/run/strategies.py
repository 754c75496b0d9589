"""What a run trains, one class per kind; the loop (``zoengine.run.loop``) drives any of them.

A strategy owns the data of its kind and answers four questions: which tensors train
(``named_params``), a loss closure on a fresh training batch (``batch_closure``), the full
held-out metrics (``evaluate``) and the small dev point plotted during training (``dev_point``).

- ``HeadStrategy``: the option rows of the output layer over features cached once from the
  frozen model (the default job: raises held-out AUC within minutes on a CPU,
  research/feasibility.md §4b). Options must be single tokens.
- ``ClassifierStrategy``: every parameter (``full``) or LoRA adapters, scoring options with the
  whole model.
- ``LMStrategy``: causal-LM loss on random blocks of a text (full or LoRA).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from zoengine.run.objectives import minus_accuracy
from zoengine.tasks import (
    OptionScorer,
    TaskError,
    column,
    encode_prompts,
    evaluate_scores,
    last_features,
    lm_blocks,
    lm_eval,
    lm_loss,
)


def balanced_batch(rng: np.random.RandomState, by_class: list[np.ndarray], size: int):
    """Indices with an equal share of every class (the first classes take the remainder)."""
    k = len(by_class)
    counts = [size // k + (1 if c < size % k else 0) for c in range(k)]
    return np.concatenate([rng.choice(by_class[c], counts[c], replace=len(by_class[c]) <
                                      counts[c]) for c in range(k)])


def split_seqs(task, tok, split: str, max_length: int, limit: int = 0):
    """(token ids of the prompts, labels) of a classification split, optionally the first N."""
    ds = task.splits[split]
    texts, labels = column(ds, "text"), column(ds, "label")
    if limit:
        texts, labels = texts[:limit], labels[:limit]
    return encode_prompts(tok, [task.prompt(t) for t in texts], max_length), list(labels)


def pool_indices(labels, k: int, n: int, seed: int) -> list[int]:
    """A balanced sample of ``n`` training rows (fixed by seed): the head mode's feature cache."""
    rng = np.random.RandomState(seed + 1)
    y = np.asarray(labels)
    per = [np.flatnonzero(y == c) for c in range(k)]
    return sorted(np.concatenate([rng.choice(p, min(len(p), n // k), replace=False)
                                  for p in per]).tolist())


def trainable(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class Strategy:
    """Base: the interface the loop uses. ``ema`` smooths the loss shown on the progress bar."""

    name = "?"
    ema = 0.9
    timing: dict

    def named_params(self) -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def batch_closure(self, rng: np.random.RandomState) -> Callable[[], torch.Tensor]:
        raise NotImplementedError

    def batched_closure(self, rng: np.random.RandomState) -> Callable[[int], torch.Tensor]:
        """``batch_closure``'s batch as ``step_batched`` takes it: closure(groups) evaluates
        the batch repeated ``groups`` times and returns one loss per group."""
        raise TaskError("--batched-samples", "works on classification and LM tasks with "
                                             "--train full or lora, not on the task suite "
                                             "(its batches are scored as evaluation scores "
                                             "them); leave it out")

    def evaluate(self) -> dict:
        raise NotImplementedError

    def dev_point(self) -> dict:
        raise NotImplementedError

    def trained(self):
        """What ``zoengine.run.report.weights_writer`` writes."""
        raise NotImplementedError


def initial_head(model, scorer: OptionScorer):
    """(option token ids, the output layer's rows for them as a trainable fp32 parameter,
    their bias): what the head mode starts from, and what a journal replays onto."""
    head = model.get_output_embeddings()
    ids = [o[0] for o in scorer.option_ids]
    rows = torch.nn.Parameter(head.weight.detach()[ids].clone().float())
    bias = (head.bias.detach()[ids].clone().float() if getattr(head, "bias", None) is not None
            else torch.zeros(len(ids)))
    return ids, rows, bias


class HeadStrategy(Strategy):
    """ZO on the option rows of the output layer over cached last-position features."""

    name, ema = "head", 0.98

    def __init__(self, cfg, task, model, tok, log=print):
        scorer = OptionScorer(tok, task.options)
        if not scorer.single_token:
            raise TaskError("--train", "head needs single-token options; use --train lora or "
                                       "full")
        self.k = k = len(task.options)
        t0 = time.perf_counter()
        all_texts, all_y = column(task.splits["train"], "text"), column(task.splits["train"],
                                                                         "label")
        pool = pool_indices(all_y, k, cfg.train_examples, cfg.seed)
        self.tr_y = torch.tensor([all_y[i] for i in pool])
        tr = encode_prompts(tok, [task.prompt(all_texts[i]) for i in pool], cfg.max_length)
        dev, self.dev_y = split_seqs(task, tok, "dev", cfg.max_length, cfg.eval_limit)
        test, self.test_y = split_seqs(task, tok, "test", cfg.max_length, cfg.eval_limit)
        log(f"caching features of {len(tr) + len(dev) + len(test)} prompts (train {len(tr)}, "
            f"dev {len(dev)}, test {len(test)}) from the frozen model ...")
        feats = last_features(model, tr + dev + test, scorer.pad_id, cfg.eval_batch_size,
                              progress=cfg.progress)
        self.f_tr, self.f_dev = feats[:len(tr)], feats[len(tr):len(tr) + len(dev)]
        self.f_test = feats[len(tr) + len(dev):]
        self.timing = {"features_s": time.perf_counter() - t0}
        self.ids, self.rows, self.bias = initial_head(model, scorer)
        self.by_class = [np.flatnonzero(self.tr_y.numpy() == c) for c in range(k)]
        self.batch_size, self.objective = cfg.batch_size, cfg.objective

    def _scores(self, f):
        # option logits; the log-normaliser is shared by all options, so these rank and train
        # exactly like the options' log-likelihoods (research/algorithms.md §0.2)
        return f @ self.rows.detach().T + self.bias

    def named_params(self):
        return [("head_rows", self.rows)]

    def batch_closure(self, rng):
        b = torch.as_tensor(balanced_batch(rng, self.by_class, self.batch_size))
        fb, yb = self.f_tr[b], self.tr_y[b]
        if self.objective == "accuracy":  # MeZO's non-differentiable objective
            return lambda: minus_accuracy(fb @ self.rows.T + self.bias, yb)
        return lambda: F.cross_entropy(fb @ self.rows.T + self.bias, yb)

    def evaluate(self):
        return evaluate_scores(self._scores(self.f_dev), self.dev_y, self._scores(self.f_test),
                               self.test_y)

    def dev_point(self):
        d = self._scores(self.f_dev)
        m = evaluate_scores(d, self.dev_y, d, self.dev_y)["dev"]
        return {"dev_accuracy": m["accuracy"], "dev_auc": m["auc"]}

    def trained(self):
        return {"head_rows": self.rows.detach().clone(), "head_bias": self.bias,
                "option_token_ids": torch.tensor(self.ids)}


class ClassifierStrategy(Strategy):
    """ZO on all parameters (full) or LoRA adapters, scoring options with the whole model."""

    def __init__(self, cfg, task, model, tok, log=print):
        self.name, self.model, self.tok, self.task, self.cfg = cfg.train, model, tok, task, cfg
        self.scorer = OptionScorer(tok, task.options)
        self.dev, self.dev_y = split_seqs(task, tok, "dev", cfg.max_length, cfg.eval_limit)
        self.test, self.test_y = split_seqs(task, tok, "test", cfg.max_length, cfg.eval_limit)
        tr = task.splits["train"]
        self.tr_texts, self.tr_y = column(tr, "text"), np.asarray(column(tr, "label"))
        self.by_class = [np.flatnonzero(self.tr_y == c) for c in range(len(task.options))]
        self.timing = {}

    def named_params(self):
        return trainable(self.model)

    def batch_closure(self, rng):
        b = balanced_batch(rng, self.by_class, self.cfg.batch_size)
        seqs = encode_prompts(self.tok, [self.task.prompt(self.tr_texts[int(i)]) for i in b],
                              self.cfg.max_length)
        yb = torch.as_tensor(self.tr_y[b])
        if self.cfg.objective == "accuracy":  # MeZO's non-differentiable objective
            return lambda: minus_accuracy(self.scorer.scores(self.model, seqs), yb)
        return lambda: F.cross_entropy(self.scorer.scores(self.model, seqs), yb)

    def batched_closure(self, rng):
        b = balanced_batch(rng, self.by_class, self.cfg.batch_size)
        seqs = encode_prompts(self.tok, [self.task.prompt(self.tr_texts[int(i)]) for i in b],
                              self.cfg.max_length)
        yb = torch.as_tensor(self.tr_y[b])

        def closure(groups):  # rows group-major: the prompts repeated, scored per group
            scores = self.scorer.scores(self.model, seqs * groups).view(groups, len(seqs), -1)
            if self.cfg.objective == "accuracy":
                return -(scores.argmax(-1) == yb).float().mean(1)
            return torch.stack([F.cross_entropy(s, yb) for s in scores])
        return closure

    def _score(self, seqs):
        return self.scorer.score_all(self.model, seqs, self.cfg.eval_batch_size)

    def evaluate(self):
        return evaluate_scores(self._score(self.dev), self.dev_y, self._score(self.test),
                               self.test_y)

    def dev_point(self):
        d = self._score(self.dev)
        m = evaluate_scores(d, self.dev_y, d, self.dev_y)["dev"]
        return {"dev_accuracy": m["accuracy"], "dev_auc": m["auc"]}

    def trained(self):
        return self.model


class LMStrategy(Strategy):
    """Causal-LM loss on random ``block_size``-token blocks of the training text."""

    def __init__(self, cfg, task, model, tok, log=print, teacher=None):
        self.name, self.model, self.cfg, self.teacher = cfg.train, model, cfg, teacher
        self.blocks = {s: lm_blocks(tok, task.splits[s]["text"][0], cfg.block_size)
                       for s in ("train", "dev", "test")}
        if cfg.eval_limit:  # --eval-limit N: the first N dev and test blocks
            for s in ("dev", "test"):
                self.blocks[s] = self.blocks[s][:cfg.eval_limit]
        self.timing = {}

    def named_params(self):
        return trainable(self.model)

    def batch_closure(self, rng):
        if self.teacher is not None:  # --objective kd / kd+lm: the cached blocks and logits
            from zoengine.run.kd import kd_weight
            from zoengine.tasks import kd_batch_loss

            batch = self.teacher.batch(rng.randint(0, len(self.teacher), self.cfg.batch_size))
            w = kd_weight(self.cfg)
            return lambda: kd_batch_loss(self.model, batch, kd_weight=w)
        train = self.blocks["train"]
        b = train[torch.as_tensor(rng.randint(0, len(train), self.cfg.batch_size))]
        return lambda: lm_loss(self.model, b)

    def batched_closure(self, rng):
        if self.teacher is not None:
            raise TaskError("--batched-samples", "does not combine with --objective kd or "
                                                 "kd+lm (the distillation loss is one number "
                                                 "per batch); leave it out")
        from zoengine.optim import group_losses, tile_batch

        train = self.blocks["train"]
        b = train[torch.as_tensor(rng.randint(0, len(train), self.cfg.batch_size))]

        def closure(groups):
            t = tile_batch(b, groups)
            return group_losses(self.model(input_ids=t).logits, t, groups)
        return closure

    def evaluate(self):
        return {s: lm_eval(self.model, self.blocks[s], self.cfg.eval_batch_size)
                for s in ("dev", "test")}

    def dev_point(self):
        return {"dev_loss": lm_eval(self.model, self.blocks["dev"],
                                    self.cfg.eval_batch_size)["loss"]}

    def trained(self):
        return self.model


def make_strategy(cfg, task, model, tok, log=print, teacher=None) -> Strategy:
    """The strategy for ``cfg.train`` on ``task`` (an LM task never trains a head);
    ``teacher``: the KD cache of ``--objective kd`` (LM tasks)."""
    if task.kind == "suite":  # MeZO's task suite read from --data-dir (docs/tasks.md)
        from zoengine.run.suite import SuiteStrategy

        return SuiteStrategy(cfg, task, model, tok, log)
    if task.kind == "lm":
        if cfg.train == "head":
            raise TaskError("--train", "head trains classification options; an LM task needs "
                                       "--train full or --lora")
        return LMStrategy(cfg, task, model, tok, log, teacher=teacher)
    if cfg.train == "head":
        return HeadStrategy(cfg, task, model, tok, log)
    return ClassifierStrategy(cfg, task, model, tok, log)
