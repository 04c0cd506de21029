"""LLaVA-NeXT (LLaVA-1.6): anyres tiles, unpadding and row-end ``image_newline`` tokens.

Each image becomes a base view (the whole image resized to one tile, ``g x g`` tokens, view 0)
followed by the high-resolution grid (view 1): the tiles stitched into one grid, the padding rows
or columns that the processor added cropped away (``unpad_image``), and one ``image_newline``
token at the end of every row. The layout is obtained by running the model's own
``pack_image_features`` on a tensor of coordinates instead of features, so it matches whatever the
model does for any image size and grid pinpoints.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.llava import LlavaAdapter
from tokenprune.adapters.vision import drop_cls
from tokenprune.layout import TokenLayout


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: base view + unpadded high-resolution grid with newline tokens, per image.

    LLaVA-1.5's projector and tower (:class:`~tokenprune.adapters.llava.LlavaAdapter`); the tiles, their
    packing and the layouts are its own.
    """

    name = "llava_next"
    model_types = ("llava_next",)
    notes = "anyres tiles, unpadding, image_newline (protected by default), several images per prompt"

    def _tiles(self, call: ImageCall, image_sizes: Tensor | list[list[int]]) -> list[int]:
        """Tiles (base view included) of each image, as ``get_image_features`` counts them."""
        cfg = self.vlm().config
        return [
            image_size_to_num_patches(
                image_size=size, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size
            )
            for size in image_sizes
        ]

    def _pack(
        self, call: ImageCall, coords: list[Tensor], image_sizes: Tensor, newline: Tensor | None = None
    ) -> list[Tensor]:
        """Run the model's ``pack_image_features`` on ``(tiles, g*g, C)`` tensors (coordinates, or values),
        with ``newline`` (default: ``-1`` in each of 3 channels) at the row ends."""
        strategy = call.arg("vision_feature_select_strategy", 3) or self.vlm().config.vision_feature_select_strategy
        newline = torch.full((3,), -1.0) if newline is None else newline
        packed, _ = self.vlm().pack_image_features(coords, image_sizes, strategy, image_newline=newline)
        return list(packed)

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per tile; the model's own ``pack_image_features`` on the values (CLS dropped
        under ``default``): the base view, then the unpadded (and, for OneVision, downscaled) grid, with a
        zero value at every newline."""
        image_sizes = call.arg("image_sizes", 1)
        if image_sizes is None:
            return None
        strategy = call.arg("vision_feature_select_strategy", 3) or self.vlm().config.vision_feature_select_strategy
        tiles = self._tiles(call, image_sizes)
        per_image, start = [], 0
        for n in tiles:
            per_image.append(drop_cls(torch.stack(values[start : start + n]), strategy))
            start += n
        channels = values[0].shape[-1]
        return self._pack(call, per_image, image_sizes.cpu(), newline=torch.zeros(channels))

    def image_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """Per image: the base view, then the unpadded grid with a newline at every row end.

        An image's layout depends only on its size and the model's configuration, so each model keeps the
        layouts of the last sizes it has seen (:data:`_SEEN`): a repeated size costs no ``pack_image_features``
        call (1-2 ms of host time at 2928 tokens on this CPU).
        """
        image_sizes = call.arg("image_sizes", 1)
        feats = call.features()
        if image_sizes is None or any(f.shape[0] == 0 for f in feats) or len(image_sizes) != len(feats):
            return super().image_layouts(call)
        sizes = image_sizes.tolist()  # the one host read: (height, width) per image
        keys = [self._layout_key(call, size, f.shape[0]) for size, f in zip(sizes, feats, strict=True)]
        seen = _SEEN.setdefault(self.vlm(), {})
        if not all(k in seen for k in keys):
            fields = self._pack_layouts(call, sizes, feats)
            if fields is None:
                return super().image_layouts(call)
            seen.update(zip(keys, fields, strict=True))
            for stale in list(seen)[: max(0, len(seen) - _SEEN_SIZES)]:  # the oldest sizes go first
                del seen[stale]
        return [_layout(i, seen[k]) for i, k in enumerate(keys)]

    def _layout_key(self, call: ImageCall, size: list[int], tokens: int) -> tuple[object, ...]:
        """What an image's layout depends on: its size, its token count, the select strategy and the anyres config."""
        cfg = self.vlm().config
        strategy = call.arg("vision_feature_select_strategy", 3) or cfg.vision_feature_select_strategy
        pinpoints = tuple(tuple(p) for p in cfg.image_grid_pinpoints)
        vision = (cfg.vision_config.image_size, cfg.vision_config.patch_size)
        return (tuple(size), tokens, strategy, pinpoints, vision, getattr(cfg, "vision_aspect_ratio", None))

    def _pack_layouts(self, call: ImageCall, sizes: list[list[int]], feats: list[Tensor]) -> list[_Fields] | None:
        """``(view, row, col, newline, crop)`` of each image from the model's ``pack_image_features`` run on
        coordinates; ``None`` where the packed counts differ from the features (the base layouts then)."""
        cfg = self.vlm().config
        g = cfg.vision_config.image_size // cfg.vision_config.patch_size
        coords, widths = [], []
        for size, tiles in zip(sizes, self._tiles(call, sizes), strict=True):
            _, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            widths.append(npw)
            coords.append(_tile_coordinates(g, tiles, npw))
        out = []
        for i, p in enumerate(self._pack(call, coords, torch.tensor(sizes))):
            p = p.round().long()
            if p.shape[0] != feats[i].shape[0]:
                return None
            out.append(_fields(p, g, widths[i]))
        return out


_Fields = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
_SEEN_SIZES = 256  # about 120 KB each at 2928 tokens

#: Per model (weakly held): the layout fields of the last :data:`_SEEN_SIZES` image sizes it laid out.
_SEEN: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], _Fields]] = weakref.WeakKeyDictionary()


def forget_layouts() -> None:
    """Drop every model's stored layouts: the next prefill lays its images out afresh (what the sync counts and
    benchmarks measure, the worst case)."""
    _SEEN.clear()


def _tile_coordinates(g: int, tiles: int, crops_wide: int) -> Tensor:
    """``(tiles, g*g, 3)`` float ``(view, row, col)`` of every patch: the base view, then the crops of the grid."""
    r = torch.arange(g).repeat_interleave(g)
    c = torch.arange(g).repeat(g)
    per_tile = [torch.stack([torch.zeros_like(r), r, c], -1)]
    for t in range(1, tiles):
        tr, tc = divmod(t - 1, crops_wide)
        per_tile.append(torch.stack([torch.ones_like(r), tr * g + r, tc * g + c], -1))
    return torch.stack(per_tile).float()


def _fields(packed: Tensor, g: int, crops_wide: int) -> _Fields:
    """``(view, row, col, newline, crop)`` of one image's packed ``(n, 3)`` coordinates (newlines: ``-1``)."""
    newline = packed[:, 0] < 0
    view, row, col = _close_rows(packed, newline)
    crop = _crops(view, row, col, newline, g, crops_wide)
    for v in (0, 1):
        sel = (view == v) & ~newline
        if sel.any():
            row[(view == v)] -= row[sel].min()
            col[sel] -= col[sel].min()
            col[(view == v) & newline] = col[sel].max() + 1
    return view, row, col, newline, crop


def _layout(image: int, fields: _Fields) -> TokenLayout:
    """Image ``image``'s :class:`TokenLayout` from its fields (copied: the stored ones stay as they are)."""
    view, row, col, newline, crop = (t.clone()[None] for t in fields)
    return TokenLayout(image=torch.full_like(view, image), view=view, row=row, col=col, newline=newline, crop=crop)


def _crops(view: Tensor, row: Tensor, col: Tensor, newline: Tensor, g: int, crops_wide: int) -> Tensor:
    """The anyres crop of each high-resolution token from its padded-grid ``row`` and ``col`` (before the
    unpadding offset is taken off): ``(row // g) * crops_wide + col // g``; a newline takes the crop of the
    token it closes (``_close_rows``); ``-1`` in the base view."""
    index = torch.arange(row.shape[0], device=row.device)
    own = torch.where(view == 1, (row // g) * crops_wide + col // g, torch.full_like(row, -1))
    last = torch.where(newline, torch.full_like(index, -1), index).cummax(0).values
    closed = torch.where(last >= 0, own[last.clamp(min=0)], torch.full_like(own, -1))
    return torch.where(newline, closed, own)


def _close_rows(coords: Tensor, newline: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """View, row and column of each packed token (``coords``: ``(n, 3)``); a newline takes the view and
    row of the last token before it that is not a newline (0 where there is none): it closes that row."""
    index = torch.arange(coords.shape[0], device=coords.device)
    last = torch.where(newline, torch.full_like(index, -1), index).cummax(0).values
    source = coords[last.clamp(min=0)]
    closed = torch.where((last >= 0)[:, None], source, torch.zeros_like(source))
    view = torch.where(newline, closed[:, 0], coords[:, 0])
    row = torch.where(newline, closed[:, 1], coords[:, 1])
    return view, row, coords[:, 2].clone()
