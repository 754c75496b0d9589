"""Classification metrics: accuracy, AUC (binary and macro one-vs-rest) and the per-option
bias fitted on dev data (the dev-calibrated zero-shot baseline)."""

from __future__ import annotations

import numpy as np
import torch


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
