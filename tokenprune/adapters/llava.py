"""LLaVA-1.5: one square grid of ``(image_size / patch_size)^2`` tokens per image."""

from __future__ import annotations

from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter, VisionTower
from tokenprune.adapters.vision import drop_cls, encoder_tower


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 (and other ``llava`` checkpoints): a ``g x g`` grid per image, 1-D RoPE."""

    name = "llava"
    model_types = ("llava",)
    notes = "one g x g grid per image"

    def projector(self) -> nn.Module | None:
        """The per-token MLP ``multi_modal_projector`` (``pre_projector`` stages run before it)."""
        return self.vlm().multi_modal_projector

    def vision_tower(self) -> VisionTower | None:
        """The CLIP (SigLIP for OneVision) tower; features from ``vision_feature_layer`` (``-2``: the second-to-last
        layer)."""
        cfg = self.vlm().config
        return encoder_tower(self.vlm().vision_tower, cfg.vision_feature_layer)

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per image, CLS dropped under the ``default`` strategy: 1:1."""
        strategy = call.arg("vision_feature_select_strategy", 2) or self.vlm().config.vision_feature_select_strategy
        return [drop_cls(v, strategy) for v in values]
