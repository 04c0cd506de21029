"""ATP's soft masks for training, on the engine's public soft-mask seam (:class:`tokenprune.SoftMaskRun`).

ATP-LLaVA (https://arxiv.org/abs/2412.00447) trains its thresholds with differentiable masks: the
sequence keeps its length, and each visual token ``j`` is down-weighted as a *key* in every layer
after the module that (softly) prunes it. The engine's :class:`~tokenprune.engine.soft.SoftMaskRun`
does the masking for any reducer that answers ``soft_keep``; ATP's answer
(:meth:`tokenprune_atp.ATP.soft_keep`) is the keep logit ``max(S_red - θ_r, S_sp - θ_s)``, so the
mask is ``M = sigmoid(T · max(...)) = max(sigmoid(T (S_red - θ_r)), sigmoid(T (S_sp - θ_s)))``
(protected newline tokens: ``M = 1``). :class:`SoftATP` puts one ATP reducer per module on it and
returns the thresholds the loss logs.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tokenprune.engine.soft import SoftForward as EngineSoftForward
from tokenprune.engine.soft import SoftMaskRun
from tokenprune_atp.weights import ATPWeights


class SoftForward(EngineSoftForward):
    """What one soft-masked ATP forward produced: the engine's :class:`~tokenprune.engine.soft.SoftForward`
    (``logits``, ``counts``, ``kept``, ``aux``, ``hard_counts``) and each module's thresholds."""

    @property
    def thresholds(self) -> dict[int, Tensor]:
        """Per module layer: ``(B, 2)`` ``(θ_r, θ_s)``."""
        return {k: aux["thresholds"] for k, aux in self.aux.items()}


class SoftATP(SoftMaskRun):
    """Soft-masked ATP inside a transformers VLM, for training; a context manager that removes its hooks.

    Args:
        model: The VLM (``...ForConditionalGeneration``), sdpa or eager attention.
        weights: The ATP heads (trainable).
        temperature: Soft-mask steepness ``T`` (change it between forwards with :attr:`temperature`).

    Use :meth:`forward` (not ``model(...)``) so the masks know the batch.
    """

    def __init__(self, model: nn.Module, weights: ATPWeights, temperature: float = 10.0) -> None:
        from tokenprune_atp import ATP

        weights.check_model(model)
        self.weights = weights
        stages = {k: ATP.from_weights(weights) for k in weights.config.layers}
        super().__init__(model, stages, temperature, protect_newlines=weights.config.protect_newlines)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **inputs: Any) -> SoftForward:  # type: ignore[override]
        """Run the model with soft ATP masks on a (right- or left-) padded batch.

        Args:
            input_ids: ``(B, L)``.
            attention_mask: ``(B, L)`` 1 on real tokens (default all ones).
            **inputs: The model's image inputs (``pixel_values``, ``image_sizes``, ...).
        """
        out = super().forward(input_ids, attention_mask, **inputs)
        return SoftForward(out.logits, out.counts, out.kept, out.aux, out.hard_counts)
