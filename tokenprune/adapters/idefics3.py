"""Idefics3 and SmolVLM: each image is split into crops plus a downscaled global image.

Every crop (and the global image) gives ``(g / scale_factor)^2`` visual tokens after the pixel
shuffle, wrapped in ``<fake_token_around_image>`` and ``<row_i_col_j>`` / ``<global-img>`` text
tokens, which are never pruned. The layout reports one view per crop, each a square grid; the
image index counts crops within the sample (the crop-to-image grouping is not recoverable from the
features alone).
"""

from __future__ import annotations

from torch import nn

from tokenprune.adapters.base import ModelAdapter


class Idefics3Adapter(ModelAdapter):
    """Idefics3 / SmolVLM: a square grid per crop; the language model is ``model.text_model``."""

    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    notes = "one square grid per crop (and global image); wrapper text tokens are kept"

    def language_model(self) -> nn.Module:
        return self.vlm().text_model
