"""Gemma 4 (``gemma4``): the generic adapter plus vision attention on its own tower, for images and videos.

Everything else about Gemma 4 (variable-aspect layouts from ``image_position_ids``, video frames from
``video_position_ids`` and ``num_frames_per_video``, per-layer embeddings, KV sharing, per-layer-type rotary) is the
generic adapter's; :class:`Gemma4Adapter` adds the tower (transformers 5.18 to 5.25 ``modeling_gemma4.py``):

* **The tower** (``Gemma4VisionModel``, the base model's ``vision_tower``): one sequence per image (per video frame)
  of ``max_patches`` patch rows, each with its ``(x, y)`` in ``pixel_position_ids`` (``(-1, -1)`` on padding, which
  the bidirectional mask hides as keys); no CLS token. Its encoder layers (``encoder.layers``) dispatch their
  attention through ``ALL_ATTENTION_FUNCTIONS`` with the vision config's ``_attn_implementation``, so the vision
  probe reads them; the default probed layer is the last one, whose output the pooler reads.
* **Pooling** (``Gemma4VisionPooler._avg_pool_by_positions``): the padding patches zeroed, patch ``(x, y)`` goes to
  token ``x // k + (X // k) * (y // k)`` (``k`` the ``pooling_kernel_size``, ``X`` one more than the sequence's
  largest ``x``), weight ``1 / k^2``; the tokens with a patch kept in that (row-major) order, the padding stripped.
  Each token is thus the mean of its ``k x k`` block of patches (:func:`pooled_patch_means`), then standardized and
  embedded (``embed_vision``) token by token.
* **Videos** run through the same tower, one sequence per frame (``get_video_features``), so the tower is watched
  there too (``VisionTower.videos``): a video's tokens are its frames' pooled tokens one frame after the other, as
  :func:`~tokenprune.adapters.frame_layouts.positioned_video_layouts` lays them out.

Not served: ``pre_projector`` and ``vision_layer`` stages. The per-token embedder's input is the pooled tokens (one
row per ``k x k`` block of patches, every image's rows flattened together), not one tower patch per row of a tower
sequence, which those stages reduce; the pooler itself mixes ``k^2`` patches into each token. Gemma 4 Unified
(``gemma4_unified``) has no tower (its patches are embedded directly) and stays with the generic adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.generic import GenericAdapter
from tokenprune.adapters.shape import refusal
from tokenprune.engine import compat
from tokenprune.errors import UnsupportedModelError


class Gemma4Adapter(GenericAdapter):
    """Gemma 4: the generic adapter plus vision attention on its tower, each token the mean of its pooled
    ``k x k`` patches, for images and video frames."""

    name = "gemma4"
    model_types = ("gemma4",)
    notes = "generic adapter + vision attention on images and videos (each token the mean of its k x k pooled patches)"
    pre_projector_refusal = (
        "its tower pools each k x k block of patches into one token by the patches' positions "
        "(Gemma4VisionPooler) before the per-token embedder, whose input is the pooled tokens of every image "
        "flattened together, not one tower patch per row of each tower sequence; pre_projector and vision_layer "
        "stages are not served for gemma4 (vision attention is served at post_projector)"
    )

    def __init__(self, model: nn.Module) -> None:
        """The generic adapter's shape checks still apply (:func:`~tokenprune.adapters.shape.refusal`: a Gemma 4
        assistant, whose every layer reuses another model's keys and values, is refused).

        Raises:
            UnsupportedModelError: the model lacks the shape the generic adapter serves, naming the reason.
        """
        reason = refusal(model)
        if reason is not None:
            raise UnsupportedModelError(f"model_type 'gemma4': the gemma4 adapter cannot serve it: {reason}")
        super().__init__(model)

    def pooling(self) -> int:
        """The tower's ``pooling_kernel_size`` ``k``: each token pools ``k x k`` patches."""
        return int(self.tower().config.pooling_kernel_size)

    def vision_tower(self) -> VisionTower | None:
        """The encoder layers, probed at the last (the pooler's input); no CLS token; videos through the same tower."""
        layers = tuple(self.tower().encoder.layers)
        return VisionTower(
            name=type(self.tower()).__name__,
            layers=layers,
            feature_layer=len(layers) - 1,
            has_cls=False,
            notes="last layer (the pooler's input); no CLS token: rank by attention: mean",
            videos=True,
        )

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per image (``image_position_ids`` rows): each token the mean of its pooled patches."""
        positions = call.argument("image_position_ids", self.vlm().get_image_features)
        if not _positions(positions) or positions.shape[0] != len(values):
            return None
        return [pooled_patch_means(p, v, self.pooling()) for p, v in zip(positions, values, strict=True)]

    def map_vision_video_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per frame: per video, its frames' pooled tokens one frame after the other."""
        method = self.vlm().get_video_features
        positions, frames = compat.flat_video_frames(
            call.argument("video_position_ids", method), call.argument("num_frames_per_video", method)
        )
        if not _positions(positions) or positions.shape[0] != len(values) or frames is None:
            return None
        per_frame = [pooled_patch_means(p, v, self.pooling()) for p, v in zip(positions, values, strict=True)]
        counts = [int(n) for n in (frames.tolist() if isinstance(frames, Tensor) else frames)]
        if sum(counts) != len(per_frame):
            return None
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [torch.cat(per_frame[s : s + n]) for s, n in zip(starts, counts, strict=True)]


def _positions(value: Any) -> bool:
    """``value`` is an ``(N, P, 2)`` tensor of patch positions."""
    return isinstance(value, Tensor) and value.dim() == 3 and value.shape[-1] == 2


def pooled_patch_means(positions: Tensor, values: Tensor, k: int) -> Tensor:
    """One tower sequence's per-patch ``values`` mapped to its pooled tokens, as ``Gemma4VisionPooler`` pools.

    Args:
        positions: ``(P, 2)`` each patch's ``(x, y)``, ``(-1, -1)`` on padding.
        values: ``(P, C)`` per-patch values.
        k: The pooling kernel.

    Returns:
        ``(n, C)``: per token the mean of the non-padding patches it pools, tokens in the pooler's order (``x // k +
        (X // k) * (y // k)``, ``X`` one more than the largest ``x``; the ``n`` slots that receive a patch, padding
        patches counted at slot 0 as the pooler counts them, ``0`` for a slot with padding alone).
    """
    length = values.shape[0] // (k * k)
    clamped = positions.long().clamp(min=0).to(values.device)
    per_row = (clamped[:, 0].max() + 1) // k
    slot = clamped[:, 0] // k + per_row * (clamped[:, 1] // k)
    real = ~(positions == -1).all(-1).to(values.device)
    sums = values.new_zeros(length, values.shape[-1]).index_add(0, slot[real], values[real])
    counts = torch.bincount(slot[real], minlength=length).to(values.dtype)
    present = torch.bincount(slot, minlength=length) > 0
    return sums[present] / counts[present].clamp(min=1)[:, None]
