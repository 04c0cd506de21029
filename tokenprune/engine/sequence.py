"""Where each token of a (possibly pruned) sequence came from, and gathers along the sequence axis."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from tokenprune.adapters.base import ImageCall, ModelAdapter, VisualResiduals
from tokenprune.engine import positions as P
from tokenprune.errors import TokenpruneError
from tokenprune.layout import TokenLayout, combine_layouts, sequence_layout
from tokenprune.reducer import Selection


@dataclass
class TokenSequence:
    """The sequence at some point of the language model; per-token fields are ``(B, L)``.

    Attributes:
        input_column: Column of each token in the caller's ``input_ids`` (``-1``: a padding slot the
            engine added when samples kept different numbers of tokens).
        lm_column: Column in the language model's input sequence, i.e. after post_projector stages
            (``-1``: padding slot). Layer stages slice the model's masks and rotary tables with it.
        valid: A real token (attended), not padding.
        visual: A visual token.
        sizes: How many original tokens each token stands for (merges make it > 1).
        layout: The spatial layout of the visual tokens (image, tile, row, column, newline), if known.
        positions: ``(R, B, L)`` position rows (:mod:`tokenprune.engine.positions`).
        freed_positions: ``(R, B)`` positions given up so far under the ``compact`` policy.
        has_padding_slots: Some sample has a padding slot the engine added.
        video: ``(B, L)`` the video tokens among ``visual`` (``None``: no video in the prompt).
        channels: Signal-channel name to ``(B, L, *shape)`` per-column values (:mod:`tokenprune.channels`),
            gathered with the columns (``0`` at padding slots); while their stages run, also the engine's own
            signals (``probe:...``, ``vision:...``), and Qwen3-VL's DeepStack features (``deepstack:...``,
            :mod:`tokenprune.engine.deepstack`).
        mean_channels: The channels a merge averages like the hidden states (each merged token the size-weighted
            mean of its group's values); a merged token keeps its root's value of the others.
    """

    input_column: Tensor
    lm_column: Tensor
    valid: Tensor
    visual: Tensor
    sizes: Tensor
    layout: TokenLayout | None
    positions: Tensor
    freed_positions: Tensor
    has_padding_slots: bool = False
    video: Tensor | None = None
    channels: dict[str, Tensor] = field(default_factory=dict)
    mean_channels: frozenset[str] = frozenset()

    def gather(self, idx: Tensor) -> TokenSequence:
        """The tokens at ``(B, L')`` columns ``idx`` (``-1``: a padding slot)."""
        pad = idx < 0
        safe = idx.clamp(min=0)

        def pick(t: Tensor, fill: Any) -> Tensor:
            return t.gather(1, safe).masked_fill(pad, fill)

        return TokenSequence(
            input_column=pick(self.input_column, -1),
            lm_column=pick(self.lm_column, -1),
            valid=pick(self.valid, False),
            visual=pick(self.visual, False),
            sizes=pick(self.sizes, 0.0),
            layout=self.layout.gather(idx) if self.layout is not None else None,
            positions=P.gather(self.positions, idx),
            freed_positions=self.freed_positions,
            has_padding_slots=bool(pad.any()),
            video=pick(self.video, False) if self.video is not None else None,
            channels={name: _gather_channel(c, idx, pad) for name, c in self.channels.items()},
            mean_channels=self.mean_channels,
        )


def without_channels(seq: TokenSequence, prefix: str) -> TokenSequence:
    """``seq`` without the channels whose name starts with ``prefix`` (the engine's transient ones: ``probe:``,
    ``vision:``; a registered channel's name has no ``:``)."""
    kept = {name: values for name, values in seq.channels.items() if not name.startswith(prefix)}
    return replace(seq, channels=kept) if len(kept) != len(seq.channels) else seq


def _gather_channel(values: Tensor, idx: Tensor, pad: Tensor) -> Tensor:
    """``(B, L', ...)`` per-column ``values`` at columns ``idx`` (zeros where ``pad``)."""
    out = gather_tokens(values, idx)
    return out.masked_fill(pad.view(*pad.shape, *([1] * (out.dim() - 2))), 0)


def residual_sequence(residuals: VisualResiduals, batch: int, length: int) -> tuple[Tensor, Tensor]:
    """Per-column ``(B, L, layers, D)`` features and ``(B, L)`` receivers from a :class:`VisualResiduals`.

    Raises:
        TokenpruneError: the mask is not ``(B, L)`` or a layer's features do not have one row per marked token.
    """
    mask = residuals.mask.to(torch.bool)
    first = residuals.features[0]
    count = int(mask.sum())
    if tuple(mask.shape) != (batch, length) or any(int(f.shape[0]) != count for f in residuals.features):
        raise TokenpruneError(
            f"per-layer visual features: a mask of shape {tuple(mask.shape)} with {count} marked tokens and features "
            f"of {[tuple(f.shape) for f in residuals.features]} rows do not fit a ({batch}, {length}) sequence"
        )
    out = first.new_zeros(batch, length, len(residuals.features), first.shape[-1])
    out[mask.to(out.device)] = torch.stack([f.to(out.device) for f in residuals.features], 1)
    return out, mask


def input_sequence(
    hidden: Tensor,
    valid: Tensor,
    visual: Tensor,
    layout: TokenLayout | None,
    position_ids: Tensor | None,
    *,
    video: Tensor | None = None,
) -> tuple[TokenSequence, P.PositionFormat]:
    """The language model's unpruned input as a :class:`TokenSequence`, and the format of its position ids.

    Args:
        hidden: ``(B, L, D)`` ``inputs_embeds``.
        valid: ``(B, L)`` the caller's 2-D mask.
        visual: ``(B, L)`` visual tokens.
        layout: The visual tokens' layout, if known.
        position_ids: As the language model received them (``None``: ``0..L-1``).
        video: ``(B, L)`` the video tokens among ``visual``.
    """
    batch, length = int(hidden.shape[0]), int(hidden.shape[1])
    device = hidden.device
    if position_ids is None:
        rows, fmt = torch.arange(length, device=device)[None, None].expand(1, batch, -1), P.PositionFormat(2)
    else:
        rows, fmt = P.to_rows(position_ids, batch)
    columns = torch.arange(length, device=device).expand(batch, -1)
    seq = TokenSequence(
        input_column=columns,
        lm_column=columns,
        valid=valid,
        visual=visual,
        sizes=torch.ones(batch, length, device=device),
        layout=layout,
        positions=rows,
        freed_positions=torch.zeros(rows.shape[0], batch, dtype=torch.long, device=device),
        video=video if video is not None and bool(video.any()) else None,
    )
    return seq, fmt


def visual_layout(
    adapter: ModelAdapter,
    image_call: ImageCall | None,
    video_call: ImageCall | None,
    visual: Tensor,
    video: Tensor | None,
) -> TokenLayout | None:
    """The ``(B, L)`` layout of the image and video tokens, from the recorded calls (``None``: a call is missing)."""
    video = video if video is not None else torch.zeros_like(visual)
    images = videos = None
    if bool((visual & ~video).any()):
        if image_call is None:
            return None
        images = image_layout(adapter, image_call, visual & ~video)
    if bool(video.any()):
        if video_call is None:
            return None
        videos = image_layout(adapter, video_call, video, videos=True)
    return combine_layouts(images, videos, video)


def image_layout(adapter: ModelAdapter, call: ImageCall, visual: Tensor, *, videos: bool = False) -> TokenLayout:
    """The ``(B, L)`` layout of the sequence from the adapter's per-image (or per-video) layouts of ``call``.

    Raises:
        TokenpruneError: the layouts do not cover exactly the tokens the adapter's visual mask marks.
    """
    layouts = adapter.video_layouts(call) if videos else adapter.image_layouts(call)
    try:
        return sequence_layout(layouts, visual)
    except ValueError:
        sizes, counts = [int(lay.shape[1]) for lay in layouts], visual.sum(1).tolist()
        raise TokenpruneError(
            f"adapter {adapter.name!r}: {'video' if videos else 'image'}_layouts() describes {sizes} tokens, but "
            f"{'video' if videos else 'visual'}_mask() marks "
            f"{counts} visual tokens per sample; the layouts must cover exactly the tokens the mask marks "
            "(check tokenprune.testing.adapters.check_layout_covers_visual_tokens)"
        ) from None


def right_aligned_columns(keep: Tensor) -> Tensor:
    """``(B, L')`` indices of the ``True`` columns of ``(B, L)`` ``keep``, right-aligned, ``-1`` on the left.

    Samples that keep fewer tokens are left-padded, as a tokenizer left-pads a batch.
    """
    sel = Selection.from_mask(keep)
    width = sel.indices.shape[1]
    shift = width - sel.counts
    j = torch.arange(width, device=keep.device).expand(keep.shape[0], -1)
    src = j - shift.unsqueeze(1)
    return sel.indices.gather(1, src.clamp(min=0)).masked_fill(src < 0, -1)


def gather_tokens(t: Tensor, idx: Tensor) -> Tensor:
    """Gather dim 1 of ``(B or 1, L, ...)`` ``t`` at ``(B, L')`` ``idx`` (``-1`` reads column 0).

    Whole rows are copied with one ``index_select`` over the flattened batch where ``t``'s first two
    axes merge without a copy (about ten times faster on a CPU than ``gather``, which reads an index
    per element); otherwise ``gather``.
    """
    batch, width = idx.shape
    rest = t.shape[2:]
    if t.shape[0] == 1 or t.stride(0) == t.stride(1) * t.shape[1]:
        flat_idx = idx.clamp(min=0)
        if t.shape[0] == 1:
            rows = t[0]
        else:
            rows = t.flatten(0, 1)
            flat_idx = flat_idx + torch.arange(batch, device=idx.device).unsqueeze(1) * t.shape[1]
        return rows.index_select(0, flat_idx.reshape(-1)).view(batch, width, *rest)
    t = t.expand(batch, *t.shape[1:])
    shape = (batch, idx.shape[1], *t.shape[2:])
    index = idx.clamp(min=0).view(batch, idx.shape[1], *([1] * (t.dim() - 2))).expand(shape)
    return t.gather(1, index)


def gather_kept_rows(hidden: Tensor, idx: Tensor) -> Tensor:
    """``(B, L', D)`` rows of ``hidden`` at the right-aligned columns ``idx`` of :func:`right_aligned_columns`,
    zeros in its ``-1`` padding slots (a single sample has none: its width is its own count)."""
    rows = gather_tokens(hidden, idx)
    if idx.shape[0] > 1:
        rows.masked_fill_((idx < 0).unsqueeze(-1), 0.0)
    return rows


def gather_position_ids(t: Tensor, idx: Tensor) -> Tensor:
    """Gather the last (sequence) axis of ``(B, L)`` or ``(R, B, L)`` position ids at ``(B, L')`` ``idx``."""
    if t.dim() == 2:
        return t.expand(idx.shape[0], -1).gather(1, idx.clamp(min=0))
    return t.expand(-1, idx.shape[0], -1).gather(2, idx.clamp(min=0).unsqueeze(0).expand(t.shape[0], -1, -1))


def position_ids_like(positions: Tensor, like: Tensor) -> Tensor:
    """``(R, B, L)`` position rows in the format of ``like`` (``(B, L)`` or ``(R', B, L)``)."""
    if like.dim() == 2:
        return positions[0]
    return positions[-like.shape[0] :]


def kept_labels(labels: Tensor, final: TokenSequence | None) -> Tensor:
    """``(B, L)`` labels of the input sequence cut to the sequence the last layer saw (``-100`` at new padding)."""
    if final is None:
        return labels
    return labels.gather(1, final.input_column.clamp(min=0)).masked_fill(final.input_column < 0, -100)
