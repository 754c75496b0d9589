"""The suite's metrics, as MeZO computes them (princeton-nlp/MeZO, large_models/metrics.py):
accuracy (a prediction is right when it is one of the correct candidates), and token F1 /
exact match after SQuAD's answer normalisation (lower case, no punctuation, no articles
a/an/the, single spaces), the best over the reference answers."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
NO_ANSWER = ("CANNOTANSWER", "no answer")


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower-case, drop punctuation, drop articles, collapse spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised tokens (bag of words) of one prediction against one reference."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, references: list[str]) -> float:
    """The best token F1 over ``references``; a first reference 'CANNOTANSWER' or 'no answer'
    asks for that exact (normalised) answer, as MeZO's ``f1``."""
    if not references:
        raise ValueError("references: empty; needs at least one answer")
    if references[0] in NO_ANSWER:
        return float(normalize_answer(references[0]) == normalize_answer(prediction))
    return max(token_f1(prediction, r) for r in references)


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference."""
    p = normalize_answer(prediction)
    return float(any(normalize_answer(r) == p for r in references))


def accuracy(predicted: list[int], gold: list[list[int]]) -> float:
    """Share of predictions that are among their row's correct candidates."""
    if not predicted:
        raise ValueError("predicted: empty")
    return sum(p in g for p, g in zip(predicted, gold, strict=True)) / len(predicted)


def mean(values) -> float:
    values = list(values)
    if not values:
        raise ValueError("values: empty")
    return sum(values) / len(values)


def measure(spec, samples: list, predictions: list) -> dict:
    """The metrics of ``predictions`` (``scoring.predict``'s) on ``samples``: ``metric`` names
    the task's headline metric (accuracy or f1, as MeZO reports it), ``n`` the rows, and the
    task's ``extra_metrics`` (f1 / em of the predicted text against the references)."""
    if len(samples) != len(predictions):
        raise ValueError(f"predictions: {len(predictions)} for {len(samples)} samples")
    out: dict = {"metric": spec.metric, "n": len(samples)}
    if spec.kind == "generation":
        texts, refs = list(predictions), [s.gold for s in samples]
    else:
        out["accuracy"] = accuracy(list(predictions), [s.gold for s in samples])
        texts = [s.candidates[p] for s, p in zip(samples, predictions)]
        refs = [[s.candidates[g] for g in s.gold] for s in samples]
    wanted = {spec.metric, *spec.extra_metrics}
    if "f1" in wanted:
        out["f1"] = mean(f1(t, r) for t, r in zip(texts, refs))
    if "em" in wanted:
        out["em"] = mean(exact_match(t, r) for t, r in zip(texts, refs))
    return out
