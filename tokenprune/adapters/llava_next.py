"""LLaVA-NeXT (LLaVA-1.6): anyres tiles, unpadding and row-end ``image_newline`` tokens.

Each image becomes a base view (the whole image resized to one tile, ``g x g`` tokens, view 0)
followed by the high-resolution grid (view 1): the tiles stitched into one grid, the padding rows
or columns that the processor added cropped away (``unpad_image``), and one ``image_newline``
token at the end of every row. The layout is obtained by running the model's own
``pack_image_features`` on a tensor of coordinates instead of features, so it matches whatever the
model does for any image size and grid pinpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor
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

    def _tiles(self, call: ImageCall, image_sizes: Tensor) -> list[int]:
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
        vlm = self.vlm()
        cfg = vlm.config
        image_sizes = call.arg("image_sizes", 1)
        feats = call.features()
        if image_sizes is None:
            return super().image_layouts(call)
        g = cfg.vision_config.image_size // cfg.vision_config.patch_size
        if any(f.shape[0] == 0 for f in feats):
            return super().image_layouts(call)
        coords, widths = [], []
        for size, tiles in zip(image_sizes, self._tiles(call, image_sizes), strict=False):
            r = torch.arange(g).repeat_interleave(g)
            c = torch.arange(g).repeat(g)
            per_tile = []
            _, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            widths.append(npw)
            for t in range(tiles):
                if t == 0:
                    per_tile.append(torch.stack([torch.zeros_like(r), r, c], -1))
                else:
                    tr, tc = divmod(t - 1, npw)
                    per_tile.append(torch.stack([torch.ones_like(r), tr * g + r, tc * g + c], -1))
            coords.append(torch.stack(per_tile).float())
        packed = self._pack(call, coords, image_sizes.cpu())
        layouts = []
        if len(packed) != len(feats):
            return super().image_layouts(call)
        for i, p in enumerate(packed):
            p = p.round().long()
            if p.shape[0] != feats[i].shape[0]:
                return super().image_layouts(call)
            newline = p[:, 0] < 0
            view, row, col = _close_rows(p, newline)
            crop = _crops(view, row, col, newline, g, widths[i])
            for v in (0, 1):
                sel = (view == v) & ~newline
                if sel.any():
                    row[(view == v)] -= row[sel].min()
                    col[sel] -= col[sel].min()
                    col[(view == v) & newline] = col[sel].max() + 1
            layouts.append(
                TokenLayout(
                    image=torch.full_like(view, i)[None],
                    view=view[None],
                    row=row[None],
                    col=col[None],
                    newline=newline[None],
                    crop=crop[None],
                )
            )
        return layouts


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
