"""PaddleOCR-VL: the generic adapter plus its packed vision tower, whose frames hold their patches in raster order.

PaddleOCR-VL (``paddleocr_vl``) has Qwen2-VL's scheme on the language side (M-RoPE from ``get_rope_index``, one
``image_grid_thw`` row per image), which the generic adapter serves. Its tower (``visual.vision_model``: patch
embeddings plus learned position embeddings interpolated per patch, then encoder layers over one packed sequence,
``cu_seqlens`` separating the frames, per-patch 2-D rotary positions, then ``post_layernorm``) holds each frame's
patches in *raster* order; its projector (``projector``: a per-patch ``pre_norm``, then an MLP over each ``2 x 2``
unit) regroups every unit from the frame's rows, so it needs every frame's full grid. :class:`PaddleOCRVLAdapter`
adds the tower:

* **Vision attention** (:meth:`~PaddleOCRVLAdapter.vision_tower`): the encoder's layers, probed at the last (its
  output, after the per-patch ``post_layernorm``, is the projector's input); one attention call per frame, so each
  token gets the mean of its ``2 x 2`` block of raster patches' scores
  (:func:`~tokenprune.adapters.vision.raster_unit_means`). No CLS token: ``attention: mean`` only.
* **``pre_projector`` and ``vision_layer: k``** (:meth:`~PaddleOCRVLAdapter.packed_tower`, ``raster=True``): the
  stages reduce whole units, as on Qwen2-VL's tower; :class:`~tokenprune.adapters.packed.PackedUnits` gathers each
  unit's 4 patches from their raster places for the reducer and puts them back. A cut between layers is exact: the
  position embeddings were added per patch before layer 0, the kept patches stay in the tower's raster order with
  their own rotary embeddings, and ``cu_seqlens`` / ``max_seqlen`` are recomputed per frame
  (:mod:`tokenprune.engine.packed_stages`). In the projector's pre-hook (:meth:`~PaddleOCRVLAdapter.projector`) the
  removed units come back as zero patches, the projector runs on every frame's full grid, and the removed units'
  tokens leave at the language model's input.
"""

from __future__ import annotations

from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.generic import GenericAdapter
from tokenprune.adapters.packed import PackedTower
from tokenprune.adapters.vision import raster_unit_means


class PaddleOCRVLAdapter(GenericAdapter):
    """PaddleOCR-VL: the generic adapter plus its packed tower (``visual``), frames' patches in raster order; the
    projector regroups each ``2 x 2`` unit from them."""

    name = "paddleocr_vl"
    model_types = ("paddleocr_vl",)
    notes = (
        "the generic adapter's layouts and M-RoPE, plus the raster-ordered packed tower (vision attention, "
        "pre_projector and vision_layer on whole 2x2 units)"
    )

    def merge(self) -> int:
        """``m``, the side of a merge unit in patches (``vision_config.spatial_merge_size``)."""
        return int(self.vlm().config.vision_config.spatial_merge_size)

    def vision_tower(self) -> VisionTower | None:
        """The encoder's layers, probed at the last (its output, after ``post_layernorm``, is the projector's input)."""
        encoder = self.vlm().visual.vision_model.encoder
        layers = tuple(encoder.layers)
        return VisionTower(type(self.vlm().visual).__name__, layers, len(layers) - 1, False, "last layer")

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per frame, patches in raster order; each token the mean of its 2x2 block of patches."""
        grid = call.arg("image_grid_thw", 1)
        if grid is None:
            return None
        return raster_unit_means(grid, values, self.merge())

    def packed_tower(self) -> PackedTower | None:
        """The tower (called as ``visual(pixel_values=..., grid_thw=...)``), ``m x m`` units regrouped from raster
        patches."""
        return PackedTower(self.vlm().visual, self.merge(), raster=True)

    def projector(self) -> nn.Module | None:
        """The projector (``projector(features, image_grid_thw)``, features ``(N, Dv)`` in the tower's order): a
        ``pre_projector`` stage runs in its pre-hook."""
        return self.vlm().projector
