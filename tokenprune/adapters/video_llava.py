"""Video-LLaVA: LLaVA-1.5's images, and videos of frames x 257 tokens from a video tower of its own.

transformers' ``VideoLlavaModel`` has two CLIP towers. Its image path is LLaVA-1.5's (``image_tower``,
``vision_feature_layer``, the [CLS] token dropped under the ``default`` strategy: a ``g x g`` grid per image).
Its video path (``get_video_features``) runs every frame of ``pixel_values_videos`` (``(videos, frames, C, H,
W)``, 8 frames in the checkpoints) through ``video_tower`` and keeps the [CLS] token whatever the strategy: each
frame is ``1 + g * g`` tokens (257 for the 224 px checkpoints: ``video_seq_length = 2056``), the frame's [CLS]
token first, then its patches in raster order, both projected by the one ``multi_modal_projector``.

The layouts say so: per video, frame ``f`` is the [CLS] token as a ``1 x 1`` view of its own (``view`` 1, so
that spatial reducers never take it for a grid cell) followed by the ``g x g`` patch grid (``view`` 0), every
token with ``frame = f`` and ``video`` set. Frame-wise video reducers (DyCoke, VidCom2, HoliTom, EVS) compare the
frames token by token over ``(frames, 1 + g * g)``, the [CLS] tokens with each other. An image under the ``full``
strategy is laid out the same way (its [CLS] token, then its grid).

Vision-encoder attention: the image tower's on images, the video tower's on videos (``VisionTower.video_layers``,
one tower sequence per frame, mapped 1:1 to the frame's tokens since the video features keep the [CLS] token).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.llava import LlavaAdapter
from tokenprune.adapters.vision import drop_cls, encoder_tower
from tokenprune.layout import TokenLayout


def cls_and_grid(count: int, *, image: int = 0, frame: int = 0, video: bool = False) -> TokenLayout | None:
    """The layout of ``count = 1 + g * g`` tokens: a [CLS] token (view 1, a ``1 x 1`` grid), then a ``g x g``
    grid (view 0); ``None`` where ``count - 1`` is not a square."""
    side = math.isqrt(max(count - 1, 0))
    if side == 0 or side * side != count - 1:
        return None
    cls = TokenLayout.grid(1, 1, view=1, image=image, frame=frame, video=video)
    return TokenLayout.cat([cls, TokenLayout.grid(side, side, image=image, frame=frame, video=video)])


class VideoLlavaAdapter(LlavaAdapter):
    """Video-LLaVA: a ``g x g`` grid per image (LLaVA-1.5); per video, every frame its [CLS] token and its grid."""

    name = "video_llava"
    model_types = ("video_llava",)
    notes = (
        "images as llava; video: per frame its [CLS] token (view 1) then its g x g grid, frame index in the layout; "
        "vision attention from the image tower and the video tower"
    )

    def vision_tower(self) -> VisionTower | None:
        """The image tower (``image_tower``), and for videos the video tower (``video_tower``, the same
        architecture), both read at ``vision_feature_layer``."""
        vlm = self.vlm()
        tower = encoder_tower(vlm.image_tower, vlm.config.vision_feature_layer)
        video = encoder_tower(vlm.video_tower, vlm.config.vision_feature_layer)
        if len(video.layers) != len(tower.layers):
            return tower
        return replace(tower, videos=True, video_layers=video.layers)

    def map_vision_video_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One video-tower sequence per frame, [CLS] kept (the video features keep it): per video its frames'
        sequences in order, 1:1."""
        pixels = call.arg("pixel_values_videos", 0)
        if pixels is None or pixels.dim() != 5 or not values:
            return None
        frames = int(pixels.shape[1])
        return [torch.cat(values[i : i + frames]) for i in range(0, len(values), frames)]

    def _strategy(self, call: ImageCall) -> str:
        """The image call's ``vision_feature_select_strategy`` (by keyword or at its place in the signature: third
        before 5.21, whose images come as ``pixel_values_images`` alone; fourth from 5.21), else the config's."""
        vlm = self.vlm()
        return call.argument("vision_feature_select_strategy", vlm.get_image_features) or (
            vlm.config.vision_feature_select_strategy
        )

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One image-tower sequence per image, CLS dropped under the ``default`` strategy: 1:1."""
        return [drop_cls(v, self._strategy(call)) for v in values]

    def image_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """One ``g x g`` grid per image; under the ``full`` strategy its [CLS] token first (:func:`cls_and_grid`)."""
        if self._strategy(call) != "full":
            return super().image_layouts(call)
        layouts = []
        for i, feats in enumerate(call.features()):
            layout = cls_and_grid(int(feats.shape[0]), image=i)
            layouts.append(layout if layout is not None else TokenLayout.grid(1, int(feats.shape[0]), image=i))
        return layouts

    def video_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """Per video of ``pixel_values_videos`` (``(videos, frames, C, H, W)``), its frames in order, each its
        [CLS] token and its ``g x g`` grid (:func:`cls_and_grid`); the output holds one ``(1 + g * g, D)`` tensor
        per frame. Frames whose count is not ``1 + g * g`` (a tower without [CLS]) are one row each."""
        pixels = call.arg("pixel_values_videos", 0)
        per_frame = call.features()
        frames = int(pixels.shape[1]) if pixels is not None and pixels.dim() == 5 else 1
        layouts = []
        for v in range(len(per_frame) // frames):
            parts = []
            for f in range(frames):
                count = int(per_frame[v * frames + f].shape[0])
                part = cls_and_grid(count, image=v, frame=f, video=True)
                parts.append(part if part is not None else TokenLayout.grid(1, count, image=v, frame=f, video=True))
            layouts.append(TokenLayout.cat(parts))
        return layouts

    def projector(self) -> nn.Module | None:
        """The per-token MLP ``multi_modal_projector`` (images and videos share it)."""
        return self.vlm().multi_modal_projector
