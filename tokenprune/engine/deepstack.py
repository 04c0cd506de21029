"""Per-layer visual features that follow pruning: the engine adds Qwen3-VL's DeepStack features itself.

A model whose language model adds vision features to the visual tokens' hidden states after its
first decoder layers (DeepStack) would add them at the *unpruned* visual positions. In a prefill
the engine prunes, the adapter takes them out of the language model's call
(:meth:`~tokenprune.adapters.base.ModelAdapter.take_visual_residuals`); the engine keeps them per
token as two channels of the :class:`~tokenprune.engine.sequence.TokenSequence`, ``deepstack:features``
``(B, L, layers, D)`` (averaged by a merge, as the hidden states are) and ``deepstack:receives`` ``(B, L)``,
so every cut carries them, and adds them after the same decoder layers through
:meth:`~tokenprune.adapters.base.ModelAdapter.add_visual_residual`, at the positions the tokens
hold then. With nothing pruned this is the model's own computation on the same rows in the same
order, so keep-all stays bit-identical.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tokenprune.adapters.base import ModelAdapter, VisualResiduals
from tokenprune.engine.sequence import TokenSequence, residual_sequence


def adds_visual_residuals(adapter: ModelAdapter) -> bool:
    """Whether ``adapter`` overrides :meth:`~tokenprune.adapters.base.ModelAdapter.take_visual_residuals`."""
    return type(adapter).take_visual_residuals is not ModelAdapter.take_visual_residuals


#: The channels of the DeepStack features and of the tokens that receive them (:func:`with_residual_channels`).
FEATURES, RECEIVES = "deepstack:features", "deepstack:receives"


def with_residual_channels(seq: TokenSequence, residuals: VisualResiduals) -> TokenSequence:
    """``seq`` (the language model's input) with the adapter's per-layer features as its DeepStack channels.

    Raises:
        TokenpruneError: the features do not fit the sequence (:func:`residual_sequence`).
    """
    batch, length = int(seq.valid.shape[0]), int(seq.valid.shape[1])
    features, receives = residual_sequence(residuals, batch, length)
    return replace(
        seq,
        channels={**seq.channels, FEATURES: features, RECEIVES: receives},
        mean_channels=seq.mean_channels | {FEATURES},
    )


def add_layer_residual(adapter: ModelAdapter, seq: TokenSequence, output: Any, layer_index: int) -> Any:
    """Decoder layer ``layer_index``'s ``output`` with its residual features added at ``seq``'s receivers.

    Returns ``None`` (output unchanged) when ``seq`` carries no features for that layer.
    """
    features, receives = seq.channels.get(FEATURES), seq.channels.get(RECEIVES)
    if features is None or receives is None or layer_index >= int(features.shape[2]):
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    mask = receives.to(hidden.device)
    hidden = adapter.add_visual_residual(hidden, mask, features[:, :, layer_index].to(hidden.device)[mask], layer_index)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
