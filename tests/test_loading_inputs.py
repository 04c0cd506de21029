"""Processor outputs in the model's dtype: every floating-point input, whatever the family names it."""

from __future__ import annotations

import torch
from transformers import BatchFeature

from tokenprune.adapters.loading import floats_to


def test_every_pixel_input_is_cast_and_ids_are_kept():
    """Video-LLaVA on transformers 5.18 names its images ``pixel_values_images``; Molmo2 and Gemma 4 carry integer
    index tensors beside the pixels: the first is cast with ``pixel_values`` and ``pixel_values_videos``, the others
    are left as they are, in a dict and in a ``BatchFeature``."""
    for make in (dict, BatchFeature):
        inputs = make(
            {
                "input_ids": torch.tensor([[1, 2, 3]]),
                "pixel_values": torch.rand(1, 3, 4, 4),
                "pixel_values_images": torch.rand(1, 3, 4, 4),
                "pixel_values_videos": torch.rand(1, 2, 3, 4, 4),
                "image_position_ids": torch.tensor([[0, 1]]),
                "image_sizes": [(4, 4)],
            }
        )
        out = floats_to(inputs, torch.bfloat16)
        assert out is inputs
        for key in ("pixel_values", "pixel_values_images", "pixel_values_videos"):
            assert out[key].dtype == torch.bfloat16, key
        assert out["input_ids"].dtype == torch.long and out["image_position_ids"].dtype == torch.long
        assert out["image_sizes"] == [(4, 4)]
