"""Mistral3: a Pixtral vision tower at native resolution, ``[IMG_BREAK]`` tokens at row ends.

An image of ``H x W`` pixels (after the processor's resize to multiples of ``patch_size *
spatial_merge_size``) gives a ``rows x cols`` grid of merged patches, ``rows = H // (patch_size *
spatial_merge_size)``. The processor writes it into the prompt in raster order, one ``[IMG]``
placeholder per merged patch and one ``[IMG_BREAK]`` after every row, the last of which is replaced
by ``[IMG_END]``::

    [IMG] [IMG] [IMG] [IMG_BREAK]
    [IMG] [IMG] [IMG] [IMG_BREAK]
    [IMG] [IMG] [IMG] [IMG_END]

The model scatters the image features onto the ``[IMG]`` positions only; ``[IMG_BREAK]`` keeps its
text embedding. This adapter counts the ``[IMG]`` *and* ``[IMG_BREAK]`` tokens as visual tokens,
with the breaks flagged as row-end newlines in the layout: exactly LLaVA-NeXT's ``image_newline``.
Pipelines then protect them by default (``protect_newlines``), and spatial reducers see the rows.
``[IMG_END]`` closes the image and stays text, so the last row has no newline.

Everything else is LLaVA-like and the :class:`~tokenprune.adapters.ModelAdapter` defaults apply:
``model.model`` calls ``get_image_features(pixel_values, image_sizes)`` and merges the features
into ``inputs_embeds``; the language model (Mistral, 1-D RoPE) is ``model.model.language_model``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenprune.adapters import ImageCall, ModelAdapter
from tokenprune.layout import TokenLayout

IMAGE_BREAK_TOKEN_ID = 12
"""``[IMG_BREAK]`` in Mistral's tekken vocabulary (every Mistral3 checkpoint); ``Mistral3Config``
has no field for it, so a config attribute ``image_break_token_id`` overrides this default."""


class Mistral3Adapter(ModelAdapter):
    """Mistral3: one ``rows x cols`` grid per image, ``[IMG_BREAK]`` tokens as row-end newlines."""

    name = "mistral3"
    model_types = ("mistral3",)
    notes = "one grid per image at native resolution; [IMG_BREAK] row ends are newline tokens (protected)"

    def image_break_token_id(self) -> int:
        """The id of ``[IMG_BREAK]``: ``config.image_break_token_id`` if set, else Mistral's 12."""
        value = getattr(self.model.config, "image_break_token_id", None)
        return IMAGE_BREAK_TOKEN_ID if value is None else int(value)

    def visual_mask(self, input_ids: Tensor) -> Tensor:
        """``[IMG]`` placeholders and ``[IMG_BREAK]`` row ends."""
        return (input_ids == self.image_token_id()) | (input_ids == self.image_break_token_id())

    def image_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """Per image: its grid in raster order, a newline after every row but the last.

        Raises:
            ValueError: the grid from ``image_sizes`` disagrees with the number of feature rows the
                model returned (the layout would describe other tokens than the model's).
        """
        image_sizes = call.arg("image_sizes", 1)
        if image_sizes is None:
            raise ValueError("mistral3: get_image_features was called without image_sizes")
        cfg = self.vlm().config
        cell = cfg.vision_config.patch_size * cfg.spatial_merge_size  # pixels per merged patch
        features = call.features()
        layouts = []
        for i, (height, width) in enumerate(torch.as_tensor(image_sizes).tolist()):
            rows, cols = height // cell, width // cell
            if i < len(features) and features[i].shape[0] != rows * cols:
                raise ValueError(
                    f"mistral3: image {i} of {height}x{width} px should give {rows}x{cols} features, "
                    f"the model returned {features[i].shape[0]}"
                )
            grid = TokenLayout.grid(rows, cols, newlines=True, image=i)  # rows * (cols + 1) tokens
            keep = torch.arange(rows * (cols + 1) - 1)[None]  # the last break is [IMG_END], not visual
            layouts.append(grid.gather(keep))
        return layouts
