"""Molmo2: the generic adapter plus vision attention on its ViT, each pooled token the mean of its pooled patches.

Everything but the tower is the generic adapter's (:mod:`tokenprune.adapters.generic`): the image features added to
the placeholder embeddings, the image-block bidirectional mask sliced with the tokens, each image laid out as its
low-res global grid then its high-res canvas grid, each video as its frames
(:mod:`tokenprune.adapters.pooled_grids`). :class:`Molmo2Adapter` adds the tower (transformers 5.21-5.25
``modeling_molmo2.py``):

* **The tower** (``Molmo2VisionModel``, ``vision_tower.layers``): a ViT without a CLS token (a linear patch embedding
  plus learned position embeddings) that runs every crop of every image of the call as one sequence of ``P`` patches
  (``pixel_values`` ``(crops, P, D)``, or ``(images, crops, P, D)`` flattened to crops), each layer's ``self_attn``
  dispatching through ``ALL_ATTENTION_FUNCTIONS``, so the vision probe reads it. The features are the outputs of the
  layers of ``adapter_config.vision_feature_layer`` concatenated (``hidden_states[l + 1]`` for ``l >= 0``,
  ``hidden_states[l]`` for ``l < 0``): the default probed layer is the *deepest* of them (the checkpoints' ``[24, 18]``:
  layer 24, the last of the 25 layers transformers builds; as
  :func:`~tokenprune.adapters.vision.layer_of_hidden_state` picks for a list). No CLS: ``attention: mean`` only.
* **The pooling** (the model's projector, transformers' own ``Molmo2Adapter``): token ``t`` attends over the patches
  ``image_token_pooling[t]`` indexes in the call's crops flattened to ``(crops * P)`` rows (``-1`` slots are
  padding; a token with no valid slot is dropped), its query their mean; the tokens are split per image by
  ``image_grids`` (``low_h * low_w + high_h * high_w``). From transformers 5.25 each image's indices count from its
  own first crop and ``get_image_features`` offsets them by the crops of the images before it
  (``image_num_crops``); before 5.25 the processor writes indices into the whole call and the model offsets nothing.
  :func:`pooled_patch_means` maps the tower's per-position values the same way, each token the mean of its valid
  pooled patches (a patch pooled twice counts twice, as in the model's mean).
* **Videos** run through the same tower and pooling: ``get_video_features`` calls ``get_image_features`` with the
  frames as crops (``video_token_pooling``, one "image" of ``frames * rows x cols`` tokens per video, offset by the
  frames of the videos before it from 5.25), so the probe watches the video call too (``VisionTower.videos``) and
  :meth:`Molmo2Adapter.map_vision_video_patches` maps its frames.

Not served: ``pre_projector`` and ``vision_layer`` stages (the projector's input is not one tower patch per row: it
attention-pools each token from an index set of patches of the concatenated feature layers).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.generic import GenericAdapter
from tokenprune.adapters.vision import layer_of_hidden_state


class Molmo2Adapter(GenericAdapter):
    """Molmo2: the generic adapter (global and high-res grids, features added to the placeholders, videos in frames)
    plus vision attention on its ViT, images and videos."""

    name = "molmo2"
    model_types = ("molmo2",)
    notes = (
        "generic adapter (global + high-res grids per image, frames per video) + vision attention on images and videos "
        "(each pooled token the mean of its pooled patches)"
    )
    pre_projector_refusal = (
        "its projector attention-pools each token from an index set of patches of every crop (image_token_pooling, "
        "the concatenated outputs of several ViT layers), not one tower patch per row"
    )

    def feature_layers(self) -> list[int]:
        """The tower layers whose outputs the projector concatenates (non-negative, in the config's order)."""
        n = len(self.tower().layers)
        return [
            layer_of_hidden_state(index + 1 if index >= 0 else index, n)
            for index in self.vlm().config.adapter_config.vision_feature_layer
        ]

    def vision_tower(self) -> VisionTower | None:
        """The ViT's layers, probed by default at the deepest feature layer; no CLS; videos run through it too."""
        tower = self.tower()
        layers = self.feature_layers()
        notes = f"the deepest of the feature layers {layers} whose outputs are concatenated (vision_feature_layer)"
        return VisionTower(type(tower).__name__, tuple(tower.layers), max(layers), False, notes, videos=True)

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per crop, in ``pixel_values`` order; each token the mean of the patches its row of
        ``image_token_pooling`` indexes; one tensor per image of ``image_grids``."""
        method = self.vlm().get_image_features
        pooling, grids = call.argument("image_token_pooling", method), call.argument("image_grids", method)
        if not (isinstance(pooling, Tensor) and isinstance(grids, Tensor) and grids.dim() == 2):
            return None
        counts = grids[:, 0] * grids[:, 1] + grids[:, 2] * grids[:, 3]
        crops = call.argument("image_num_crops", method) if self._offsets() else None
        return pooled_patch_means(values, pooling, counts, crops)

    def map_vision_video_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per frame; each video's ``frames * rows * cols`` tokens the means of the patches their
        rows of ``video_token_pooling`` index (``get_video_features`` pools the frames as one image's crops)."""
        method = self.vlm().get_video_features
        pooling, grids = call.argument("video_token_pooling", method), call.argument("video_grids", method)
        if not (isinstance(pooling, Tensor) and isinstance(grids, Tensor) and grids.dim() == 2):
            return None
        frames = grids[:, 0]
        crops = frames if self._offsets() else None
        return pooled_patch_means(values, pooling, frames * grids[:, 1] * grids[:, 2], crops)

    def _offsets(self) -> bool:
        """Whether ``get_image_features`` offsets each image's pooling indices by the crops before it (5.25 on:
        it takes ``image_num_crops``); before, the indices count over the whole call."""
        return "image_num_crops" in inspect.signature(self.vlm().get_image_features).parameters


def pooled_patch_means(
    values: list[Tensor], pooling: Tensor, counts: Tensor, crops: Tensor | None = None
) -> list[Tensor] | None:
    """Per-position values of a tower call's crops mapped to Molmo2's pooled tokens, as its projector pools them.

    Args:
        values: One ``(P, C)`` tensor per crop (tower sequence), in the call's order.
        pooling: ``(T, K)`` patch indices into the crops' ``(crops * P)`` rows, ``-1`` on padding slots.
        counts: ``(N,)`` the tokens of each image (video), in order: ``pooling``'s rows split per image.
        crops: ``(N,)`` each image's crops where each image's indices count from its own first crop (the model
            offsets them, from transformers 5.25); ``None``: the indices count over the whole call.

    Returns:
        One ``(n_i, C)`` tensor per image: each token the mean of the values at its valid indices (tokens without
        one are dropped, as the model drops them); ``None`` where no crop was recorded or the tokens do not split
        into ``counts``.
    """
    if not values:
        return None
    flat = torch.cat(values)
    index = pooling.to(flat.device).long()
    counts = counts.to(flat.device).long()
    if int(counts.sum()) != index.shape[0]:
        return None
    if crops is not None and counts.numel() > 1:
        per_image = crops.to(flat.device).long() * values[0].shape[0]
        offsets = (per_image.cumsum(0) - per_image).repeat_interleave(counts, output_size=index.shape[0])
        index = torch.where(index >= 0, index + offsets[:, None], index)
    valid = index >= 0
    pooled = (flat[index.clamp(min=0)] * valid[..., None].to(flat.dtype)).sum(1)
    means = pooled / valid.sum(-1).clamp(min=1)[:, None].to(flat.dtype)
    means = means[valid.any(-1)]
    sizes = counts.tolist()
    return list(means.split(sizes)) if sum(sizes) == means.shape[0] else None
