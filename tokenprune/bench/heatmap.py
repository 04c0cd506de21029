"""Kept-token heatmaps: which visual tokens survived a pipeline, drawn over the image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokenprune.engine.stats import ForwardStats
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
    layout = TokenLayout(
        **{f: getattr(first.layout, f)[sample : sample + 1, :n] for f in ("image", "view", "row", "col", "newline")}
    )
    return layout, mask


def draw_heatmap(image: Any, layout: TokenLayout, kept: Tensor, out: Path) -> None:
    """Draw ``image`` once per (image, view) of ``layout``, dimming the cells of dropped tokens.

    Newline tokens have no cell and are not drawn. The grid of a view is stretched over the whole
    image (LLaVA-NeXT's unpadded grid covers the image's own aspect ratio).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = sorted({(int(i), int(v)) for i, v in zip(layout.image[0], layout.view[0], strict=False)})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4), squeeze=False)
    pixels = np.asarray(image)
    h, w = pixels.shape[:2]
    for ax, (img, view) in zip(axes[0], keys, strict=False):
        sel = (layout.image[0] == img) & (layout.view[0] == view) & ~layout.newline[0]
        rows, cols = int(layout.row[0][sel].max()) + 1, int(layout.col[0][sel].max()) + 1
        grid = np.zeros((rows, cols))
        for r, c, k in zip(layout.row[0][sel].tolist(), layout.col[0][sel].tolist(), kept[sel].tolist(), strict=False):
            grid[r, c] = 1.0 if k else 0.0
        ax.imshow(pixels)
        ax.imshow(1.0 - grid, cmap="Greys", alpha=0.75, vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="nearest")
        kept_n, total = int(kept[sel].sum()), int(sel.sum())
        ax.set_title(f"image {img}, {'base view' if view == 0 else f'view {view}'}: {kept_n}/{total} kept")
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


__all__ = ["draw_heatmap", "surviving_tokens"]
