"""Metrics of a comparison: accuracy against references, and fidelity to the unpruned model.

* ``accuracy``: exact match of the normalised prediction with any normalised reference answer.
* ``vqa_score``: the VQA soft score, ``min(1, matches / 3)`` over the reference answers (the
  VQAv2 / TextVQA metric for ten human answers); with fewer than three references the divisor is
  their number, so a single reference gives exact match.
* ``agreement``: the pruned model's normalised answer equals the unpruned model's (no labels needed).
* ``kl``: ``KL(p_unpruned || p_pruned)`` of the first answer token's next-token distribution, in nats
  (no labels needed).

Normalisation follows the VQA evaluation: lower case, punctuation removed (except inside numbers),
number words to digits, articles dropped, whitespace collapsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:']")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: ``"Two dogs."`` -> ``"2 dogs"``."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _PERIOD.sub("", _PUNCT.sub(" ", text))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """``min(1, #references equal to the prediction / min(3, #references))``, after normalisation."""
    if not answers:
        return 0.0
    p = normalize_answer(prediction)
    return min(1.0, sum(p == normalize_answer(a) for a in answers) / min(3, len(answers)))


def kl_divergence(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` in nats, over the last axis, computed in float32."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    new = torch.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - new)).sum(-1).clamp(min=0.0)
