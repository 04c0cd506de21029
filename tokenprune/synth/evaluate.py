"""Accuracy of a VLM on SynthVQA, unpruned or with a random share of its visual tokens kept.

The unpruned path is the stock one: ``processor(images, text)`` then ``generate(max_new_tokens=1)``:
the arg-max over the whole vocabulary at the last prompt position. The random-keep path is a
self-check of the benchmark (does losing visual tokens hurt the fine-grained types?): the same
calls inside :func:`tokenprune.apply` with the ``random`` reducer after the projector
(:func:`random_pipeline`).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

import tokenprune as tp
from tokenprune.errors import TokenpruneError
from tokenprune.synth.questions import QUESTION_TYPES, Sample
from tokenprune.synth.scenes import render


@dataclass
class EvalResult:
    """Accuracy per question type and overall (the mean over items)."""

    per_type: dict[str, float]
    overall: float
    n: int
    counts: dict[str, int] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)

    def table(self) -> str:
        """A one-line-per-type plain text table."""
        rows = [f"{t:<12} {a:6.3f}  (n={self.counts.get(t, 0)})" for t, a in self.per_type.items()]
        return "\n".join([*rows, f"{'overall':<12} {self.overall:6.3f}  (n={self.n})"])


def size_groups(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Indices of ``samples`` in batches of one image size each (no padded views)."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_size[(s.scene.height, s.scene.width)].append(i)
    out: list[list[int]] = []
    for idx in by_size.values():
        out += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    return out


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    processor: object,
    samples: list[Sample],
    batch_size: int = 50,
    keep_fraction: float | None = None,
    keep_seed: int = 0,
) -> list[str]:
    """The model's one-word answer to each sample's question (greedy, one new token).

    Args:
        model: a ``LlavaNextForConditionalGeneration``.
        processor: its ``LlavaNextProcessor``.
        samples: the items to answer.
        batch_size: images per forward pass.
        keep_fraction: None for the unpruned model, else the share of each image's visual tokens
            kept by the ``random`` reducer after the projector (:func:`random_pipeline`).
        keep_seed: seed of the random selection.
    """
    pruning = nullcontext() if keep_fraction is None else tp.apply(model, random_pipeline(keep_fraction, keep_seed))
    was_training = model.training
    model.eval()
    preds: list[str] = [""] * len(samples)
    try:
        with pruning:
            for idx in size_groups(samples, batch_size):
                for i, answer in zip(idx, _answer(model, processor, [samples[i] for i in idx]), strict=True):
                    preds[i] = answer
    finally:
        model.train(was_training)
    return preds


def random_pipeline(keep_fraction: float, seed: int) -> tp.Pipeline:
    """The self-check's pruning: the ``random`` reducer after the projector, over every visual token.

    Newline tokens are not protected (``protect_newlines: false``: the share is of every token, newlines
    drawn like the others) and the kept tokens get compact positions, so the self-check measures
    what losing visual tokens costs with nothing held back. ``tokenprune compare``'s ``random-…%``
    pipelines keep the defaults instead (newlines protected inside the budget, original positions),
    which leaves fewer grid tokens at the same share.

    Raises:
        TokenpruneError: ``keep_fraction`` is not in ``(0, 1]``, or no ``random`` reducer is installed.
    """
    if not 0 < keep_fraction <= 1:
        raise TokenpruneError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    stage = {"at": "post_projector", "reducer": "random", "keep": keep_fraction, "params": {"seed": seed}}
    definition = {"name": f"random-{keep_fraction:g}", "protect_newlines": False, "positions": "compact"}
    return tp.load_pipeline({**definition, "stages": [stage]})


def _answer(model: torch.nn.Module, processor: Any, batch: list[Sample]) -> list[str]:
    """Greedy first token for each sample of ``batch`` (one image size), left-padded like ``generate`` wants."""
    from tokenprune.synth.processor import prompt

    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    images = [Image.fromarray(render(s.scene)[0]) for s in batch]
    texts = [prompt(s.qa.question) for s in batch]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.convert_ids_to_tokens(out[:, -1].tolist())


def evaluate(model: torch.nn.Module, processor: object, samples: list[Sample], **options: Any) -> EvalResult:
    """Accuracy per question type (exact match of the one-word answer) of :func:`predict`'s answers.

    ``options`` go to :func:`predict` (``batch_size``, ``keep_fraction``, ``keep_seed``).
    """
    preds = predict(model, processor, samples, **options)
    hits: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for s, p in zip(samples, preds, strict=True):
        counts[s.qa.qtype] += 1
        hits[s.qa.qtype] += int(p == s.qa.answer)
    per_type = {t: hits[t] / counts[t] for t in QUESTION_TYPES if counts[t]}
    n = len(samples)
    return EvalResult(per_type, sum(hits.values()) / max(1, n), n, dict(counts), preds)
