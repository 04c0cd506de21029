"""Accuracy of a VLM on SynthVQA, unpruned or with a random share of its visual tokens kept.

The unpruned path is the stock one: ``processor(images, text)`` then ``model(**inputs)``. The
answer is the arg-max over the whole vocabulary at the last prompt position (what
``generate(max_new_tokens=1)`` returns). The random-keep path is a self-check of the benchmark
(does losing visual tokens hurt the fine-grained types?), not a reducer: it takes the
post-projector features from ``get_image_features``, keeps a random ``keep_fraction`` of each
image's rows in their original order, and feeds ``inputs_embeds`` with positions renumbered
0..L'-1, as a post-projector pruner that drops tokens would.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

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
    """The model's one-word answer to each sample's question.

    Args:
        model: a ``LlavaNextForConditionalGeneration``.
        processor: its ``LlavaNextProcessor``.
        samples: the items to answer.
        batch_size: images per forward pass.
        keep_fraction: None for the unpruned model, else the share of each image's visual tokens
            kept at random (at least one).
        keep_seed: seed of the random selection.
    """
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    from tokenprune.synth.processor import prompt

    was_training = model.training
    model.eval()
    tok = processor.tokenizer  # type: ignore[attr-defined]
    image_token_id = model.config.image_token_index
    gen = torch.Generator().manual_seed(keep_seed)
    preds: list[str] = [""] * len(samples)
    for idx in size_groups(samples, batch_size):
        images = [Image.fromarray(render(samples[i].scene)[0]) for i in idx]
        encs = [
            processor(images=im, text=prompt(samples[i].qa.question), return_tensors="pt")  # type: ignore[operator]
            for i, im in zip(idx, images, strict=True)
        ]
        pixel_values = torch.cat([e["pixel_values"] for e in encs])
        image_sizes = torch.cat([e["image_sizes"] for e in encs])
        rows = [e["input_ids"][0] for e in encs]
        if keep_fraction is not None:
            feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
            kept = []
            for f in feats:
                k = max(1, round(keep_fraction * f.shape[0]))
                sel = torch.randperm(f.shape[0], generator=gen)[:k].sort().values
                kept.append(f[sel])
            new_rows = []
            for r, kf in zip(rows, kept, strict=True):
                pos = (r == image_token_id).nonzero()[:, 0]
                new_rows.append(torch.cat([r[: pos[0]], r.new_full((kf.shape[0],), image_token_id), r[pos[-1] + 1 :]]))
            rows = new_rows
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):  # right padding: positions stay 0..n-1 for every row
            ids[j, : len(r)] = r
            mask[j, : len(r)] = 1
        if keep_fraction is None:
            logits = model(
                input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes
            ).logits
        else:
            emb_ids = ids.masked_fill(ids == image_token_id, tok.pad_token_id)
            embeds = model.get_input_embeddings()(emb_ids)
            embeds = embeds.masked_scatter((ids == image_token_id)[..., None], torch.cat(kept).to(embeds.dtype))
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        last = mask.sum(1) - 1
        answer_ids = logits[torch.arange(len(rows)), last].argmax(-1)
        for j, i in enumerate(idx):
            preds[i] = tok.convert_ids_to_tokens(int(answer_ids[j]))
    model.train(was_training)
    return preds


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
