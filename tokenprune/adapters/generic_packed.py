"""The generic adapter with a Qwen2-VL-like packed vision tower: vision attention, ``pre_projector`` and
``vision_layer`` stages on whole merge units.

Qwen3.5's, GLM-4.xV's and ERNIE-4.5-VL's towers run every image's patches as one packed sequence (``cu_seqlens``
separating the frames, per-patch 2-D rotary positions from ``grid_thw``; Qwen3.5's and GLM's learned position
embeddings interpolated per patch and added before the first block) and build one language-model token from each
``m x m`` merge unit of consecutive patches. Everything else about these families (hybrid layers, M-RoPE from
``get_rope_index``, ``moe_mm_token_type_ids``, video layouts) is the generic adapter's; :class:`PackedTowerAdapter`
adds the tower:

* **Vision attention** (:meth:`PackedTowerAdapter.vision_tower`): the tower's blocks, probed at the last one (the
  features' block); one attention call per frame, so each merged token gets the mean of its unit's patches' scores
  (:func:`~tokenprune.adapters.vision.merged_unit_means`, as Qwen2-VL's). No CLS token: ``attention: mean`` only.
  **Videos** too (``VisionTower.videos``): ``get_video_features`` runs the same tower on every temporal patch of
  ``video_grid_thw`` as a frame of its own (Qwen3.5 through ``get_image_features``, GLM-4.xV with one ``(1, h, w)``
  grid per frame, ERNIE directly), so a video token gets its unit's patches' mean in its frame
  (:meth:`PackedTowerAdapter.map_vision_video_patches`); ERNIE's resampler merges pairs of frames, and its video
  token gets the mean over the unit's patches of both frames (:func:`~tokenprune.adapters.vision.paired_frame_means`).
* **``pre_projector`` and ``vision_layer: k``** (:mod:`tokenprune.adapters.packed`): whole merge units, as for
  Qwen2-VL. A cut between blocks is exact: the position embeddings were added per patch before block 0, the rotary
  embeddings are gathered per kept patch and ``cu_seqlens`` / ``max_seqlen`` recomputed from the kept units per frame
  (:mod:`tokenprune.engine.packed_stages`); before the merger's per-patch norm (:meth:`PackedTowerAdapter.projector`)
  the removed units come back as zero patches, the merger runs on every unit, and the removed units' tokens leave at
  the language model's input.

PaddleOCR-VL's tower is packed too, but holds each frame's patches in raster order (its projector regroups the
units): :mod:`tokenprune.adapters.paddleocr_vl`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.generic import GenericAdapter
from tokenprune.adapters.packed import PackedTower
from tokenprune.adapters.vision import merged_unit_means, paired_frame_means


class PackedTowerAdapter(GenericAdapter):
    """The generic adapter plus a packed tower (``blocks``, ``config.spatial_merge_size``, no windows).

    Subclasses name their model types, the tower's attribute on the base model (:attr:`tower_attribute`) and the
    tower's module the merger starts with (:attr:`merger_start`, :meth:`projector`).
    """

    name = "packed_tower"
    model_types = ()
    tower_notes = "last block (the merger's input)"
    tower_attribute = "visual"  # called as ``tower(pixel_values, grid_thw)``
    merger_start: ClassVar[str] = "merger"
    """The tower's per-patch module that the merger starts with, called on the ``(N, Dv)`` patches."""
    tower_videos: ClassVar[bool] = True
    """The tower also encodes the videos, one sequence per temporal patch of ``video_grid_thw``, and
    :meth:`map_vision_video_patches` maps them (``False``: vision attention on images only)."""

    def vision_tower(self) -> VisionTower | None:
        """The tower's blocks; the default probed block is the last one, whose output the merger reads. The probe
        also watches them during ``get_video_features`` (:attr:`tower_videos`)."""
        visual = self.tower()
        blocks = tuple(visual.blocks)
        return VisionTower(
            type(visual).__name__, blocks, len(blocks) - 1, False, self.tower_notes, videos=self.tower_videos
        )

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per frame; each merged token the mean of its unit's ``m * m`` consecutive patches."""
        grid = call.arg("image_grid_thw", 1)
        if grid is None:
            return None
        return merged_unit_means(grid, values, self.tower().config.spatial_merge_size ** 2)

    def map_vision_video_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per temporal patch of ``video_grid_thw`` (``(videos, 3)``, the call's second
        argument), frames in order; each video token the mean of its unit's ``m * m`` consecutive patches in its
        frame, ``(t * h * w / m^2, C)`` per video, frames one after the other as :meth:`video_layouts` orders them."""
        grid = call.arg("video_grid_thw", 1)
        if grid is None:
            return None
        return merged_unit_means(grid, values, self.tower().config.spatial_merge_size ** 2)

    def packed_tower(self) -> PackedTower | None:
        """The packed tower: merge units of ``spatial_merge_size`` patches a side, every block over whole frames."""
        visual = self.tower()
        return PackedTower(visual, int(visual.config.spatial_merge_size))

    def projector(self) -> nn.Module | None:
        """The tower's :attr:`merger_start` module: a ``pre_projector`` stage runs in its pre-hook."""
        return getattr(self.tower(), self.merger_start)


class Qwen35Adapter(PackedTowerAdapter):
    """Qwen3.5 / Qwen3.5-MoE: the generic adapter (hybrid Gated DeltaNet layers, M-RoPE) plus Qwen3-VL's packed
    tower without DeepStack; the merger is its PatchMerger (a per-patch LayerNorm, then an MLP over each unit's 4
    patches)."""

    name = "qwen3_5"
    model_types = ("qwen3_5", "qwen3_5_moe")
    notes = "generic adapter + packed tower (vision attention, pre_projector and vision_layer on whole 2x2 units)"


class Glm4vAdapter(PackedTowerAdapter):
    """GLM-4.1V / 4.5V / 4.6V, GLM-OCR: the generic adapter plus the packed tower, whose merger is a per-patch
    RMSNorm (``post_layernorm``), a strided ``m x m`` convolution over each unit (``downsample``) and an MLP."""

    name = "glm4v"
    model_types = ("glm4v", "glm4v_moe", "glm46v", "glmga", "glm_ocr")
    notes = Qwen35Adapter.notes
    merger_start = "post_layernorm"


class Ernie45VLAdapter(PackedTowerAdapter):
    """ERNIE-4.5-VL: the generic adapter (per-token ``moe_mm_token_type_ids``, video frames merged in pairs) plus the
    packed tower at ``vision_tower``, whose per-patch LayerNorm ``ln`` precedes the resampler (an MLP over each unit's
    4 patches, then over pairs of frames: an image's frame is duplicated)."""

    name = "ernie4_5_vl_moe"
    model_types = ("ernie4_5_vl_moe",)
    notes = Qwen35Adapter.notes + " of images"
    tower_attribute = "vision_tower"
    merger_start = "ln"

    def map_vision_video_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per temporal patch of ``video_grid_thw``; the resampler builds each video token from
        one 2x2 unit of ``temporal_merge_size`` (2) consecutive frames (``_temporal_slicing``: frames ``2k`` and
        ``2k + 1``), so the token is the mean of those ``2 * 4`` patches, ``t / 2`` frames of tokens per video."""
        grid = call.arg("video_grid_thw", 1)
        if grid is None:
            return None
        vision = self.vlm().config.vision_config
        return paired_frame_means(grid, values, vision.spatial_merge_size**2, int(vision.temporal_merge_size))
