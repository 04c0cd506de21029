"""Accuracy of a VLM on SynthVQA, unpruned or with a random share of its visual tokens kept.

The unpruned path is the stock one: ``processor(images, text)`` then greedy ``generate`` until the
model's ``</s>`` (at most :data:`MAX_ANSWER_TOKENS` new tokens); the answer is the words before
``</s>``, compared exactly with the expected answer. The random-keep path is a
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

#: New tokens generated per answer: the longest evaluated answer (two words) and ``</s>``, with room.
MAX_ANSWER_TOKENS = 6


@dataclass
class EvalResult:
    """Accuracy per question type and overall (the mean over items).

    ``answer_lengths[i]`` is the number of tokens the model generated for item ``i`` up to and
    including ``</s>``, or None when it did not end within the cap.
    """

    per_type: dict[str, float]
    overall: float
    n: int
    counts: dict[str, int] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)
    answer_lengths: list[int | None] = field(default_factory=list)

    def ended_with_eos(self, within: int = 4) -> float:
        """Share of the answers that ended with ``</s>`` within ``within`` generated tokens."""
        ended = sum(1 for n in self.answer_lengths if n is not None and n <= within)
        return ended / max(1, len(self.answer_lengths))

    def table(self) -> str:
        """A one-line-per-type plain text table."""
        rows = [f"{t:<12} {a:6.3f}  (n={self.counts.get(t, 0)})" for t, a in self.per_type.items()]
        eos = f"{'ended </s>':<12} {self.ended_with_eos():6.3f}  (within 4 tokens)"
        return "\n".join([*rows, f"{'overall':<12} {self.overall:6.3f}  (n={self.n})", eos])


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
    max_new_tokens: int = MAX_ANSWER_TOKENS,
) -> list[tuple[str, int | None]]:
    """The model's answer to each sample's question, greedy until ``</s>``.

    Args:
        model: a ``LlavaNextForConditionalGeneration``.
        processor: its ``LlavaNextProcessor``.
        samples: the items to answer.
        batch_size: images per forward pass.
        keep_fraction: None for the unpruned model, else the share of each image's visual tokens
            kept by the ``random`` reducer after the projector (:func:`random_pipeline`).
        keep_seed: seed of the random selection.
        max_new_tokens: the cap on generated tokens per answer.

    Returns:
        Per sample, the answer (the generated words before ``</s>``, space-separated) and the
        number of tokens generated up to and including ``</s>`` (None: no ``</s>`` within the cap).
    """
    pruning = nullcontext() if keep_fraction is None else tp.apply(model, random_pipeline(keep_fraction, keep_seed))
    was_training = model.training
    model.eval()
    preds: list[tuple[str, int | None]] = [("", None)] * len(samples)
    try:
        with pruning:
            for idx in size_groups(samples, batch_size):
                answers = answer_batch(model, processor, [samples[i] for i in idx], max_new_tokens)
                for i, answer in zip(idx, answers, strict=True):
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


def answer_batch(
    model: torch.nn.Module, processor: Any, batch: list[Sample], max_new_tokens: int
) -> list[tuple[str, int | None]]:
    """Greedy answers for ``batch`` (one image size), left-padded like ``generate`` wants."""
    from tokenprune.synth.processor import prompt

    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    images = [Image.fromarray(render(s.scene)[0]) for s in batch]
    texts = [prompt(s.qa.question) for s in batch]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [_until_eos(row, tokenizer) for row in out[:, inputs["input_ids"].shape[1] :].tolist()]


def _until_eos(generated: list[int], tokenizer: Any) -> tuple[str, int | None]:
    """The words before the first ``</s>`` and the number of tokens up to it (None: no ``</s>``)."""
    eos = tokenizer.eos_token_id
    length = generated.index(eos) + 1 if eos in generated else None
    words = generated[: length - 1] if length is not None else generated
    tokens = tokenizer.convert_ids_to_tokens(words)  # None for the unused ids above the vocabulary
    return " ".join(t if t is not None else tokenizer.unk_token for t in tokens), length


def evaluate(model: torch.nn.Module, processor: object, samples: list[Sample], **options: Any) -> EvalResult:
    """Accuracy per question type (exact match of the answer words) of :func:`predict`'s answers.

    ``options`` go to :func:`predict` (``batch_size``, ``keep_fraction``, ``keep_seed``,
    ``max_new_tokens``).
    """
    answers = predict(model, processor, samples, **options)
    preds = [a for a, _ in answers]
    hits: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for s, p in zip(samples, preds, strict=True):
        counts[s.qa.qtype] += 1
        hits[s.qa.qtype] += int(p == s.qa.answer)
    per_type = {t: hits[t] / counts[t] for t in QUESTION_TYPES if counts[t]}
    n = len(samples)
    lengths = [n for _, n in answers]
    return EvalResult(per_type, sum(hits.values()) / max(1, n), n, dict(counts), preds, lengths)
