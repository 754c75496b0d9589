"""The training job behind ``zoengine train`` / ``zoengine eval``: the ZO loop and its set-up.
Scoring lives in ``zoengine.scoring``, metrics in ``zoengine.metrics``, outputs in
``zoengine.outputs`` (re-exported here).

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

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from zoengine.data import ClassificationTask, LMTask, TaskError, column, load_task
from zoengine.metrics import auc, auc_binary, class_metrics, evaluate_scores, fit_bias  # noqa: F401
from zoengine.outputs import (  # noqa: F401
    _tmp_name,
    atomic_dir,
    atomic_write,
    clean_stale_temps,
    make_tmpdir,
    plot_curve,
    run_summary_json,
    summary_lines,
)
from zoengine.scoring import (  # noqa: F401
    OptionScorer,
    encode_prompts,
    last_features,
    left_pad,
    length_batches,
    lm_blocks,
    lm_eval,
    lm_loss,
)

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


def balanced_batch(rng: np.random.RandomState, by_class: list[np.ndarray], size: int):
    """Indices with an equal share of every class (the first classes take the remainder)."""
    k = len(by_class)
    counts = [size // k + (1 if c < size % k else 0) for c in range(k)]
    return np.concatenate([rng.choice(by_class[c], counts[c], replace=len(by_class[c]) <
                                      counts[c]) for c in range(k)])


def count_params(params) -> int:
    return int(sum(p.numel() for p in params))


def now() -> float:
    return time.perf_counter()


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
    cfg.eval_batch_size = min(cfg.eval_batch_size, plan.batch_size)  # the budget covers eval too
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

