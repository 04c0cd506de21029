"""LLaVA-OneVision: LLaVA-NeXT's anyres layout with a Qwen2 language model and SigLIP features.

Single-image samples are tiled (base view + unpadded grid + newline per row; a very large grid is
bilinearly downscaled to at most ``anyres_max_9`` tiles, in which case the reported row/column of a
high-resolution token is the nearest original one). Multi-image samples give one untiled view per
image.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from tokenprune.adapters.base import ImageCall
from tokenprune.adapters.llava_next import LlavaNextAdapter
from tokenprune.adapters.llava_next_video import frame_grids
from tokenprune.layout import TokenLayout


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: anyres tiles with newline tokens (like LLaVA-NeXT), Qwen2 LM."""

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    notes = "anyres like llava_next; multi-image samples are untiled"

    def _tiles(self, call: ImageCall, image_sizes: Tensor) -> list[int]:
        cfg = self.vlm().config
        per_sample = call.arg("batch_num_images", 5)
        patch = [True] * len(image_sizes) if per_sample is None else [n == 1 for n in per_sample for _ in range(n)]
        return [
            image_size_to_num_patches(
                image_size=size, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size
            )
            if p
            else 1
            for size, p in zip(image_sizes, patch, strict=False)
        ]

    def video_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """Per video, one bilinearly pooled grid per frame, then one ``image_newline`` (video-level)."""
        return frame_grids(call, trailing_newline=True)

    def _pack(
        self, call: ImageCall, coords: list[Tensor], image_sizes: Tensor, newline: Tensor | None = None
    ) -> list[Tensor]:
        ratio = call.arg("vision_aspect_ratio", 4) or self.vlm().config.vision_aspect_ratio
        newline = torch.full((3,), -1.0) if newline is None else newline
        packed, _ = self.vlm().pack_image_features(
            coords, image_sizes, image_newline=newline, vision_aspect_ratio=ratio
        )
        return list(packed)
