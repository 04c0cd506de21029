"""Idefics3 and SmolVLM: each image is split into crops plus a downscaled global image.

Every crop (and the global image) gives ``(g / scale_factor)^2`` visual tokens after the pixel
shuffle, wrapped in ``<fake_token_around_image>`` and ``<row_i_col_j>`` / ``<global-img>`` text
tokens, which are never pruned. The layout reports one view per crop, each a square grid; the
image index counts crops within the sample (the crop-to-image grouping is not recoverable from the
features alone).

Vision attention: the SigLIP tower runs once over the real crops of the batch (all-zero padding crops
are dropped), one tower sequence per crop, features from its last layer; each visual token is the pixel
shuffle of ``scale_factor^2`` neighbouring patches, so it gets their mean (the model's own
``connector.pixel_shuffle`` on the values).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter, VisionTower
from tokenprune.adapters.vision import encoder_tower


class Idefics3Adapter(ModelAdapter):
    """Idefics3 / SmolVLM: a square grid per crop; the language model is ``model.text_model``."""

    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    notes = "one square grid per crop (and global image); wrapper text tokens are kept"
    pre_projector_refusal = (
        "its connector pixel-shuffles each group of patches into one token, so a projector input is not one "
        "language-model token"
    )

    def language_model(self) -> nn.Module:
        return self.vlm().text_model

    def vision_tower(self) -> VisionTower | None:
        """The SigLIP tower (no CLS); the features are its last layer's output (``last_hidden_state``)."""
        return encoder_tower(self.vlm().vision_model, -1)

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per real crop; each token the mean of the ``scale_factor^2`` patches the pixel
        shuffle concatenates; one tensor per sample (its crops in order), as ``get_image_features`` returns."""
        pixel_values = call.arg("pixel_values", 0)
        if pixel_values is None:
            return None
        flat = pixel_values.reshape(-1, *pixel_values.shape[2:])
        real = (flat == 0.0).sum(dim=(-1, -2, -3)) != flat.shape[1:].numel()
        per_sample = real.reshape(pixel_values.shape[:2]).sum(1).tolist()
        connector = self.vlm().connector
        group = connector.scale_factor**2
        tokens = []
        for v in values:
            shuffled = connector.pixel_shuffle(v[None], connector.scale_factor)[0]
            tokens.append(shuffled.reshape(shuffled.shape[0], group, v.shape[-1]).mean(1))
        out, start = [], 0
        for n in per_sample:
            out.append(torch.cat(tokens[start : start + n]) if n else values[0].new_zeros(0, values[0].shape[-1]))
            start += n
        return out
