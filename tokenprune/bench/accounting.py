"""One example's prefill cost from the tokens each decoder layer held: visual tokens, MACs, KV-cache bytes.

Shared by ``tokenprune compare`` and the lmms-eval bridge, so that both count the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenprune.cost.analytic import DecoderShape, language_model_macs


def example_costs(
    shape: DecoderShape,
    kv_dims: Sequence[int],
    bytes_per_value: int,
    layer_tokens: Sequence[int] | None,
    real_tokens: int,
    visual_tokens: int,
) -> dict[str, Any]:
    """``layer_tokens``, mean ``visual_tokens`` per layer, the language model's prefill ``macs``, ``kv_bytes``.

    Args:
        shape: The language model's shape.
        kv_dims: Width of each layer's cached keys (the same for its values).
        bytes_per_value: Bytes of one cached value (the model's dtype).
        layer_tokens: Tokens of this example entering each decoder layer (``None``: nothing was
            pruned, every layer held the whole prompt).
        real_tokens: The prompt's tokens without padding.
        visual_tokens: Of those, the visual tokens.
    """
    tokens = list(layer_tokens) if layer_tokens is not None else [real_tokens] * shape.num_layers
    text_tokens = real_tokens - visual_tokens
    return {
        "layer_tokens": tokens,
        "visual_tokens": sum(t - text_tokens for t in tokens) / len(tokens),
        "macs": language_model_macs(shape, tokens, logits_positions=1).total,
        "kv_bytes": sum(2 * n * d * bytes_per_value for n, d in zip(tokens, kv_dims, strict=True)),
    }
