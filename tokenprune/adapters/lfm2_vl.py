"""LFM2-VL and LFM3-VL: the generic adapter plus vision attention on their towers.

Everything about these families but the tower (hybrid short-convolution layers, layouts from ``spatial_shapes`` or
``image_grid_thw``) is the generic adapter's; the adapters here add the vision tower the vision probe reads and the
map from its patches to the language model's tokens.

* **LFM2-VL** (:class:`Lfm2VlAdapter`): a SigLIP2 NaFlex tower (``vision_tower.encoder.layers``) runs each tile and
  the thumbnail as one sequence of ``max_num_patches`` positions: the image's ``h x w`` patches in raster order
  (``spatial_shapes[i] = (h, w)``), then padding (``pixel_attention_mask`` false), which the attention masks and
  which maps to no token. The features are the last layer's output (after ``post_layernorm``), the default probed
  layer; no CLS token (``attention: mean`` only). The projector pixel-unshuffles each ``2 x 2`` block of patches
  (``downsample_factor``) into one token, tokens in raster order over ``(h / 2, w / 2)``: each token gets the mean of
  its block's four patches (:func:`naflex_block_means`; transformers 5.24 on gathers the blocks of every tile at once,
  5.18-5.21 unshuffle tile by tile: the same blocks). ``pre_projector`` and ``vision_layer`` stages are refused: the
  projector's input row is a block of four patches, not one patch.
* **LFM3-VL** (:class:`Lfm3VlAdapter`): a packed tower over ``image_grid_thw`` (Qwen2-VL's layout: each frame one
  sequence, its patches stored unit by unit, ``2 x 2`` patches a unit) whose layers are gated short convolutions
  over the frame's patch grid or bidirectional attention (``vision_config.layer_types``). The vision tower described
  is its *attention* layers only (``vision_layer`` indices of the probe count them), probed by default at the last
  one; each token gets the mean of its unit's four patches (the projector normalizes each patch, then concatenates
  the unit's four). Where a convolution layer follows the probed layer (the released config: ``conv`` at 0, 1 and
  every odd layer, so the last layer is one) it mixes each patch with its ``3 x 3`` grid neighbours before the
  projector: the map counts the unit's own patches, the neighbours' share is not mapped. A tower without attention
  layers serves no vision attention. ``pre_projector`` and ``vision_layer`` stages are refused (the convolutions
  need every patch of a frame's grid, and the projector merges units). Videos run through the same tower
  (``get_video_features`` calls ``get_image_features`` on ``video_grid_thw``; the engine records the outer call), one
  sequence per temporal patch: their tokens get vision attention as the images' do.
"""

from __future__ import annotations

from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.generic import GenericAdapter
from tokenprune.adapters.vision import block_means, encoder_tower, merged_unit_means


class Lfm2VlAdapter(GenericAdapter):
    """LFM2-VL: the generic adapter plus its SigLIP2 NaFlex tower (padded patch rows, pixel-unshuffled 2x2)."""

    name = "lfm2_vl"
    model_types = ("lfm2_vl",)
    notes = "generic adapter + SigLIP2 NaFlex tower (vision attention: each token its 2x2 block's mean, padding none)"
    pre_projector_refusal = (
        "its projector pixel-unshuffles each 2x2 block of tower patches into one row (downsample_factor), so a row "
        "is not one tower patch"
    )

    def vision_tower(self) -> VisionTower | None:
        """The encoder's layers; the features are the last one's output (``last_hidden_state``), no CLS."""
        return encoder_tower(self.tower(), -1, "last layer (its output, after post_layernorm, is the projector's)")

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per tile (``pixel_values`` row); each token the mean of its ``f x f`` block of the
        tile's ``h x w`` raster patches, the padding after them mapped to no token."""
        shapes = call.arg("spatial_shapes", 1)
        if shapes is None or len(values) != shapes.shape[0]:
            return None
        return naflex_block_means(shapes, values, int(self.vlm().config.downsample_factor))


def naflex_block_means(spatial_shapes: Tensor, values: list[Tensor], factor: int) -> list[Tensor]:
    """Per tile ``i`` with ``spatial_shapes[i] = (h, w)``, the ``(h // f * w // f, C)`` token values of its
    ``(S_i, C)`` sequence values: positions ``0 .. h w - 1`` are its patches in raster order (the rest padding,
    ignored); token ``(r, c)``, in raster order, is the mean of patches ``(f r + a, f c + b)``, ``a, b < f`` (a last
    odd row or column is dropped, as the model drops it)."""
    out = []
    for (h, w), v in zip(spatial_shapes.tolist(), values, strict=True):
        rows, cols = h // factor * factor, w // factor * factor
        out.append(block_means(v[: h * w].reshape(h, w, v.shape[-1])[:rows, :cols], factor))
    return out


class Lfm3VlAdapter(GenericAdapter):
    """LFM3-VL: the generic adapter plus the attention layers of its packed conv/attention tower."""

    name = "lfm3_vl"
    model_types = ("lfm3_vl",)
    notes = "generic adapter + the attention layers of its packed tower (vision attention: each token its unit's mean)"
    pre_projector_refusal = (
        "its tower's short-convolution layers run over every patch of a frame's grid and its projector merges each "
        "2x2 unit of patches into one token, so no stage can drop tower patches before the projector"
    )

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per frame; each token the mean of its unit's ``m * m`` consecutive patches."""
        grid = call.arg("image_grid_thw", 1)
        if grid is None:
            return None
        return merged_unit_means(grid, values, int(self.tower().spatial_merge_size) ** 2)

    def map_vision_video_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per temporal patch of ``video_grid_thw``; each token the mean of its unit's patches."""
        grid = call.arg("video_grid_thw", 1)
        if grid is None:
            return None
        return merged_unit_means(grid, values, int(self.tower().spatial_merge_size) ** 2)

    def vision_tower(self) -> VisionTower | None:
        """The tower's attention layers (those with ``self_attn``), probed at the last; ``None`` where it has none."""
        attention = tuple(
            layer for layer in self.tower().layers if isinstance(getattr(layer, "self_attn", None), nn.Module)
        )
        if not attention:
            return None
        return VisionTower(
            name=type(self.tower()).__name__,
            layers=attention,
            feature_layer=len(attention) - 1,
            has_cls=False,
            videos=True,
            notes=(
                "the tower's attention layers only (vision layer indices count them), probed at the last; a "
                "convolution layer after it mixes 3x3 grid neighbours, which the map does not count"
            ),
        )
