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
engine adds them itself (:mod:`tokenprune.engine.residuals`) with the model's own
``_deepstack_process``, on the tokens that are still there: a ``post_projector`` stage cuts each
DeepStack tensor and the mask like the tokens, a merge averages them like the tokens (size-weighted),
and a ``layer: k`` stage with ``k < len(deepstack_visual_indexes)`` keeps the remaining layers'
features aligned with the kept tokens. All of it is exact (keep-all is bit-identical).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tokenprune.adapters.base import VisionTower, VisualResiduals
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL / Qwen3-VL-MoE: merged-patch grids, interleaved M-RoPE, DeepStack features kept aligned."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    notes = "M-RoPE (interleaved) sliced like qwen2_vl; DeepStack features follow the kept and merged tokens"

    def vision_tower(self) -> VisionTower | None:
        """None: vision-encoder attention is not served for Qwen3-VL yet (its tower's patch-to-token map, with
        the DeepStack taps and the video path calling the image path, is not written), so vision-attention
        stages are refused on it with a message naming the adapter."""
        return None

    def deepstack_layers(self) -> tuple[int, ...]:
        """The decoder layers after which DeepStack features are added (``0 .. n - 1``)."""
        taps = getattr(self.vlm().config.vision_config, "deepstack_visual_indexes", None) or ()
        return tuple(range(len(taps)))

    def take_visual_residuals(self, kwargs: dict[str, Any]) -> VisualResiduals | None:
        mask = kwargs.pop("visual_pos_masks", None)
        features = kwargs.pop("deepstack_visual_embeds", None)
        if mask is None or not features:
            return None
        return VisualResiduals(mask=mask, features=list(features))

    def add_visual_residual(self, hidden: Tensor, mask: Tensor, features: Tensor, layer_index: int) -> Tensor:
        return self.language_model()._deepstack_process(hidden, mask, features)
