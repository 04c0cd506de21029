"""InternVL (2.5 / 3 / 3.5 in transformers): tiles plus a thumbnail, CLS token dropped, pixel shuffle.

The processor cuts each image into ``n`` crops of ``image_size`` pixels on an aspect-ratio grid and,
when ``n > 1``, appends a thumbnail of the whole image. Every tile goes through the vision tower on
its own; the CLS token is dropped (``vision_feature_select_strategy="default"``) and the patch grid is
pixel-shuffled by ``downsample_ratio`` (0.5: each token covers 2 x 2 patches), so a tile gives a
``g x g`` grid of tokens (``g = image_size / patch_size * downsample_ratio``; 16 x 16 = 256 for the
released checkpoints), between ``<img>`` and ``</img>``.

Layout: a crop ``t`` is view ``1 + t`` and the thumbnail view ``0`` (it comes last in the sequence);
a single-tile image is view ``0``. Rows and columns are tile-local, obtained by running the model's
own ``pixel_shuffle`` on the patch coordinates. ``get_image_features`` does not say which tiles make
one image, so the adapter counts them from the runs of image tokens that :meth:`visual_mask` saw in
``input_ids`` (each image's tokens are contiguous, between ``<img>`` and ``</img>``); the crop grid's
shape (rows x columns of crops) is not in the model's inputs, so crops are not placed on one grid.

Vision attention: the InternViT tower (``vision_tower.encoder.layer``, attention module ``attention``) runs
once over all tiles of the batch, one tower sequence per tile, position 0 its CLS token; the probed layer
defaults to the one the features come from (``vision_feature_layer``, ``-1``: the last). The model drops
the CLS position and pixel-shuffles the ``p x p`` patch grid: a token *concatenates* the channels of
``1 / downsample_ratio^2`` neighbouring patches (2 x 2), so its score is the mean of theirs (the model's own
``pixel_shuffle`` run on the values). One mapped tensor per tile, tiles in ``pixel_values`` order (as
``get_image_features`` returns them; the layout groups them per image in the same order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenprune.adapters.base import ImageCall, ModelAdapter, VisionTower
from tokenprune.adapters.vision import layer_of_hidden_state, square_patches
from tokenprune.layout import TokenLayout


class InternVLAdapter(ModelAdapter):
    """InternVL: per image its crops (views 1..n-1) then the thumbnail (view 0), tile-local rows and columns."""

    name = "internvl"
    model_types = ("internvl",)
    notes = "tiles + thumbnail (view 0), CLS dropped, pixel shuffle; rows/columns tile-local"
    pre_projector_refusal = (
        "its projector follows a pixel shuffle that folds 2x2 patches into one token, so a projector input is not "
        "one language-model token"
    )

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self._runs: list[int] = []

    def visual_mask(self, input_ids: Tensor) -> Tensor:
        """The image-context tokens; also remembers each image's token count (its run of placeholders)."""
        mask = super().visual_mask(input_ids)
        runs: list[int] = []
        for row in mask.tolist():
            count = 0
            for v in [*row, False]:
                if v:
                    count += 1
                elif count:
                    runs.append(count)
                    count = 0
        self._runs = runs
        return mask

    def tile_grid(self) -> tuple[Tensor, Tensor]:
        """``(rows, cols)`` of each token of one tile, in feature order, from the model's ``pixel_shuffle``."""
        cfg = self.vlm().config
        size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
        side = (size[0] if isinstance(size, (list, tuple)) else size) // (
            patch[0] if isinstance(patch, (list, tuple)) else patch
        )
        r = torch.arange(side).repeat_interleave(side).view(1, side, side, 1)
        c = torch.arange(side).repeat(side).view(1, side, side, 1)
        coords = torch.cat([r, c], -1).float()
        shuffled = self.vlm().pixel_shuffle(coords, scale_factor=cfg.downsample_ratio)
        flat = shuffled.reshape(-1, shuffled.shape[-1])
        scale = round(1 / cfg.downsample_ratio)
        return flat[:, 0::2].amin(-1).long() // scale, flat[:, 1::2].amin(-1).long() // scale

    def vision_tower(self) -> VisionTower | None:
        """The InternViT encoder layers; features from ``vision_feature_layer`` (``-1``: the last layer, read
        from ``last_hidden_state``); position 0 of every tile is its CLS token."""
        tower = self.vlm().vision_tower
        layers = tuple(tower.encoder.layer)
        cls_token = getattr(getattr(tower, "embeddings", None), "cls_token", None)
        feature = self.vlm().config.vision_feature_layer
        return VisionTower(
            name=type(tower).__name__,
            layers=layers,
            feature_layer=layer_of_hidden_state(feature, len(layers)),
            has_cls=isinstance(cls_token, Tensor),
        )

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per tile: CLS dropped (``default`` strategy), the ``p x p`` patch grid
        pixel-shuffled by the model's own ``pixel_shuffle``; each token the mean of the patches whose channels
        it concatenates. One tensor per tile, in ``pixel_values`` order."""
        vlm = self.vlm()
        cfg = vlm.config
        strategy = call.arg("vision_feature_select_strategy", 2) or cfg.vision_feature_select_strategy
        ratio = cfg.downsample_ratio
        group = round(1 / ratio**2)
        out = []
        for v in values:
            grid = square_patches(v, strategy)
            if grid is None:
                return None
            shuffled = vlm.pixel_shuffle(grid.unsqueeze(0).contiguous(), scale_factor=ratio)
            out.append(shuffled.reshape(-1, group, grid.shape[-1]).mean(1))
        return out

    def image_layouts(self, call: ImageCall) -> list[TokenLayout]:
        feats = call.features()
        if not feats:
            return []
        per_tile = int(feats[0].shape[0])
        tiles = [run // per_tile for run in self._runs]
        if sum(tiles) != len(feats) or any(run % per_tile for run in self._runs):
            return super().image_layouts(call)
        rows, cols = self.tile_grid()
        if rows.numel() != per_tile:
            return super().image_layouts(call)
        layouts = []
        for i, n in enumerate(tiles):
            views = [0] if n == 1 else [*range(1, n), 0]
            parts = [_tile(rows, cols, view=v, image=i) for v in views]
            layouts.append(TokenLayout.cat(parts))
        return layouts


def _tile(rows: Tensor, cols: Tensor, *, view: int, image: int) -> TokenLayout:
    """A ``(1, n)`` layout of one tile with the given rows and columns."""
    return TokenLayout(
        image=torch.full_like(rows, image)[None],
        view=torch.full_like(rows, view)[None],
        row=rows[None].clone(),
        col=cols[None].clone(),
        newline=torch.zeros_like(rows, dtype=torch.bool)[None],
    )
