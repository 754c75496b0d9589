"""Token ids of a suite sample, as MeZO's ``encode_prompt`` makes them without demonstrations
(princeton-nlp/MeZO, large_models/utils.py):

- the prompt is ``encode(sample).strip(' ')``; each candidate's text is
  ``verbalize(sample, candidate).strip(' ')``, fed to the model with leading whitespace removed;
- a candidate's *option length* is the number of tokens its text has beyond the prompt
  (``len(encode(text)) - len(encode(prompt))``, both tokenised whole with special tokens), and
  the last that many tokens are the ones scored or trained;
- a sequence longer than ``max_length`` keeps its end (and its first token when the tokenizer
  adds a BOS token); for generation tasks ``max_length - max_new_tokens`` (room for the answer).
"""

from __future__ import annotations

from dataclasses import dataclass

from zoengine.tasks.data import TaskError
from zoengine.tasks.suite.registry import Sample, TaskSpec

MAX_NEW_TOKENS = 50  # MeZO's run.py: max_new_tokens (generation tasks)


@dataclass
class Encoded:
    """One sequence: ``ids`` (token ids) and ``option_len`` (how many of its last tokens are
    the candidate's)."""

    ids: list
    option_len: int


def token_ids(tok, text: str) -> list[int]:
    """``tok.encode(text)`` with the tokenizer's special tokens, as MeZO tokenises."""
    return list(tok.encode(text))


def truncate(tok, ids: list[int], max_length: int) -> list[int]:
    """The end of ``ids`` (``max_length`` tokens), keeping the first when the tokenizer adds a
    BOS token (MeZO's left truncation)."""
    if len(ids) <= max_length:
        return ids
    if getattr(tok, "add_bos_token", False) and max_length > 1:
        return ids[:1] + ids[1:][-(max_length - 1):]
    return ids[-max_length:]


def room(spec: TaskSpec, max_length: int, max_new_tokens: int = MAX_NEW_TOKENS) -> int:
    """The tokens a sequence of ``spec`` may have: ``max_length``, less the answer's room for a
    generation task."""
    if spec.kind != "generation":
        return max_length
    if max_length <= max_new_tokens:
        raise TaskError("--max-length", f"{max_length}: --task {spec.name} generates up to "
                                        f"{max_new_tokens} tokens after the prompt; must be > "
                                        f"{max_new_tokens}")
    return max_length - max_new_tokens


def prompt_text(spec: TaskSpec, sample: Sample) -> str:
    """The text a generation task continues (MeZO: the prompt, leading whitespace removed)."""
    return spec.encode(sample).strip(" ").lstrip()


def full_text(spec: TaskSpec, sample: Sample, candidate) -> str:
    """The prompt with ``candidate`` (the sequence the model scores or trains on)."""
    return spec.verbalize(sample, candidate).strip(" ").lstrip()


def encode_with(tok, spec: TaskSpec, sample: Sample, candidates, max_length: int
                ) -> list[Encoded]:
    """One ``Encoded`` per candidate of ``candidates`` (module docstring). An option length
    is at least 1 and leaves the first token as context."""
    n_prompt = len(token_ids(tok, spec.encode(sample).strip(" ")))
    keep = room(spec, max_length)
    out = []
    for c in candidates:
        opt = len(token_ids(tok, spec.verbalize(sample, c).strip(" "))) - n_prompt
        ids = truncate(tok, token_ids(tok, full_text(spec, sample, c)), keep)
        out.append(Encoded(ids, max(1, min(opt, len(ids) - 1))))
    return out


def encode_candidates(tok, spec: TaskSpec, sample: Sample, max_length: int) -> list[Encoded]:
    """Every candidate of ``sample`` (classification: each verbalizer word; multiple choice:
    each choice or entity)."""
    return encode_with(tok, spec, sample, sample.candidates, max_length)


def encode_target(tok, spec: TaskSpec, sample: Sample, max_length: int) -> Encoded:
    """The sequence trained by teacher forcing: the prompt with the correct candidate (the
    first answer for a generation task)."""
    return encode_with(tok, spec, sample, [spec.target(sample)], max_length)[0]


def encode_prompt(tok, spec: TaskSpec, sample: Sample, max_length: int,
                  max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """The prompt a generation task decodes from, truncated to leave ``max_new_tokens``."""
    return truncate(tok, token_ids(tok, prompt_text(spec, sample)),
                    room(spec, max_length, max_new_tokens))
