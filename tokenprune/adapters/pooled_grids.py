"""Layouts of Molmo2's pooled-patch tokens (``molmo2``; transformers 5.25 ``modeling_molmo2.py``).

Molmo2's ``get_image_features(pixel_values, image_token_pooling, image_grids, image_num_crops)`` pools the tower's
patches of every crop into tokens by the rows of ``image_token_pooling`` and returns one tensor per image.
``image_grids`` ``(N, 4)`` holds per image ``(resized_h, resized_w, high_h, high_w)``: the image processor
(``Molmo2ImageProcessor._image_batch_to_patches_and_grids``) writes the pooling rows of the low-resolution global
crop first (``resized_h x resized_w``, row-major), then those of the high-resolution canvas stitched from the
overlapping crops (``high_h x high_w``, row-major over the whole canvas, not per crop), and the processor writes
the placeholders in that order (``Molmo2Processor.replace_image_token``; the ``<im_col>`` after each row is text).
:func:`molmo2_image_layouts` lays each image out as those two grids: view 0 the global grid, view 1 the
high-resolution one (as LLaVA-NeXT's base and high-resolution views).

Videos (``get_video_features(pixel_values_videos, video_token_pooling, video_grids)``): ``video_grids`` ``(V, 3)``
holds per video ``(frames, rows, cols)``; every frame is pooled on its own (``Molmo2VideoProcessor``: the same
pooling rows per frame, offset by the frame's patches) and the processor writes ``frames`` runs of ``rows x cols``
placeholders after each frame's timestamp. :func:`molmo2_video_layouts` lays each video out as those frames.
The placeholder of a video token is the image token (``video_token_id`` is an alias of ``image_patch_id``); the
model takes images or videos in one forward, never both, and the engine reads the placeholders of a forward given
videos as video tokens.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tokenprune.adapters.base import ImageCall
from tokenprune.layout import TokenLayout


def _fits(call: ImageCall, layouts: list[TokenLayout]) -> list[TokenLayout] | None:
    counts = [int(f.shape[0]) for f in call.features()]
    return layouts if counts == [int(lay.shape[1]) for lay in layouts] else None


def molmo2_image_layouts(call: ImageCall, method: Any) -> list[TokenLayout] | None:
    """Per image of a Molmo2 ``get_image_features`` call (``method``): its global grid then its high-res grid.

    Returns:
        One layout per row of ``image_grids`` ``(N, 4)``: view 0 a ``resized_h x resized_w`` grid, then (where
        the image has crops) view 1 a ``high_h x high_w`` grid; ``None`` where the call has no ``image_grids`` of
        that form or the grids do not count the features the call returned.
    """
    grids = call.argument("image_grids", method)
    if not (isinstance(grids, Tensor) and grids.dim() == 2 and grids.shape[-1] == 4):
        return None
    layouts = []
    for i, (low_h, low_w, high_h, high_w) in enumerate(grids.long().tolist()):
        views = [TokenLayout.grid(low_h, low_w, image=i)]
        if high_h * high_w:
            views.append(TokenLayout.grid(high_h, high_w, image=i, view=1))
        layouts.append(TokenLayout.cat(views))
    return _fits(call, layouts)


def molmo2_video_layouts(call: ImageCall, method: Any) -> list[TokenLayout] | None:
    """Per video of a Molmo2 ``get_video_features`` call (``method``): ``frames`` grids of ``rows x cols``.

    Returns:
        One layout per row of ``video_grids`` ``(V, 3)``, frame ``f`` a ``rows x cols`` grid (``frame`` set,
        ``video`` true); ``None`` where the call has no ``video_grids`` of that form or the grids do not count
        the features the call returned.
    """
    grids = call.argument("video_grids", method)
    if not (isinstance(grids, Tensor) and grids.dim() == 2 and grids.shape[-1] == 3):
        return None
    layouts = [
        TokenLayout.cat([TokenLayout.grid(rows, cols, image=v, frame=f, video=True) for f in range(frames)])
        for v, (frames, rows, cols) in enumerate(grids.long().tolist())
    ]
    return _fits(call, layouts)
