"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images, and videos as pooled per-frame grids.

A video of ``F`` frames goes through the vision tower frame by frame; the resampler pools each
frame's ``g x g`` grid by ``spatial_pool_stride`` (average, max or a strided convolution), so each
frame gives an ``s x s`` grid (``s = g / stride``), and the frames follow each other: ``F * s * s``
``<video>`` tokens with no newline. The layout gives every token its frame, row and column. Images
are laid out as in :mod:`tokenprune.adapters.llava_next`.

Vision attention, images as LLaVA-NeXT and videos too: ``get_video_features`` runs the CLIP tower once over
every frame of the batch's videos (one tower sequence per frame, in ``pixel_values_videos`` order), drops
the CLS position (``default``) and pools each frame's ``g x g`` grid by ``spatial_pool_stride``; a pooled
token gets the mean of its ``stride x stride`` window of patches whatever the pooling mode (an average, a
max or a strided convolution of those patches: built from them, weights of a mean).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.llava_next import LlavaNextAdapter
from tokenprune.adapters.vision import square_patches
from tokenprune.layout import TokenLayout


def frame_grids(call: ImageCall, *, trailing_newline: bool = False) -> list[TokenLayout]:
    """Per video of the recorded ``get_video_features`` call: one square grid per frame, frames in order.

    Args:
        call: The call; ``pixel_values_videos`` (its first argument) is ``(videos, frames, C, H, W)``.
        trailing_newline: Each video ends with one ``image_newline`` token (LLaVA-OneVision); it gets
            the last frame, the last row and the column after the grid.
    """
    pixels = call.arg("pixel_values_videos", 0)
    frames = int(pixels.shape[1])
    layouts = []
    for v, feats in enumerate(call.features()):
        per_frame = (int(feats.shape[0]) - int(trailing_newline)) // frames
        side = math.isqrt(per_frame)
        rows, cols = (side, side) if side * side == per_frame else (1, per_frame)
        parts = [TokenLayout.grid(rows, cols, image=v, frame=f, video=True) for f in range(frames)]
        if trailing_newline:
            last = TokenLayout.grid(1, 1, image=v, frame=frames - 1, video=True)
            parts.append(
                TokenLayout(
                    image=last.image,
                    view=last.view,
                    row=last.row + rows - 1,
                    col=last.col + cols,
                    newline=~last.newline,
                    frame=last.frame,
                    video=last.video,
                )
            )
        layouts.append(TokenLayout.cat(parts))
    return layouts


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-Video: anyres images as LLaVA-NeXT; videos as one pooled grid per frame."""

    name = "llava_next_video"
    model_types = ("llava_next_video",)
    notes = "images as llava_next; video: one pooled s x s grid per frame, frame index in the layout"

    def video_layouts(self, call: ImageCall) -> list[TokenLayout]:
        return frame_grids(call)

    def vision_tower(self) -> VisionTower | None:
        """LLaVA-NeXT's CLIP tower, also watched during ``get_video_features`` (``videos``)."""
        tower = super().vision_tower()
        return None if tower is None else dataclasses.replace(tower, videos=True)

    def map_vision_video_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per frame: CLS dropped under ``default``, each frame's grid average-pooled by
        ``spatial_pool_stride`` (the windows the model pools), frames in order; one tensor per video."""
        pixels = call.arg("pixel_values_videos", 0)
        if pixels is None:
            return None
        cfg = self.vlm().config
        strategy = call.arg("vision_feature_select_strategy", 2) or cfg.vision_feature_select_strategy
        stride = int(cfg.spatial_pool_stride)
        frames = []
        for v in values:
            grid = square_patches(v, strategy)
            if grid is None:
                return None
            pooled = torch.nn.functional.avg_pool2d(grid.permute(2, 0, 1)[None], kernel_size=stride, stride=stride)
            frames.append(pooled.flatten(2)[0].T)
        per_video = int(pixels.shape[1])
        return [torch.cat(frames[i : i + per_video]) for i in range(0, len(frames), per_video)]
