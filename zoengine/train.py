"""The training job behind ``zoengine train`` / ``zoengine eval``: scoring, metrics, the ZO loop,
atomic outputs.

Three things can be trained (``RunConfig.train``):

- ``head``: the output-layer rows of the option tokens, untied from the input embedding, over
  features cached once from the frozen model (the last position's final hidden state). Options
  must be single tokens. On SmolLM2 + tweets this is the configuration that raises held-out AUC
  within minutes on a CPU (research/feasibility.md §4b); it is the default.
- ``full``: every parameter (MeZO as in the paper). ~6.5 s/step on 2 CPU cores for 134.5M params.
- ``lora``: LoRA adapters through ``peft`` (r=8 on q_proj/v_proj by default); the base is frozen.

The optimizer always comes from ``zoengine.optim.create(method, ...)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from zoengine.data import ClassificationTask, LMTask, TaskError, column, load_task

DEFAULT_MODEL = "smollm2-135m"
# per trainable set: (lr, eps) defaults, from research/feasibility.md §2-4 and our runs
MODE_DEFAULTS = {"head": (1e-4, 1e-3), "full": (1e-5, 1e-3), "lora": (1e-3, 1e-2)}
TRAIN_MODES = ("auto", "head", "full", "lora")


@dataclass
class RunConfig:
    """Everything a run needs; ``zoengine train`` flags and ``--config`` keys have these names."""

    model: str = DEFAULT_MODEL
    task: str = "sentiment"
    method: str = "mezo"
    train: str = "auto"  # auto | head | full | lora  (auto: head for classification, lora for LM)
    steps: int | None = None  # default per mode: head 4000, full 60, lora 100
    batch_size: int = 16
    lr: float | None = None  # default per mode (MODE_DEFAULTS)
    eps: float | None = None
    seed: int = 0
    output_dir: str | None = None  # default outputs/<task>-<train>
    train_examples: int = 512  # head mode: balanced training tweets whose features are cached
    eval_limit: int = 0  # score only the first N dev and test rows (0: all; for quick checks)
    eval_every: int = 0  # dev evaluation every N steps (0: head mode 250, others before/after only)
    max_length: int = 128
    eval_batch_size: int = 16
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    template: str | None = None
    options: list | None = None
    text_column: str = "text"
    label_column: str = "label"
    block_size: int = 128
    threads: int | None = None  # None: torch's default, fewer if other processes keep cores busy
    progress: bool = True
    prune: str | None = None  # METHOD[:PATTERN]: prune before training, keep the zeros
    prune_sparsity: float | None = None
    keep_zeros: bool | None = None  # the model is already pruned: masks="zeros"
    max_memory: str | None = None  # plan batch/sequence/dtype to fit, refuse if nothing fits

    def resolved(self, task) -> RunConfig:
        c = RunConfig(**asdict(self))
        if c.train == "auto":
            c.train = "head" if task.kind == "classification" else "lora"
        lr, eps = MODE_DEFAULTS[c.train]
        c.lr = lr if c.lr is None else c.lr
        c.eps = eps if c.eps is None else c.eps
        if c.steps is None:
            c.steps = {"head": 8000, "full": 60, "lora": 100}[c.train]
        if c.eval_every == 0 and c.train == "head":
            c.eval_every = 250
        if c.output_dir is None:
            c.output_dir = os.path.join("outputs", f"{os.path.basename(str(c.task))}-{c.train}")
        return c


# ---- atomic outputs ---------------------------------------------------------------------------

def _tmp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp-{os.getpid()}")


def atomic_write(path: str, data: bytes) -> None:
    """Write ``path`` completely or not at all (temp file in the same folder, fsync, rename)."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(path: str):
    """Yield a temp folder; on success it replaces ``path`` as a whole, on error it is removed."""
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        old = path + ".old-" + str(os.getpid())
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temps(folder: str) -> None:
    """Remove temp files left by a killed run (``.<name>.tmp-<pid>``)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".") and ".tmp-" in name:
                p = os.path.join(folder, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)


# ---- models -----------------------------------------------------------------------------------

def load_model(spec: str):
    """(model, tokenizer): the embedded default or a local Hugging Face model folder."""
    if spec == DEFAULT_MODEL:
        from zoengine.models import default_model_available, load_default_model

        reason = default_model_available()
        if reason:
            raise TaskError("--model", f"the default model cannot load: {reason}")
        return load_default_model()
    if not os.path.isdir(spec) or not os.path.exists(os.path.join(spec, "config.json")):
        raise TaskError("--model", f"{spec!r} is neither {DEFAULT_MODEL!r} nor a local Hugging "
                                   "Face model folder (with config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model, tok


# ---- classification scoring ------------------------------------------------------------------

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


# ---- metrics ----------------------------------------------------------------------------------

def auc_binary(margin: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    pos, neg = margin[y == 1], margin[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks over ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r = ranks[:len(pos)].sum()
    return float((r - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Binary: AUC of score1 - score0. K > 2: macro one-vs-rest AUC of the softmax."""
    if scores.shape[1] == 2:
        return auc_binary(scores[:, 1] - scores[:, 0], y)
    p = torch.softmax(torch.as_tensor(scores), -1).numpy()
    return float(np.mean([auc_binary(p[:, k], (y == k).astype(int)) for k in range(p.shape[1])]))


def fit_bias(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-option additive bias that maximises accuracy on (dev) data; bias[0] = 0."""
    k = scores.shape[1]
    bias = np.zeros(k)
    if k == 2:
        m = scores[:, 1] - scores[:, 0]
        cands = np.concatenate([[m.min() - 1], (np.sort(m)[1:] + np.sort(m)[:-1]) / 2,
                                [m.max() + 1]])
        accs = [((m > c) == (y == 1)).mean() for c in cands]
        bias[1] = -cands[int(np.argmax(accs))]
        return bias
    for _ in range(3):  # coordinate ascent over the other classes' biases
        for c in range(1, k):
            s = scores + bias
            others = np.delete(s, c, 1).max(1)
            need = others - scores[:, c]  # bias at which row flips to c
            cands = np.concatenate([[need.min() - 1], np.unique(need) + 1e-6])
            best, best_acc = bias[c], -1.0
            for v in cands:
                trial = bias.copy()
                trial[c] = v
                acc = ((scores + trial).argmax(1) == y).mean()
                if acc > best_acc:
                    best, best_acc = v, acc
            bias[c] = best
    return bias


def class_metrics(scores: torch.Tensor, labels, bias: np.ndarray | None = None) -> dict:
    s = scores.numpy().astype(np.float64)
    y = np.asarray(labels)
    out = {"accuracy": float((s.argmax(1) == y).mean()), "auc": auc(s, y),
           "share_predicted": np.bincount(s.argmax(1), minlength=s.shape[1]).tolist()}
    if bias is not None:
        out["calibrated_accuracy"] = float(((s + bias).argmax(1) == y).mean())
    return out


def evaluate_scores(dev_scores, dev_labels, test_scores, test_labels) -> dict:
    """Accuracy, AUC and the dev-calibrated accuracy (bias fitted on dev) for dev and test."""
    bias = fit_bias(dev_scores.numpy().astype(np.float64), np.asarray(dev_labels))
    return {"dev": class_metrics(dev_scores, dev_labels, bias),
            "test": class_metrics(test_scores, test_labels, bias), "dev_bias": bias.tolist()}


# ---- language modelling -------------------------------------------------------------------------

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


def balanced_batch(rng: np.random.RandomState, by_class: list[np.ndarray], size: int):
    """Indices with an equal share of every class (the first classes take the remainder)."""
    k = len(by_class)
    counts = [size // k + (1 if c < size % k else 0) for c in range(k)]
    return np.concatenate([rng.choice(by_class[c], counts[c], replace=len(by_class[c]) <
                                      counts[c]) for c in range(k)])


def count_params(params) -> int:
    return int(sum(p.numel() for p in params))


def run_summary_json(obj) -> bytes:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return (json.dumps(clean(obj), indent=2) + "\n").encode()


def now() -> float:
    return time.perf_counter()


def make_tmpdir() -> str:
    return tempfile.mkdtemp(prefix="zoengine-")


# ---- the job ----------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(msg, flush=True)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True,
                mininterval=0.5)


def _split_seqs(task: ClassificationTask, tok, split: str, max_length: int, limit=0):
    ds = task.splits[split]
    texts, labels = column(ds, "text"), column(ds, "label")
    if limit:
        texts, labels = texts[:limit], labels[:limit]
    return encode_prompts(tok, [task.prompt(t) for t in texts], max_length), list(labels)


def _pool_indices(labels, k: int, n: int, seed: int) -> list[int]:
    """A balanced sample of ``n`` training rows (fixed by seed): the head mode's feature cache."""
    rng = np.random.RandomState(seed + 1)
    y = np.asarray(labels)
    per = [np.flatnonzero(y == c) for c in range(k)]
    return sorted(np.concatenate([rng.choice(p, min(len(p), n // k), replace=False)
                                  for p in per]).tolist())


def _make_optimizer(cfg: RunConfig, named_params, masks=None):
    from zoengine.optim import create

    extra = {} if masks is None else {"masks": masks}
    return create(cfg.method, named_params, lr=cfg.lr, eps=cfg.eps, seed=cfg.seed, **extra)


def train_classification_head(cfg, task, model, tok, report):
    """ZO on the option rows of the output layer over cached last-position features."""
    scorer = OptionScorer(tok, task.options)
    if not scorer.single_token:
        raise TaskError("--train", "head needs single-token options; use --train lora or full")
    k = len(task.options)
    t0 = now()
    tr_all = task.splits["train"]
    all_texts, all_y = column(tr_all, "text"), column(tr_all, "label")
    pool = _pool_indices(all_y, k, cfg.train_examples, cfg.seed)
    tr_texts = [all_texts[i] for i in pool]
    tr_y = torch.tensor([all_y[i] for i in pool])
    tr_seqs = encode_prompts(tok, [task.prompt(t) for t in tr_texts], cfg.max_length)
    dev_seqs, dev_y = _split_seqs(task, tok, "dev", cfg.max_length, cfg.eval_limit)
    test_seqs, test_y = _split_seqs(task, tok, "test", cfg.max_length, cfg.eval_limit)
    n_all = len(tr_seqs) + len(dev_seqs) + len(test_seqs)
    _log(f"caching features of {n_all} prompts (train {len(tr_seqs)}, dev {len(dev_seqs)}, "
         f"test {len(test_seqs)}) from the frozen model ...")
    feats = last_features(model, tr_seqs + dev_seqs + test_seqs, scorer.pad_id,
                          cfg.eval_batch_size, progress=cfg.progress)
    f_tr, f_dev = feats[:len(tr_seqs)], feats[len(tr_seqs):len(tr_seqs) + len(dev_seqs)]
    f_test = feats[len(tr_seqs) + len(dev_seqs):]
    report["timing"]["features_s"] = now() - t0
    head = model.get_output_embeddings()
    ids = [o[0] for o in scorer.option_ids]
    rows = torch.nn.Parameter(head.weight.detach()[ids].clone().float())
    bias = (head.bias.detach()[ids].clone().float() if getattr(head, "bias", None) is not None
            else torch.zeros(k))

    def scores(f):
        # option logits; the log-normaliser is shared by all options, so these rank and
        # train exactly like the options' log-likelihoods (research/algorithms.md §0.2)
        return f @ rows.detach().T + bias

    before = evaluate_scores(scores(f_dev), dev_y, scores(f_test), test_y)
    report["before"] = before
    report["trainable_params"] = rows.numel()
    opt = _make_optimizer(cfg, [("head_rows", rows)])
    rng = np.random.RandomState(cfg.seed)
    by_class = [np.flatnonzero(tr_y.numpy() == c) for c in range(k)]
    curve, evals = [], [{"step": 0, **_dev_point(before)}]
    t1 = now()
    with _progress(cfg.steps, cfg.progress, "zo head") as bar:
        run_avg = None
        for step in range(1, cfg.steps + 1):
            b = torch.as_tensor(balanced_batch(rng, by_class, cfg.batch_size))
            fb, yb = f_tr[b], tr_y[b]
            loss = float(opt.step(lambda fb=fb, yb=yb: F.cross_entropy(fb @ rows.T + bias, yb)))
            curve.append(round(loss, 5))
            run_avg = loss if run_avg is None else 0.98 * run_avg + 0.02 * loss
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                evals.append({"step": step, **_dev_point(
                    evaluate_scores(scores(f_dev), dev_y, scores(f_dev), dev_y))})
            bar.update(1)
            if step % 50 == 0 or step == cfg.steps:
                bar.set_postfix(loss=f"{run_avg:.4f}")
    report["timing"]["train_s"] = now() - t1
    after = evaluate_scores(scores(f_dev), dev_y, scores(f_test), test_y)
    evals.append({"step": cfg.steps, **_dev_point(after)})
    report["after"] = after
    report["curve"] = {"loss": curve, "dev": evals}
    return {"head_rows": rows.detach().clone(), "head_bias": bias,
            "option_token_ids": torch.tensor(ids)}


def _dev_point(m: dict) -> dict:
    return {"dev_accuracy": m["dev"]["accuracy"], "dev_auc": m["dev"]["auc"]}


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _apply_lora(cfg, model):
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    pc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                    target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    model = get_peft_model(model, pc)
    model.eval()
    return model


def train_classification_model(cfg, task, model, tok, report):
    """ZO on all parameters (full) or on LoRA adapters, scoring options with the whole model."""
    scorer = OptionScorer(tok, task.options)
    k = len(task.options)
    dev_seqs, dev_y = _split_seqs(task, tok, "dev", cfg.max_length, cfg.eval_limit)
    test_seqs, test_y = _split_seqs(task, tok, "test", cfg.max_length, cfg.eval_limit)
    t0 = now()
    before = evaluate_scores(scorer.score_all(model, dev_seqs, cfg.eval_batch_size), dev_y,
                             scorer.score_all(model, test_seqs, cfg.eval_batch_size), test_y)
    report["before"] = before
    report["timing"]["eval_before_s"] = now() - t0
    tr = task.splits["train"]
    tr_texts, tr_y = column(tr, "text"), np.asarray(column(tr, "label"))
    by_class = [np.flatnonzero(tr_y == c) for c in range(k)]
    params = _trainable(model)
    report["trainable_params"] = count_params(p for _, p in params)
    opt = _make_optimizer(cfg, params, masks=getattr(cfg, "masks", None))
    rng = np.random.RandomState(cfg.seed)
    curve, evals = [], [{"step": 0, **_dev_point(before)}]
    t1 = now()
    with _progress(cfg.steps, cfg.progress, f"zo {cfg.train}") as bar:
        run_avg = None
        for step in range(1, cfg.steps + 1):
            b = balanced_batch(rng, by_class, cfg.batch_size)
            seqs = encode_prompts(tok, [task.prompt(tr_texts[int(i)]) for i in b],
                                  cfg.max_length)
            yb = torch.as_tensor(tr_y[b])
            loss = float(opt.step(
                lambda seqs=seqs, yb=yb: F.cross_entropy(scorer.scores(model, seqs), yb)))
            curve.append(loss)
            run_avg = loss if run_avg is None else 0.9 * run_avg + 0.1 * loss
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                d = scorer.score_all(model, dev_seqs, cfg.eval_batch_size)
                evals.append({"step": step, **_dev_point(evaluate_scores(d, dev_y, d, dev_y))})
            bar.update(1)
            bar.set_postfix(loss=f"{run_avg:.4f}")
    report["timing"]["train_s"] = now() - t1
    t2 = now()
    after = evaluate_scores(scorer.score_all(model, dev_seqs, cfg.eval_batch_size), dev_y,
                            scorer.score_all(model, test_seqs, cfg.eval_batch_size), test_y)
    report["timing"]["eval_after_s"] = now() - t2
    evals.append({"step": cfg.steps, **_dev_point(after)})
    report["after"], report["curve"] = after, {"loss": curve, "dev": evals}
    return model


def train_lm(cfg, task: LMTask, model, tok, report):
    blocks = {s: lm_blocks(tok, task.splits[s]["text"][0], cfg.block_size)
              for s in ("train", "dev", "test")}
    t0 = now()
    report["before"] = {s: lm_eval(model, blocks[s], cfg.eval_batch_size) for s in ("dev", "test")}
    report["timing"]["eval_before_s"] = now() - t0
    params = _trainable(model)
    report["trainable_params"] = count_params(p for _, p in params)
    opt = _make_optimizer(cfg, params, masks=getattr(cfg, "masks", None))
    rng = np.random.RandomState(cfg.seed)
    curve, evals = [], [{"step": 0, "dev_loss": report["before"]["dev"]["loss"]}]
    t1 = now()
    with _progress(cfg.steps, cfg.progress, f"zo {cfg.train}") as bar:
        run_avg = None
        for step in range(1, cfg.steps + 1):
            b = blocks["train"][torch.as_tensor(rng.randint(0, len(blocks["train"]),
                                                            cfg.batch_size))]
            loss = float(opt.step(lambda b=b: lm_loss(model, b)))
            curve.append(loss)
            run_avg = loss if run_avg is None else 0.9 * run_avg + 0.1 * loss
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                evals.append({"step": step, "dev_loss": lm_eval(
                    model, blocks["dev"], cfg.eval_batch_size)["loss"]})
            bar.update(1)
            bar.set_postfix(loss=f"{run_avg:.4f}")
    report["timing"]["train_s"] = now() - t1
    report["after"] = {s: lm_eval(model, blocks[s], cfg.eval_batch_size) for s in ("dev", "test")}
    evals.append({"step": cfg.steps, "dev_loss": report["after"]["dev"]["loss"]})
    report["curve"] = {"loss": curve, "dev": evals}
    return model


def plot_curve(report: dict) -> bytes:
    """Training loss (raw and moving average) and dev metrics against steps, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.asarray(report["curve"]["loss"], dtype=float)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = np.arange(1, len(loss) + 1)
    a1.plot(steps, loss, lw=0.5, alpha=0.35, label="batch loss")
    w = max(1, len(loss) // 50)
    if len(loss) >= w:
        ma = np.convolve(loss, np.ones(w) / w, mode="valid")
        a1.plot(steps[w - 1:], ma, lw=1.5, label=f"moving avg ({w})")
    a1.set_xlabel("step")
    a1.set_ylabel("loss")
    a1.set_title("training loss")
    a1.legend(fontsize=8)
    dev = report["curve"]["dev"]
    xs = [d["step"] for d in dev]
    if "dev_accuracy" in dev[0]:
        a2.plot(xs, [d["dev_accuracy"] for d in dev], "o-", ms=3, label="dev accuracy")
        a2.plot(xs, [d["dev_auc"] for d in dev], "s-", ms=3, label="dev AUC")
        base = report["before"]["dev"].get("calibrated_accuracy")
        if base is not None:
            a2.axhline(base, ls="--", c="gray", lw=1, label="zero-shot, bias fitted on dev")
        a2.set_title("held-out dev")
    else:
        a2.plot(xs, [d["dev_loss"] for d in dev], "o-", ms=3, label="dev loss")
        a2.set_title("held-out dev loss")
    a2.set_xlabel("step")
    a2.legend(fontsize=8)
    fig.suptitle(f"{report['config']['task']} · {report['config']['train']} · "
                 f"{report['config']['method']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def save_weights(cfg, out_dir: str, trained, tok) -> str:
    """Write the trained weights atomically; returns the path written."""
    from safetensors.torch import save_file

    if cfg.train == "head":
        path = os.path.join(out_dir, "head.safetensors")
        tmp = _tmp_name(path)
        try:
            save_file({k: v.contiguous() for k, v in trained.items()}, tmp,
                      metadata={"model": str(cfg.model), "task": str(cfg.task),
                                "kind": "zoengine-head-rows"})
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path
    name = "adapter" if cfg.train == "lora" else "model"
    path = os.path.join(out_dir, name)
    with atomic_dir(path) as tmp:
        trained.save_pretrained(tmp, safe_serialization=True)
        if cfg.train == "full":
            tok.save_pretrained(tmp)
    return path


def summary_lines(report: dict) -> list[str]:
    b, a = report["before"], report["after"]
    c = report["config"]
    head = (f"zoengine: task {c['task']}, train {c['train']} "
            f"({report['trainable_params']:,} params), method {c['method']}, {c['steps']} steps, "
            f"{report['timing']['total_s']:.0f} s")
    if "test" in b and "loss" in b["test"]:
        return [head, f"  test loss {b['test']['loss']:.4f} -> {a['test']['loss']:.4f}   "
                      f"perplexity {b['test']['perplexity']:.2f} -> {a['test']['perplexity']:.2f}"]
    g = report["gain"]
    return [head,
            "  held-out test           accuracy    AUC",
            f"  zero-shot (before)        {b['test']['accuracy']:.3f}    {b['test']['auc']:.3f}",
            f"  dev-calibrated zero-shot  {b['test']['calibrated_accuracy']:.3f}      -",
            f"  after ZO training         {a['test']['accuracy']:.3f}    {a['test']['auc']:.3f}",
            f"  gain: AUC {g['auc']:+.3f}; accuracy {g['accuracy_vs_calibrated_baseline']:+.3f} "
            f"over the dev-calibrated baseline "
            f"({'beats' if g['beats_calibrated_baseline'] else 'does NOT beat'} it)"]


def auto_threads() -> int:
    """torch's thread count, lowered to the cores other processes leave free.

    On a 2-core machine with one busy neighbour, 2 threads made a forward 2.5x slower than
    1 thread (spinning threads wait on a descheduled peer), so a busy machine gets fewer.
    """
    n = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        return n
    free = int((os.cpu_count() or n) - busy + 0.5)
    return max(1, min(n, free))


def _prune_and_plan(cfg: RunConfig, task, model, tok):
    """``--prune``/``--keep-zeros`` (masks for full fine-tuning) and ``--max-memory`` (a plan
    applied to the batch size, sequence length and dtype). Returns the plan or None."""
    from zoengine import memory, sparsity

    masks = None
    if cfg.prune or cfg.keep_zeros:
        if cfg.train != "full":
            raise TaskError("--prune" if cfg.prune else "--keep-zeros",
                            "sparsity is preserved for full fine-tuning: add --train full "
                            "(head and LoRA never touch the pruned weights)")
        masks = sparsity.masks_for_run(
            model, tok, prune_spec=cfg.prune, sparsity=cfg.prune_sparsity,
            keep_zeros=bool(cfg.keep_zeros),
            calib_task=cfg.task if task.kind == "lm" else "shakespeare", seed=cfg.seed, log=_log)
    cfg.masks = masks  # not a field: never written to metrics.json
    if not cfg.max_memory:
        return None
    lm = task.kind == "lm"
    plan = memory.plan_for_run(model, cfg.max_memory, method=cfg.method,
                               batch_size=cfg.batch_size,
                               seq_len=cfg.block_size if lm else cfg.max_length,
                               masks=masks, log=_log)
    cfg.batch_size = plan.batch_size
    if lm:
        cfg.block_size = plan.seq_len
    else:
        cfg.max_length = plan.seq_len
    if plan.dtype != "float32":
        model.to(getattr(torch, plan.dtype))
    memory.reset_peak()
    return plan


def run_train(cfg: RunConfig) -> dict:
    """Load, evaluate, train, evaluate, write outputs. Returns the report (metrics.json)."""
    t_start = now()
    torch.set_num_threads(cfg.threads or auto_threads())
    task = load_task(cfg.task, seed=cfg.seed, template=cfg.template, options=cfg.options,
                     text_column=cfg.text_column, label_column=cfg.label_column,
                     block_size=cfg.block_size)
    cfg = cfg.resolved(task)
    if task.kind == "lm" and cfg.train == "head":
        raise TaskError("--train", "head trains classification options; an LM task needs "
                                   "--train full or --lora")
    os.makedirs(cfg.output_dir, exist_ok=True)
    clean_stale_temps(cfg.output_dir)
    _log(f"loading model {cfg.model} ...")
    t0 = now()
    model, tok = load_model(cfg.model)
    report = {"config": asdict(cfg), "timing": {"load_s": now() - t0},
              "torch_threads": torch.get_num_threads()}
    torch.manual_seed(cfg.seed)
    plan = _prune_and_plan(cfg, task, model, tok)
    if cfg.train == "lora":
        model = _apply_lora(cfg, model)
    if task.kind == "lm":
        trained = train_lm(cfg, task, model, tok, report)
    elif cfg.train == "head":
        trained = train_classification_head(cfg, task, model, tok, report)
    else:
        trained = train_classification_model(cfg, task, model, tok, report)
    if task.kind == "classification":
        b, a = report["before"]["test"], report["after"]["test"]
        report["gain"] = {
            "auc": a["auc"] - b["auc"],
            "accuracy": a["accuracy"] - b["accuracy"],
            "accuracy_vs_calibrated_baseline": a["accuracy"] - b["calibrated_accuracy"],
            "beats_calibrated_baseline": bool(a["accuracy"] > b["calibrated_accuracy"]
                                              and a["auc"] > b["auc"])}
    if cfg.prune or cfg.keep_zeros:
        from zoengine.sparsity import sparsity_report

        report["sparsity_after"] = sparsity_report(model, getattr(cfg, "masks", None)
                                                   if isinstance(getattr(cfg, "masks", None),
                                                                 dict) else None)
    if cfg.max_memory:
        from zoengine import memory

        report["memory"] = memory.report_peak(plan, log=_log)
    report["weights"] = os.path.relpath(save_weights(cfg, cfg.output_dir, trained, tok),
                                        cfg.output_dir)
    report["timing"]["total_s"] = now() - t_start
    atomic_write(os.path.join(cfg.output_dir, "curve.png"), plot_curve(report))
    # metrics.json goes last: its presence marks a finished run
    atomic_write(os.path.join(cfg.output_dir, "metrics.json"), run_summary_json(report))
    for line in summary_lines(report):
        _log(line)
    _log(f"wrote {cfg.output_dir}/metrics.json, curve.png, {report['weights']}")
    return report


def run_eval(*, model_spec: str, task_name: str, weights: str | None, split: str, seed: int,
             max_length: int = 128, batch_size: int = 16, block_size: int = 128,
             task_kw: dict | None = None) -> dict:
    """Score a model (optionally with trained head rows, a LoRA adapter or saved model) on a
    task's split. Classification: accuracy, AUC, dev-calibrated accuracy; LM: loss, perplexity."""
    torch.set_num_threads(auto_threads())
    task = load_task(task_name, seed=seed, block_size=block_size, **(task_kw or {}))
    head_rows = None
    if weights:
        if os.path.isfile(os.path.join(weights, "metrics.json")):  # a run's output folder
            w = json.load(open(os.path.join(weights, "metrics.json")))["weights"]
            weights = os.path.join(weights, w)
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            head_rows = load_file(weights)
        elif os.path.exists(os.path.join(weights, "adapter_config.json")):
            pass
        elif os.path.exists(os.path.join(weights, "config.json")):
            model_spec, weights = weights, None
        else:
            raise TaskError("--weights", f"{weights!r} is not a zoengine output folder, "
                                         "head .safetensors, adapter or model folder")
    model, tok = load_model(model_spec)
    if weights and head_rows is None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, weights)
        model.eval()
    if task.kind == "lm":
        blocks = lm_blocks(tok, task.splits[split]["text"][0], block_size)
        return {"task": task.name, "split": split, **lm_eval(model, blocks, batch_size)}
    scorer = OptionScorer(tok, task.options)
    dev_seqs, dev_y = _split_seqs(task, tok, "dev", max_length)
    seqs, y = _split_seqs(task, tok, split, max_length)
    if head_rows is not None:
        f = last_features(model, dev_seqs + seqs, scorer.pad_id, batch_size)
        s = f @ head_rows["head_rows"].T + head_rows["head_bias"]
        d, t = s[:len(dev_seqs)], s[len(dev_seqs):]
    else:
        d = scorer.score_all(model, dev_seqs, batch_size)
        t = scorer.score_all(model, seqs, batch_size)
    m = evaluate_scores(d, dev_y, t, y)
    return {"task": task.name, "split": split, **m["test"]}
