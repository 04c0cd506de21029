"""Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's merged-patch grids and M-RoPE, plus DeepStack.

Each image is a ``(h / m) x (w / m)`` grid of merged patches between ``<|vision_start|>`` and
``<|vision_end|>``, as in Qwen2-VL. Positions are 3-D (temporal, height, width; ``generate`` adds a
text row first) and *interleaved* across the rotary frequencies; the model computes them with
``get_rope_index`` on the unpruned ``input_ids`` and ``mm_token_type_ids``, and the engine slices
them (``original``) or renumbers the three rows jointly (``compact``), as for Qwen2-VL. The rotary
module is the model's own, so the interleaving needs nothing here.

**DeepStack.** ``get_image_features`` also returns one feature tensor per tapped vision layer
(``vision_config.deepstack_visual_indexes``); the language model adds tensor ``j`` to the hidden
states of the visual positions after decoder layer ``j``. In a pruned prefill the adapter takes
``visual_pos_masks`` and ``deepstack_visual_embeds`` out of the language model's call and the
engine adds them itself (:mod:`tokenprune.engine.deepstack`) with the model's own
``_deepstack_process``, on the tokens that are still there: a ``post_projector`` stage cuts each
DeepStack tensor and the mask like the tokens, a merge averages them like the tokens (size-weighted),
and a ``layer: k`` stage with ``k < len(deepstack_visual_indexes)`` keeps the remaining layers'
features aligned with the kept tokens. All of it is exact (keep-all is bit-identical).

**Vision attention.** The tower runs one attention call per image (``cu_seqlens`` chunks, each through the
attention interface the probe intercepts), so the probe sees one sequence per image; each merged token
gets the mean of the scores of its ``m x m`` patches, as for Qwen2-VL. The default block is the last one,
whose output the merger turns into the features; the DeepStack taps read earlier blocks (their mergers
group the same patches), but the scores come from one block. No CLS token (``mean`` only). Video tokens
too: ``get_video_features`` calls ``get_image_features`` on ``video_grid_thw``, one tower sequence per temporal
patch; the engine records the outer video call (the nested image call is part of it) and the probe records its
sequences as the video's, mapped as the images' are (``map_vision_video_patches``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tokenprune.adapters.base import VisionTower, VisualResiduals
from tokenprune.adapters.packed import PackedTower
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter, Qwen2VLTower


class DeepStackResiduals:
    """Qwen3-VL's DeepStack residuals for an adapter: taken out of the language model's prefill call and
    added back by the engine after each layer with the model's own ``_deepstack_process`` (mixed into
    :class:`Qwen3VLAdapter` and the generic adapter's :class:`~tokenprune.adapters.generic.GenericDeepStackAdapter`;
    the adapter provides ``language_model()``)."""

    def take_visual_residuals(self, kwargs: dict[str, Any]) -> VisualResiduals | None:
        mask = kwargs.pop("visual_pos_masks", None)
        features = kwargs.pop("deepstack_visual_embeds", None)
        if mask is None or not features:
            return None
        return VisualResiduals(mask=mask, features=list(features))

    def add_visual_residual(self, hidden: Tensor, mask: Tensor, features: Tensor, layer_index: int) -> Tensor:
        return self.language_model()._deepstack_process(hidden, mask, features)  # type: ignore[attr-defined]


class Qwen3VLTower(Qwen2VLTower):
    """Qwen3-VL's packed tower (``visual``: learned position embeddings, no windows, DeepStack mergers): vision
    attention at its last block; the stages before the merger refused. Mixed into :class:`Qwen3VLAdapter` and the
    Qwen3-Omni thinker's adapter."""

    pre_projector_refusal = (
        "its DeepStack mergers read intermediate tower blocks of every merge unit, which a reduction before the "
        "main merger would not follow"
    )

    def projector(self) -> nn.Module | None:
        """None: a ``pre_projector`` stage is refused (:attr:`pre_projector_refusal`)."""
        return None

    def packed_tower(self) -> PackedTower | None:
        return None

    def vision_tower(self) -> VisionTower | None:
        """The vision transformer's blocks; the default probed block is the last one.

        The features the language model receives at the visual positions come from the last block, through
        the 2x2 merger (the map is :meth:`~Qwen2VLAdapter.map_vision_patches`'s: one tower sequence per image,
        each token the mean of its ``m x m`` consecutive patches). The DeepStack taps
        (``deepstack_visual_indexes``) read intermediate blocks through their own mergers, which group the
        same patches, so a token's DeepStack features come from the same patches as its main features; the
        vision attention is nevertheless read at one block (the last, or ``layer``), not per tap. No CLS
        token: only the ``mean`` vision attention is served. Videos (``VisionTower.videos``): ``get_video_features``
        calls ``get_image_features`` on ``video_grid_thw``; the engine records the outer video call, the nested
        image call's tower sequences (one per temporal patch) go to the probe's video records, and
        :meth:`~Qwen2VLTower.map_vision_video_patches` maps them.
        """
        visual = self.vlm().visual
        blocks = tuple(visual.blocks)
        return VisionTower(
            type(visual).__name__,
            blocks,
            len(blocks) - 1,
            False,
            "last block (the merger's input); the DeepStack taps read earlier blocks, the scores come from one",
            videos=True,
        )


class Qwen3VLAdapter(DeepStackResiduals, Qwen3VLTower, Qwen2VLAdapter):
    """Qwen3-VL / Qwen3-VL-MoE: merged-patch grids, interleaved M-RoPE, DeepStack features kept aligned."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    notes = "M-RoPE (interleaved) sliced like qwen2_vl; DeepStack features follow the kept and merged tokens"

    def deepstack_layers(self) -> tuple[int, ...]:
        """The decoder layers after which DeepStack features are added (``0 .. n - 1``)."""
        taps = getattr(self.vlm().config.vision_config, "deepstack_visual_indexes", None) or ()
        return tuple(range(len(taps)))
