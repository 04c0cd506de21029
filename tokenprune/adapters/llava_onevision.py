"""LLaVA-OneVision: LLaVA-NeXT's anyres layout with a Qwen2 language model and SigLIP features.

Single-image samples are tiled (base view + unpadded grid + newline per row; a very large grid is
bilinearly downscaled to at most ``anyres_max_9`` tiles, in which case the reported row/column of a
high-resolution token is the nearest original one). Multi-image samples give one untiled view per
image. Videos: one bilinearly pooled grid per frame and one newline per video; the tower is also watched during
``get_video_features``, and its per-patch values reach the video tokens through the model's own pooling (a
bilinear interpolation: linear, weights summing to one), the newline built from no patch.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.llava_next import LlavaNextAdapter
from tokenprune.adapters.llava_next_video import frame_grids
from tokenprune.adapters.vision import drop_cls
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

    def vision_tower(self) -> VisionTower | None:
        """LLaVA-NeXT's tower description, also watched during ``get_video_features`` (``videos``)."""
        tower = super().vision_tower()
        return None if tower is None else dataclasses.replace(tower, videos=True)

    def map_vision_video_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per frame ([CLS] dropped under ``default``), pooled by the model's ``apply_pooling``;
        per video its frames in order, then ``0`` for the video's newline."""
        pixels = call.arg("pixel_values_videos", 0)
        if pixels is None or not values:
            return None
        strategy = call.arg("vision_feature_select_strategy", 2) or self.vlm().config.vision_feature_select_strategy
        frames = torch.stack([drop_cls(v, strategy) for v in values])
        pooled = self.vlm().apply_pooling(frames.float())  # (videos * frames, n, C)
        per_video = int(pixels.shape[1])
        out = []
        for i in range(0, pooled.shape[0], per_video):
            tokens = pooled[i : i + per_video].reshape(-1, pooled.shape[-1])
            out.append(torch.cat([tokens, tokens.new_zeros(1, tokens.shape[-1])]))
        return out
