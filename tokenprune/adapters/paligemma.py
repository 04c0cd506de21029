"""PaliGemma: the image tokens come first, then the prompt; prefix-LM attention.

With ``token_type_ids`` the prompt (image plus text prefix) attends bidirectionally; the engine
slices the model's own 4-D prefill mask, so the kept tokens keep that structure. Generated tokens
are the causal suffix (``generate`` extends ``token_type_ids`` with ones).

Vision attention: the SigLIP tower (no CLS) runs once per image; its last layer's output, projected
token by token, is the image's tokens: patches map 1:1.
"""

from __future__ import annotations

from torch import Tensor

from tokenprune.adapters.base import ImageCall, ModelAdapter, VisionTower
from tokenprune.adapters.vision import encoder_tower


class PaliGemmaAdapter(ModelAdapter):
    """PaliGemma: a square grid per image, Gemma LM, prefix-LM masks sliced."""

    name = "paligemma"
    model_types = ("paligemma",)
    notes = "prefix-LM masks are sliced, so kept tokens keep bidirectional prefix attention"
    pre_projector_refusal = (
        "its adapter does not map the tower's patches to the language model's tokens (no vision mapping)"
    )

    def vision_tower(self) -> VisionTower | None:
        """The SigLIP tower; the features are its last layer's output (``last_hidden_state``)."""
        return encoder_tower(self.vlm().vision_tower, -1)

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per image, no CLS: 1:1."""
        return list(values)
