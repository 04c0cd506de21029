"""ATP's training data: SynthVQA batches, optionally cut to the evaluation format (one question)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

TASKS = ("synthvqa",)
"""Training tasks :class:`~tokenprune_atp.trainer.ATPTrainConfig` accepts."""
IGNORE = -100
"""The label of positions without a target."""


def training_batch(
    processor: Any, seed: int, step: int, batch_size: int, describe_prob: float, first_only: bool
) -> Any:
    """The SynthVQA training batch of ``step``: a pure function of ``(seed, step)``.

    With ``first_only``, each row is cut after its first question (:func:`first_question`).
    """
    from tokenprune.synth.batches import make_batch

    batch = make_batch(processor.image_processor, seed, step, batch_size, describe_prob=describe_prob)
    return first_question(batch) if first_only else batch


def first_question(batch: Any) -> Any:
    """A SynthVQA training batch cut after each row's first supervised position (its first question).

    ``labels`` holds at each position the id to predict there, so a row ``<s> <image>... q1 a1 q2 ...``
    becomes ``<s> <image>... q1`` with the label ``a1`` at its last token: an evaluation prompt.
    """
    rows = []
    for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels, strict=True):
        supervised = (labels != IGNORE).nonzero()
        end = int(supervised[0]) + 1 if supervised.numel() else int(mask.sum())
        rows.append((ids[:end], labels[:end]))
    length = max(len(r[0]) for r in rows)
    from tokenprune.synth.tokenizer import PAD, vocabulary

    pad = vocabulary().index(PAD)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        labels[i, : len(lab)] = lab
        mask[i, : len(ids)] = 1
    return replace(batch, input_ids=input_ids, attention_mask=mask, labels=labels)
