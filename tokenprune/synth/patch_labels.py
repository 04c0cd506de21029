"""Patch-level labels: what lies under every vision patch of every anyres view.

The renderer knows which object covers each pixel, and SynthVQA image sizes are anyres pinpoints,
so each patch of each 32x32 view covers a known pixel block of the image: the base view is the
whole image squeezed to 32x32 (a patch covers an (H/8) x (W/8) block), and the high-res tiles cut
the image itself (a patch covers a 4x4 block). The training recipe trains linear auxiliary heads on
these labels (on the vision tower's and the projector's output tokens) and discards them afterwards.

Only a base-view patch is labelled with its quadrant of the image: the high-res tiles share CLIP's
position embeddings, so nothing in a tile patch can tell which tile it came from.
"""

from __future__ import annotations

import numpy as np

from tokenprune.synth.processor import PATCH, TILE
from tokenprune.synth.scenes import (
    BACKGROUND_COLOURS,
    DIGITS,
    QUADRANTS,
    SHAPE_COLOURS,
    SHAPE_KINDS,
    TEXT_KIND,
    Scene,
    second_region,
)

KIND_CLASSES: tuple[str, ...] = ("background", *SHAPE_KINDS, TEXT_KIND)
COLOUR_CLASSES: tuple[str, ...] = (*BACKGROUND_COLOURS, *SHAPE_COLOURS)
DIGIT_CLASSES: tuple[str, ...] = DIGITS
QUADRANT_CLASSES: tuple[str, ...] = QUADRANTS
#: visual tokens of the base view, which come first in LLaVA-NeXT's packed order.
BASE_VIEW_TOKENS = (TILE // PATCH) ** 2
IGNORE = -100
#: minimum share of a patch's pixels an object must cover to label the patch with it.
MIN_COVERAGE = 0.25


def _block_owner(omap: np.ndarray, bh: int, bw: int, coverage: float = MIN_COVERAGE) -> np.ndarray:
    """For an (H, W) object map cut into bh x bw blocks: (H/bh, W/bw) index of the dominant object.

    An object owns a block when it covers at least ``coverage`` of it (the most-covering object
    wins); otherwise the block is background (0).
    """
    h, w = omap.shape
    n_obj = int(omap.max())
    blocks = omap.reshape(h // bh, bh, w // bw, bw).transpose(0, 2, 1, 3).reshape(h // bh, w // bw, -1)
    if n_obj == 0:
        return np.zeros(blocks.shape[:2], dtype=np.int64)
    counts = np.stack([(blocks == i).sum(-1) for i in range(1, n_obj + 1)], axis=-1)
    best = counts.argmax(-1)
    cover = counts.max(-1) / (bh * bw)
    return np.where(cover >= coverage, best + 1, 0)


def _views(fine: np.ndarray, coarse: np.ndarray, h: int, w: int) -> np.ndarray:
    """(n_views, patches) from a per-patch map of the base view (``coarse``) and of the image (``fine``)."""
    per = TILE // PATCH
    views = [coarse.reshape(-1)]
    for r in range(h // TILE):
        for c in range(w // TILE):
            views.append(fine[r * per : (r + 1) * per, c * per : (c + 1) * per].reshape(-1))
    return np.stack(views)


def view_owners(scene: Scene, omap: np.ndarray) -> np.ndarray:
    """Owner object (0 = background, i+1 = ``scene.objects[i]``) of every patch of every view.

    Returns:
        (n_views, (TILE/PATCH)**2) int64, views in the processor's order: base view first, then
        the high-res tiles row-major; patches row-major inside a view.
    """
    h, w = omap.shape
    per = TILE // PATCH
    if h % TILE or w % TILE:
        raise ValueError(f"image {h}x{w} is not a multiple of the {TILE}px tile; render a pinpoint size")
    return _views(_block_owner(omap, PATCH, PATCH), _block_owner(omap, h // per, w // per), h, w)


def background_colours(scene: Scene) -> np.ndarray:
    """Index into :data:`COLOUR_CLASSES` of the background colour under every patch of every view.

    The colour that covers most of the patch's pixels: the scene's main colour, or in a ``regions``
    layout its second colour where that region covers at least half of the patch. Same shape as
    :func:`view_owners`.
    """
    h, w, per = scene.height, scene.width, TILE // PATCH
    region = second_region(scene).astype(np.int64)
    main = COLOUR_CLASSES.index(scene.background)
    second = COLOUR_CLASSES.index(scene.second) if scene.second is not None else main
    views = _views(_block_owner(region, PATCH, PATCH, 0.5), _block_owner(region, h // per, w // per, 0.5), h, w)
    return np.where(views > 0, second, main)


def patch_labels(scene: Scene, omap: np.ndarray) -> np.ndarray:
    """Kind, colour, digit and quadrant class of every patch of every view.

    Returns:
        (n_views, patches_per_view, 4) int64: index into :data:`KIND_CLASSES`,
        :data:`COLOUR_CLASSES` (on background patches the colour under the patch, see
        :func:`background_colours`; the shape's colour on shapes,
        ``IGNORE`` on the text plate), :data:`DIGIT_CLASSES` (``IGNORE`` off the plate) and
        :data:`QUADRANT_CLASSES` (the patch's quadrant of the image on the base view, ``IGNORE``
        on the high-res tiles).
    """
    owners = view_owners(scene, omap)
    table = np.full((len(scene.objects) + 1, 3), IGNORE, dtype=np.int64)
    table[0] = (0, COLOUR_CLASSES.index(scene.background), IGNORE)
    for i, obj in enumerate(scene.objects):
        if obj.kind == TEXT_KIND:
            table[i + 1] = (KIND_CLASSES.index(TEXT_KIND), IGNORE, DIGIT_CLASSES.index(obj.digit or "0"))
        else:
            table[i + 1] = (KIND_CLASSES.index(obj.kind), COLOUR_CLASSES.index(obj.colour), IGNORE)
    per = TILE // PATCH
    row, col = np.divmod(np.arange(per * per), per)
    quadrant = np.full(owners.shape, IGNORE, dtype=np.int64)
    quadrant[0] = 2 * (row >= per // 2) + (col >= per // 2)  # QUADRANTS order: TL, TR, BL, BR
    labels = table[owners]
    labels[..., 1] = np.where(owners == 0, background_colours(scene), labels[..., 1])
    return np.concatenate([labels, quadrant[..., None]], axis=-1)


def packed_owners(scene: Scene, omap: np.ndarray) -> np.ndarray:
    """Owner object of every visual token in LLaVA-NeXT's packed order.

    The packed order (``pack_image_features`` for an unpadded pinpoint-size image) is the 64
    base-view tokens, then the high-res grid row by row, each row followed by one
    ``image_newline`` token. Returns a (n_image_tokens,) int64 array: 0 background, ``i + 1``
    for ``scene.objects[i]``, -1 on newline tokens.
    """
    return pack_views(view_owners(scene, omap), *omap.shape, newline=-1)


def pack_views(views: np.ndarray, height: int, width: int, newline: int) -> np.ndarray:
    """Per-patch values of every view (``(n_views, 64)``, as :func:`view_owners`) in the packed order,
    with ``newline`` at the row-end newline tokens."""
    per = TILE // PATCH
    tiles_w = width // TILE
    grid = np.zeros((height // PATCH, width // PATCH), dtype=views.dtype)
    for t, view in enumerate(views[1:]):
        tr, tc = divmod(t, tiles_w)
        grid[tr * per : (tr + 1) * per, tc * per : (tc + 1) * per] = view.reshape(per, per)
    with_newlines = np.concatenate([grid, np.full((grid.shape[0], 1), newline, dtype=views.dtype)], axis=1)
    return np.concatenate([views[0], with_newlines.reshape(-1)])
