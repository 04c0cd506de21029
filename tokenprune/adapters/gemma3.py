"""Gemma3: interleaved sliding-window and full-attention layers; bidirectional attention within an image.

Sliding windows after pruning: the engine slices the mask that the model built for the *unpruned*
sequence, so during the prefill a sliding layer's window still counts **original positions**
(a kept token sees the kept tokens that were within ``sliding_window`` tokens of it before
pruning), not kept tokens. During decoding, a sliding layer's cache is truncated by transformers to
its last ``sliding_window - 1`` entries of the *pruned* sequence, so the two notions differ once the
prompt is longer than the window: cached decoding then no longer equals a no-cache recompute
exactly. Real Gemma3 windows (1k-4k tokens) exceed typical prompts with pruned images; the engine
is exact while the pruned prompt plus the generated tokens fit in the window.

Vision attention: the SigLIP tower (no CLS) runs once per image; the projector average-pools its last
layer's output over ``k x k`` patches (``k = patches per side / tokens per side``, 4 in Gemma3's 64 x 64
to 16 x 16), so each token gets the mean of its ``k^2`` patches (the projector's own ``avg_pool``).
"""

from __future__ import annotations

from torch import Tensor

from tokenprune.adapters.base import ImageCall, ModelAdapter, VisionTower
from tokenprune.adapters.vision import encoder_tower


class Gemma3Adapter(ModelAdapter):
    """Gemma3: a square grid per image (``mm_tokens_per_image``), per-layer-type RoPE."""

    name = "gemma3"
    model_types = ("gemma3",)
    notes = "sliding windows count original positions in prefill; exact while prompt + output < window"
    pre_projector_refusal = (
        "its projector average-pools the patch grid (4x4 patches per token), so a projector input is not one "
        "language-model token"
    )

    def rotary(self, hidden: Tensor, positions: Tensor, layer_index: int) -> tuple[Tensor, Tensor]:
        lm = self.language_model()
        return lm.rotary_emb(hidden, positions[0], lm.config.layer_types[layer_index])

    def vision_tower(self) -> VisionTower | None:
        """The SigLIP tower; the features are its last layer's output (``last_hidden_state``)."""
        return encoder_tower(self.vlm().vision_tower, -1)

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per image; each token the mean of the ``k x k`` patches the projector pools."""
        projector = self.vlm().multi_modal_projector
        side = projector.patches_per_image
        out = []
        for v in values:
            grid = v.T.reshape(1, v.shape[-1], side, side)
            out.append(projector.avg_pool(grid).flatten(2)[0].T)
        return out
