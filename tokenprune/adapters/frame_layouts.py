"""Video layouts of the families whose ``get_video_features`` call gives its frames by argument, not by a grid.

Gemma 4 (``gemma4``; transformers 5.25 ``modeling_gemma4.py``) encodes videos as images: ``pixel_values_videos``
``(total_frames, max_patches, 3*P*P)`` holds every frame of every video of the batch, ``video_position_ids``
``(total_frames, max_patches, 2)`` each patch's ``(x, y)`` (``-1`` on padding) and ``num_frames_per_video`` how many
of those frames each video takes. The vision tower pools every frame's ``k x k`` patch blocks
(``Gemma4VisionPooler._avg_pool_by_positions``: pooled token ``x // k + (extent_x // k) * (y // k)``, row-major)
and ``get_video_features`` returns one tensor per video, its frames one after the other. The processor writes a
frame's placeholders as ``<timestamp> <boi> <|video|> x n <eoi>`` (``Gemma4Processor.replace_video_token``).
:func:`positioned_video_layouts` lays each video out as those frames: frame ``f`` a ``(extent_y / k, extent_x / k)``
grid, so that video reducers (EVS, VidCom2) work per frame. Gemma 4 Unified (``gemma4_unified``) has no tower: its
``get_video_features`` embeds every model patch as one token (``k = 1``), the padding stripped, row-major.

MiniCPM-V 4.6 / 4.7 (``minicpmv4_6``, ``minicpmv4_7``) pack every visual unit of the batch's videos (a frame's
thumbnail, each of its slices, stacked-frame composites) as NaViT patches with one ``(h, w)`` row of
``target_sizes_videos`` each, and ``get_video_features`` returns one tensor per unit. How many units make a frame
and how many frames a video (``grids_videos``, ``num_frames_per_video``) stay in the video processor's output: the
forward does not take them (``MiniCPMV4_6VideoProcessor.model_input_names``). :func:`unit_video_layouts` lays each
unit out as its grid (``h / 4 x w / 4`` merged patches in the ``16x`` mode, as the image slices) with its frame
:data:`~tokenprune.layout.UNKNOWN_FRAME`: stages that read no frames run on the video tokens, video reducers
refuse (:func:`tokenprune.layout.refuse_unknown_frames`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from tokenprune.adapters.base import ImageCall
from tokenprune.engine import compat
from tokenprune.layout import UNKNOWN_FRAME, TokenLayout


def unit_video_layouts(call: ImageCall, method: Any) -> list[TokenLayout] | None:
    """One grid per visual unit of a MiniCPM-V ``get_video_features`` call (``method``), frames unknown.

    Args:
        call: The recorded call; ``target_sizes_videos`` ``(U, 2)``, each unit's ``(h, w)`` in patches, by
            keyword or by place.
        method: The model's ``get_video_features``.

    Returns:
        Per unit, its ``(h / s) x (w / s)`` grid (``s`` the one merge factor that makes every unit's count fit the
        features the call returned), ``video`` true and ``frame`` :data:`~tokenprune.layout.UNKNOWN_FRAME`;
        ``None`` where the call has no ``target_sizes_videos`` or no factor fits.
    """
    from tokenprune.adapters.generic import _hints, grids_from_hints

    hints = _hints(call.argument("target_sizes_videos", method))
    if hints is None:
        return None
    grids = grids_from_hints(hints, [int(f.shape[0]) for f in call.features()])
    if grids is None:
        return None
    out = []
    for i, (_, h, w) in enumerate(grids):
        grid = TokenLayout.grid(h, w, image=i, video=True)
        out.append(replace(grid, frame=torch.full_like(grid.frame, UNKNOWN_FRAME)))
    return out


def positioned_video_layouts(call: ImageCall, method: Any, pooling: int) -> list[TokenLayout] | None:
    """One layout per video of a Gemma 4 ``get_video_features`` call (``method``): its frames of pooled grids.

    Args:
        call: The recorded call; ``video_position_ids`` ``(F_total, P, 2)`` and ``num_frames_per_video``
            ``(V,)`` by keyword or by place (or, transformers 5.18, ``(V, F, P, 2)`` positions alone:
            :func:`~tokenprune.engine.compat.flat_video_frames`).
        method: The model's ``get_video_features`` (for the arguments' places).
        pooling: The tower's ``pooling_kernel_size`` ``k``.

    Returns:
        Per video, ``F_v`` frames of ``(extent_y / k) x (extent_x / k)`` tokens (``frame`` set, ``video``
        true), in the order the call returns the video's features; ``None`` where the call has no such
        arguments or the grids do not count the features the call returned (the caller's fallback then
        applies).
    """
    positions, frames = compat.flat_video_frames(
        call.argument("video_position_ids", method), call.argument("num_frames_per_video", method)
    )
    if not (isinstance(positions, Tensor) and positions.dim() == 3 and positions.shape[-1] == 2):
        return None
    if frames is None or pooling < 1:
        return None
    per_video = [int(n) for n in (frames.tolist() if isinstance(frames, Tensor) else frames)]
    extent = positions.long().clamp(min=0).amax(dim=1) + 1  # (F_total, 2): (x, y) extents
    grids = [(int(y) // pooling, int(x) // pooling) for x, y in extent.tolist()]
    if len(grids) != sum(per_video):
        return None
    layouts, start = [], 0
    for v, n in enumerate(per_video):
        frame_grids = grids[start : start + n]
        start += n
        layouts.append(
            TokenLayout.cat(
                [TokenLayout.grid(h, w, image=v, frame=f, video=True) for f, (h, w) in enumerate(frame_grids)]
            )
        )
    counts = [int(f.shape[0]) for f in call.features()]
    if counts != [int(lay.shape[1]) for lay in layouts]:
        return None
    return layouts
