"""Kept-token heatmaps: which visual tokens survived a pipeline, drawn over the image, or over each frame of a video."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokenprune.engine.run_stats import ForwardStats
from tokenprune.layout import TokenLayout


def surviving_tokens(prefill: ForwardStats, sample: int = 0) -> tuple[TokenLayout, Tensor] | None:
    """The layout of the visual tokens entering the first stage, and a mask of those that survive
    every stage (each stage's ``kept`` indices are relative to the previous stage's survivors)."""
    if not prefill.stages or prefill.stages[0].layout is None:
        return None
    first = prefill.stages[0]
    n = first.entering[sample]
    alive = torch.arange(n)
    for s in prefill.stages:
        alive = alive[torch.tensor(s.kept[sample], dtype=torch.long)]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[alive] = True
    layout = TokenLayout(**{f: getattr(first.layout, f)[sample : sample + 1, :n] for f in _FIELDS})
    return layout, mask


_FIELDS = ("image", "view", "row", "col", "newline", "frame", "video")


def panels(layout: TokenLayout) -> list[tuple[bool, int, int]]:
    """The panels of a heatmap, in order: ``(False, image, view)`` per image view, then
    ``(True, video, frame)`` per video frame (``image`` numbers the videos of a sample)."""
    cells = ~layout.newline[0]
    video = layout.video[0][cells].tolist()
    index, view, frame = (getattr(layout, f)[0][cells].tolist() for f in ("image", "view", "frame"))
    images = {(False, i, v) for i, v, is_video in zip(index, view, video, strict=True) if not is_video}
    videos = {(True, i, f) for i, f, is_video in zip(index, frame, video, strict=True) if is_video}
    return sorted(images) + sorted(videos)


def draw_heatmap(
    image: Any, layout: TokenLayout, kept: Tensor, out: Path, *, frames: Sequence[Sequence[Any]] = ()
) -> None:
    """Draw ``image`` once per (image, view) of ``layout``, and each video frame once, dimming dropped tokens.

    Args:
        image: The picture under the image panels (``None`` when the prompt has only videos).
        layout: One sample's layout (:func:`surviving_tokens`).
        kept: ``(N,)`` bool, the tokens that survived.
        out: The PNG to write (written whole, then moved into place).
        frames: Per video of the sample, its frames as pictures; a layout frame ``f`` of a video with
            ``F`` layout frames is drawn over picture ``f * len(pictures) // F`` (Qwen's temporal patch
            groups two input frames). A video without pictures is drawn on grey.

    Newline tokens have no cell and are not drawn. The grid of a view is stretched over the whole
    picture (LLaVA-NeXT's unpadded grid covers the image's own aspect ratio).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = panels(layout)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        is_video, index, part = key
        sel = _cells(layout, key)
        picture = _picture(image, frames, layout, key)
        _draw_panel(ax, picture, layout, sel, kept)
        kept_n, total = int(kept[sel].sum()), int(sel.sum())
        if is_video:
            ax.set_title(f"video {index}, frame {part}: {kept_n}/{total} kept")
        else:
            ax.set_title(f"image {index}, {'base view' if part == 0 else f'view {part}'}: {kept_n}/{total} kept")
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


def _cells(layout: TokenLayout, key: tuple[bool, int, int]) -> Tensor:
    is_video, index, part = key
    sel = (layout.video[0] == is_video) & (layout.image[0] == index) & ~layout.newline[0]
    return sel & ((layout.frame[0] if is_video else layout.view[0]) == part)


def _picture(image: Any, frames: Sequence[Sequence[Any]], layout: TokenLayout, key: tuple[bool, int, int]) -> Any:
    """The picture under one panel, as an ``(H, W, 3)`` array."""
    import numpy as np

    is_video, index, part = key
    pictures = (frames[index] if index < len(frames) else ()) if is_video else ([image] if image is not None else [])
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)
    if not pictures:
        return grey  # nothing to draw on
    if not is_video:
        return np.asarray(image)
    count = int(layout.frame[0][layout.video[0] & (layout.image[0] == index)].max()) + 1
    if count < 1:  # the model does not say which frame a token belongs to (MiniCPM-V: UNKNOWN_FRAME)
        return grey
    return np.asarray(pictures[min(part * len(pictures) // count, len(pictures) - 1)])


def _draw_panel(ax: Any, pixels: Any, layout: TokenLayout, sel: Tensor, kept: Tensor) -> None:
    import numpy as np

    h, w = pixels.shape[:2]
    rows, cols = int(layout.row[0][sel].max()) + 1, int(layout.col[0][sel].max()) + 1
    grid = np.zeros((rows, cols))
    for r, c, k in zip(layout.row[0][sel].tolist(), layout.col[0][sel].tolist(), kept[sel].tolist(), strict=True):
        grid[r, c] = 1.0 if k else 0.0
    ax.imshow(pixels)
    ax.imshow(1.0 - grid, cmap="Greys", alpha=0.75, vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="nearest")


__all__ = ["draw_heatmap", "panels", "surviving_tokens"]
