"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images, and videos as pooled per-frame grids.

A video of ``F`` frames goes through the vision tower frame by frame; the resampler pools each
frame's ``g x g`` grid by ``spatial_pool_stride`` (average, max or a strided convolution), so each
frame gives an ``s x s`` grid (``s = g / stride``), and the frames follow each other: ``F * s * s``
``<video>`` tokens with no newline. The layout gives every token its frame, row and column. Images
are laid out as in :mod:`tokenprune.adapters.llava_next`.
"""

from __future__ import annotations

import math

from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.llava_next import LlavaNextAdapter
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
