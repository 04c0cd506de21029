"""Per-layer visual features that follow pruning: the engine adds Qwen3-VL's DeepStack features itself.

A model whose language model adds vision features to the visual tokens' hidden states after its
first decoder layers (DeepStack) would add them at the *unpruned* visual positions. In a prefill
the engine prunes, the adapter takes them out of the language model's call
(:meth:`~tokenprune.adapters.base.ModelAdapter.take_visual_residuals`); the engine keeps them per
token in the :class:`~tokenprune.engine.sequence.TokenSequence` (gathered with the kept tokens,
merged with the merged ones) and adds them after the same decoder layers through
:meth:`~tokenprune.adapters.base.ModelAdapter.add_visual_residual`, at the positions the tokens
hold then. With nothing pruned this is the model's own computation on the same rows in the same
order, so keep-all stays bit-identical.
"""

from __future__ import annotations

from typing import Any

from tokenprune.adapters.base import ModelAdapter
from tokenprune.engine.sequence import TokenSequence


def adds_visual_residuals(adapter: ModelAdapter) -> bool:
    """Whether ``adapter`` overrides :meth:`~tokenprune.adapters.base.ModelAdapter.take_visual_residuals`."""
    return type(adapter).take_visual_residuals is not ModelAdapter.take_visual_residuals


def add_layer_residual(adapter: ModelAdapter, seq: TokenSequence, output: Any, layer_index: int) -> Any:
    """Decoder layer ``layer_index``'s ``output`` with its residual features added at ``seq``'s receivers.

    Returns ``None`` (output unchanged) when ``seq`` carries no features for that layer.
    """
    if seq.residuals is None or seq.receives is None or layer_index >= int(seq.residuals.shape[0]):
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    mask = seq.receives.to(hidden.device)
    features = seq.residuals[layer_index].to(hidden.device)[mask]
    hidden = adapter.add_visual_residual(hidden, mask, features, layer_index)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
