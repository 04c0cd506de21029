"""The Qwen2.5-Omni and Qwen3-Omni thinkers: the generic adapter plus their vision towers.

Everything else about the thinkers stays the generic adapter's (:mod:`tokenprune.adapters.generic`): TMRoPE positions
from the model's ``get_rope_index`` (audio positions left as they are), merged ``image_grid_thw`` grids, video layouts,
Qwen3-Omni's DeepStack residuals, and the thinker as its own base model before transformers 5.21
(:func:`~tokenprune.adapters.shape.base_model_of`). Audio tokens are text to the engine (never pruned). The two
thinkers' vision towers are the packed towers of Qwen2.5-VL and Qwen3-VL, block for block, so the adapters reuse what
:class:`~tokenprune.adapters.qwen2_vl.Qwen2VLAdapter` and :class:`~tokenprune.adapters.qwen3_vl.Qwen3VLAdapter` say
about them:

* **Qwen2.5-Omni** (:class:`Qwen25OmniThinkerAdapter`): Qwen2.5-VL's windowed tower (``visual``: window attention
  except ``fullatt_block_indexes``, the merge units held in window order, the PatchMerger's output put back in raster
  order). Vision attention at the last full-attention block, each token the mean of its 2x2 unit's patches, read at
  the place the window order moved the unit to; ``pre_projector`` and ``vision_layer: k`` stages on whole merge units
  (:mod:`tokenprune.adapters.packed`, windows recomputed from the kept units), as for Qwen2.5-VL.
* **Qwen3-Omni** (:class:`Qwen3OmniThinkerAdapter`): Qwen3-VL's tower (learned position embeddings interpolated per
  patch, no windows) with DeepStack mergers. Vision attention at the last block, each token the mean of its unit's
  patches; ``pre_projector`` and ``vision_layer`` stages are refused as for Qwen3-VL (the DeepStack mergers read
  intermediate blocks of every unit).

Both towers dispatch their attention through ``ALL_ATTENTION_FUNCTIONS`` with ``config._attn_implementation``, one call
per frame (per window in Qwen2.5-Omni's windowed blocks), which the vision probe intercepts. No CLS token:
``attention: mean`` only. Videos run through ``get_video_features``, which calls the tower directly; the probe watches
the image call only, so a vision-attention stage on a prompt with video tokens must say ``tokens: image``
(:func:`tokenprune.engine.vision_probe.post_projector_vision_signals`), and the stages before the merger reduce the
images of such a prompt and leave its videos' tower call alone.
"""

from __future__ import annotations

from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.generic import GenericAdapter, GenericDeepStackAdapter
from tokenprune.adapters.packed import PackedTower
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter
from tokenprune.adapters.qwen3_vl import Qwen3VLAdapter


class Qwen25OmniThinkerAdapter(GenericAdapter):
    """Qwen2.5-Omni's thinker: the generic adapter plus Qwen2.5-VL's windowed packed tower (``visual``), described
    by :class:`~tokenprune.adapters.qwen2_vl.Qwen2VLAdapter`'s own methods (they read ``self.vlm().visual``)."""

    name = "qwen2_5_omni_thinker"
    model_types = ("qwen2_5_omni_thinker",)
    notes = (
        "generic adapter + Qwen2.5-VL's windowed tower (vision attention at the last full-attention block, "
        "pre_projector and vision_layer on whole 2x2 units)"
    )

    def vision_tower(self) -> VisionTower | None:
        """The tower's blocks, probed by default at the last full-attention block (``fullatt_block_indexes[-1]``,
        the last block in the released checkpoints), where each frame's patches attend to each other."""
        return Qwen2VLAdapter.vision_tower(self)  # type: ignore[arg-type]

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per frame (per window at a windowed block), in window order; each token the mean of
        its 2x2 unit's patches, taken from the place ``get_window_index`` moved the unit to."""
        return Qwen2VLAdapter.map_vision_patches(self, call, values)  # type: ignore[arg-type]

    _map_windowed = Qwen2VLAdapter._map_windowed

    def projector(self) -> nn.Module | None:
        """The tower's PatchMerger (``visual.merger``): ``pre_projector`` stages reduce whole units before it."""
        return Qwen2VLAdapter.projector(self)  # type: ignore[arg-type]

    def packed_tower(self) -> PackedTower | None:
        """Merge units of ``spatial_merge_size``, windows of ``window_size / spatial_merge_size / patch_size`` units,
        full attention at ``fullatt_block_indexes``."""
        return Qwen2VLAdapter.packed_tower(self)  # type: ignore[arg-type]


class Qwen3OmniThinkerAdapter(GenericDeepStackAdapter):
    """Qwen3-Omni-MoE's thinker: the generic adapter with DeepStack residuals plus Qwen3-VL's packed tower
    (``visual``), described by :class:`~tokenprune.adapters.qwen3_vl.Qwen3VLAdapter`'s own methods."""

    name = "qwen3_omni_moe_thinker"
    model_types = ("qwen3_omni_moe_thinker",)
    notes = (
        GenericDeepStackAdapter.notes + "; Qwen3-VL's tower: vision attention at its last block (pre_projector and "
        "vision_layer refused: DeepStack)"
    )
    pre_projector_refusal = Qwen3VLAdapter.pre_projector_refusal

    def vision_tower(self) -> VisionTower | None:
        """The tower's blocks, probed by default at the last one (the merger's input; the DeepStack taps read
        earlier blocks through mergers of the same units, the scores come from one block)."""
        return Qwen3VLAdapter.vision_tower(self)  # type: ignore[arg-type]

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per frame; each token the mean of its unit's ``m * m`` consecutive patches."""
        return Qwen2VLAdapter.map_vision_patches(self, call, values)  # type: ignore[arg-type]

    def projector(self) -> nn.Module | None:
        """None: ``pre_projector`` and ``vision_layer`` stages are refused (:attr:`pre_projector_refusal`)."""
        return None
