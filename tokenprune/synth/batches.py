"""Training batches: several supervised question/answer pairs per image, in one sequence.

A training sequence is ``<s> <image>*N q1 a1 </s> q2 a2 </s> ... [describe : caption </s>]``: every
applicable question about the image in a random order (the held-out evaluation asks one question
right after the image, which is the first slot here), each answer closed by ``</s>``. The loss
covers the answer words and their ``</s>``. All images of a
batch have the same size, so no visual token is padding; the batch for a step is a pure function
of ``(seed, step)``, which makes training resumable exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tokenprune.synth.patch_labels import BASE_VIEW_TOKENS, packed_owners, patch_labels
from tokenprune.synth.processor import num_image_tokens
from tokenprune.synth.questions import HELDOUT_BASE, MAX_SHAPES, grounding_target, training_item
from tokenprune.synth.scenes import IMAGE_SIZES, SHAPE_COLOURS, SHAPE_KINDS, render
from tokenprune.synth.tokenizer import BOS, EOS, IMAGE, PAD, vocabulary

IGNORE = -100


@dataclass
class TrainBatch:
    """One training batch.

    Attributes:
        input_ids: (B, L) token ids, right-padded with ``<pad>``.
        attention_mask: (B, L) 1 on real tokens.
        labels: (B, L) the id to predict *at* each position (already shifted), ``-100`` elsewhere.
        pixel_values: (B, n_views, 3, 32, 32) normalised anyres views.
        image_sizes: (B, 2) (height, width) of the images.
        patch_labels: (B * n_views, 64, 4) kind / colour / digit / quadrant class per vision patch.
        ground_rows: (N,) batch row of each grounded question.
        ground_heads: (N,) attention head of the grounding layer trained on it (0 unless
            ``exists_head`` moves ``is there ...`` questions to another head).
        ground_query: (N,) the position where an answer word is predicted: the question's last
            token for the first word, the previous answer word for the next (a position question's
            answer has two words, each grounded).
        ground_targets: (N, L) True on the visual tokens of the object the question is about (for
            a position question, on its base-view tokens if it owns any; for an existence question
            answered "no", on ``<s>`` at position 0).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_sizes: torch.Tensor
    patch_labels: torch.Tensor
    ground_rows: torch.Tensor
    ground_heads: torch.Tensor
    ground_query: torch.Tensor
    ground_targets: torch.Tensor
    question_rows: torch.Tensor
    question_query: torch.Tensor
    question_labels: torch.Tensor


def curriculum_max_shapes(step: int, total_steps: int, ramp_fraction: float) -> int:
    """Max shapes per scene: 1 at the start, growing by one per ``ramp_fraction / 3`` of training."""
    if ramp_fraction <= 0:
        return MAX_SHAPES
    stage = int(step / max(1.0, total_steps * ramp_fraction / (MAX_SHAPES - 1)))
    return min(MAX_SHAPES, 1 + stage)


def check_exists_grounding(ground_absent: bool, exists_head: int | None, heads: int | None = None) -> None:
    """Raise ValueError unless the two ways of grounding ``is there ...`` questions fit together.

    ``heads`` (the grounding layer's head count), when given, also bounds ``exists_head``: head 0
    grounds the other questions, so the existence check needs one of heads ``1..heads-1``.
    """
    if ground_absent and exists_head is not None:
        raise ValueError("ground_absent and exists_head both ground 'no' answers; choose one")
    if exists_head is not None and heads is not None and not 0 < exists_head < heads:
        raise ValueError(
            f"exists_head={exists_head} must name one of heads 1..{heads - 1} of the grounding "
            "layer (head 0 grounds the other questions)"
        )


def _grounded_positions(qtype: str, target: int | None, owners: np.ndarray, ground_no: bool) -> np.ndarray | None:
    """Sequence positions a question's answer is grounded on: the named object's tokens (only its
    base-view tokens for ``where`` questions, when it has some), ``<s>`` (position 0) for an existence
    question answered "no" when ``ground_no``, else ``None``."""
    if target is None:
        return np.zeros(1, dtype=np.int64) if ground_no and qtype == "exists" else None
    on_object = owners == target + 1
    if qtype == "position" and on_object[:BASE_VIEW_TOKENS].any():
        on_object[BASE_VIEW_TOKENS:] = False  # only base-view tokens know their quadrant
    return 1 + np.nonzero(on_object)[0] if on_object.any() else None


def _append_qa(seq: list[int], tgt: list[int], question: str, answer: str, vocab: dict[str, int]) -> None:
    """Append a question, its answer and ``</s>`` to a row; the answer's tokens and ``</s>`` are the
    targets (the token at position p is predicted at position p - 1)."""
    q = [vocab[w] for w in question.split()]
    a = [vocab[w] for w in answer.split()] + [vocab[EOS]]
    seq += q + a
    tgt += [IGNORE] * (len(q) - 1) + a + [IGNORE]


def _grounding_tensors(grounds: list[tuple[int, int, int, np.ndarray]], length: int) -> dict[str, Tensor]:
    """The batch's grounding fields from ``(row, head, query, positions)`` entries."""
    targets = torch.zeros((len(grounds), length), dtype=torch.bool)
    for j, (*_, positions) in enumerate(grounds):
        targets[j, torch.from_numpy(positions)] = True
    return {
        "ground_rows": torch.tensor([g[0] for g in grounds], dtype=torch.long),
        "ground_heads": torch.tensor([g[1] for g in grounds], dtype=torch.long),
        "ground_query": torch.tensor([g[2] for g in grounds], dtype=torch.long),
        "ground_targets": targets,
    }


def _right_padded(seqs: list[list[int]], tgts: list[list[int]], pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, labels)``, each ``(B, L)``, right-padded to the longest row."""
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, (s, t) in enumerate(zip(seqs, tgts, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(t)] = torch.tensor(t)
        mask[i, : len(s)] = 1
    return input_ids, mask, labels


def make_batch(
    image_processor: object,
    seed: int,
    step: int,
    batch_size: int,
    max_shapes: int = MAX_SHAPES,
    describe_prob: float = 0.5,
    ground_absent: bool = False,
    exists_head: int | None = None,
    extra_exists: int = 0,
) -> TrainBatch:
    """The training batch of ``step`` for ``seed`` (deterministic).

    ``ground_absent`` adds a grounding target for ``is there ...`` questions answered "no": the
    ``<s>`` token at position 0, which every position sees. The head then has somewhere to look
    when nothing matches both the colour and the kind, and its output tells found from not found.
    Off by default: in the one run that used it, the head learned this but colour-of-a-named-shape
    and position stalled near 0.6 (docs/synth-training-log.md, run 6).

    ``exists_head`` gives the existence check a head of its own: every ``is there ...`` question
    is grounded on head ``exists_head`` instead of head 0, on the named object when it is there
    and on ``<s>`` when it is not. Head 0 keeps finding the objects the other questions name.
    ``extra_exists`` asks that many more existence questions per image (:func:`training_item`).
    """
    check_exists_grounding(ground_absent, exists_head)
    rng = np.random.default_rng([seed, step, 0xBA7C])
    size = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    ids = rng.integers(0, HELDOUT_BASE, size=batch_size)
    vocab = {w: i for i, w in enumerate(vocabulary())}
    n_img, colour_names = num_image_tokens(*size), list(SHAPE_COLOURS)
    seqs: list[list[int]] = []
    tgts: list[list[int]] = []
    images: list[Image.Image] = []
    plabels: list[np.ndarray] = []
    grounds: list[tuple[int, int, int, np.ndarray]] = []
    asks: list[tuple[int, int, int, int]] = []  # (row, query, colour, kind) of existence questions
    for row, sid in enumerate(ids):
        scene, qas = training_item(
            int(sid), max_shapes=max_shapes, describe_prob=describe_prob, size=size, extra_exists=extra_exists
        )
        img, omap = render(scene)
        images.append(Image.fromarray(img))
        plabels.append(patch_labels(scene, omap))
        owners = packed_owners(scene, omap)
        seq, tgt = [vocab[BOS]] + [vocab[IMAGE]] * n_img, [IGNORE] * (1 + n_img)
        for qa in qas:
            query = len(seq) + len(qa.question.split()) - 1  # the answer is predicted at the question's last token
            if qa.qtype == "exists":  # is there a <colour> <kind> ?
                words = qa.question.split()
                asks.append((row, query, colour_names.index(words[3]), SHAPE_KINDS.index(words[4])))
            head = exists_head if exists_head is not None and qa.qtype == "exists" else 0
            target = grounding_target(scene, qa)
            positions = _grounded_positions(qa.qtype, target, owners, ground_absent or exists_head is not None)
            if positions is not None:
                grounds += [(row, head, query + k, positions) for k in range(len(qa.answer.split()))]
            _append_qa(seq, tgt, qa.question, qa.answer, vocab)
        seqs.append(seq)
        tgts.append(tgt[: len(seq)])
    input_ids, mask, labels = _right_padded(seqs, tgts, vocab[PAD])
    pv = image_processor(images=images, return_tensors="pt")  # type: ignore[operator]
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        pixel_values=pv["pixel_values"],
        image_sizes=pv["image_sizes"],
        patch_labels=torch.from_numpy(np.concatenate(plabels)),
        **_grounding_tensors(grounds, int(input_ids.shape[1])),
        question_rows=torch.tensor([a[0] for a in asks], dtype=torch.long),
        question_query=torch.tensor([a[1] for a in asks], dtype=torch.long),
        question_labels=torch.tensor([a[2:] for a in asks], dtype=torch.long).reshape(-1, 2),
    )
