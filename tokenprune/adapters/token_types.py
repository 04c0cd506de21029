"""Video placeholders told apart from images by their token type, not their id.

transformers' processors return ``mm_token_type_ids`` beside ``input_ids`` for the models that take them
(``ProcessorMixin.create_mm_token_type_ids``: ``0`` text, ``1`` image, ``2`` video, ``3`` audio). Most of these
models also give videos a placeholder id of their own (Qwen2-VL's ``<|video_pad|>``), which
:meth:`~tokenprune.adapters.base.ModelAdapter.video_mask` reads. GLM-4.1V, 4.5V and 4.6V (``glm4v``,
``glm4v_moe``, ``glm46v``) do not: every frame's placeholders are the image token, and only their type, ``2``, says
they are a video's (``Glm4vProcessor.create_mm_token_type_ids``; the model's ``get_rope_index`` reads the types
to split ``video_grid_thw`` into one grid per frame). :func:`typed_video_mask` gives the engine both: a model that
types its placeholders has its videos recognised as videos, whatever id they carry, so they get the video layouts
of its adapter (``video_layouts`` from the ``get_video_features`` call) and the video reducers work on them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

#: The ``mm_token_type_ids`` value of a video token (transformers' ``create_mm_token_type_ids``).
VIDEO_TOKEN_TYPE = 2


def typed_video_mask(adapter: Any, input_ids: Tensor, token_types: Any) -> Tensor:
    """``(B, L)`` bool: the video tokens of ``input_ids``.

    The adapter's :meth:`~tokenprune.adapters.base.ModelAdapter.video_mask` (videos by placeholder id), and where
    the forward was given ``token_types`` (``mm_token_type_ids``, ``(B, L)``) the placeholders its
    :meth:`~tokenprune.adapters.base.ModelAdapter.visual_mask` marks that are typed :data:`VIDEO_TOKEN_TYPE`.
    Only placeholders count: a text token is never made a video token by its type.
    """
    video = adapter.video_mask(input_ids)
    if not isinstance(token_types, Tensor) or tuple(token_types.shape) != tuple(input_ids.shape):
        return video
    typed = token_types.to(input_ids.device) == VIDEO_TOKEN_TYPE
    return video | (adapter.visual_mask(input_ids) & typed)
