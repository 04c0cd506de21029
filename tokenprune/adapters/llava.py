"""LLaVA-1.5: one square grid of ``(image_size / patch_size)^2`` tokens per image."""

from __future__ import annotations

from tokenprune.adapters.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5 (and other ``llava`` checkpoints): a ``g x g`` grid per image, 1-D RoPE."""

    name = "llava"
    model_types = ("llava",)
    notes = "one g x g grid per image"
