"""Analytic MACs of a decoder-only language model, layer by layer, from the tokens each layer saw.

Per decoder layer with ``n`` query tokens attending to ``n_kv`` keys:

    MACs = n * P + 2 * q_dim * n * n_kv

where ``P`` is the sum of ``in_features * out_features`` over the layer's linear modules (the q, k,
v and o projections and the MLP: three matrices for SwiGLU/GeGLU, two otherwise, so GQA and gated
MLPs are exact rather than approximated), and ``q_dim = heads * head_dim`` (QK^T and AV). The LM
head adds ``positions * hidden * vocab`` for the positions whose logits are computed (one in
``generate``, every position in a plain forward unless ``logits_to_keep`` says otherwise).

This is FastV's ``4nd^2 + 2n^2d + 2ndm`` made exact for GQA and gated MLPs. It matches fvcore and
``torch.utils.flop_counter`` to the MAC (see the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from tokenprune.engine import compat


@dataclass(frozen=True)
class DecoderShape:
    """The shape facts of a language model that its MACs depend on.

    Attributes:
        linear_macs_per_token: Per decoder layer, the sum of ``in * out`` over its linear modules.
        q_dims: Per decoder layer, ``heads * head_dim`` of its queries.
        hidden: Hidden size (input of the LM head).
        vocab: Output size of the LM head.
        q_proj_macs: Per decoder layer, ``in * out`` of its query projection (per token).
        k_proj_macs: Per decoder layer, ``in * out`` of its key projection (per token).
    """

    linear_macs_per_token: tuple[int, ...]
    q_dims: tuple[int, ...]
    hidden: int
    vocab: int
    q_proj_macs: tuple[int, ...]
    k_proj_macs: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.q_dims)

    @classmethod
    def from_model(cls, model: nn.Module) -> DecoderShape:
        """Read the shapes off a transformers causal LM or VLM (``get_decoder().layers``, ``lm_head``)."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        head = getattr(model, "lm_head", None)
        if layers is None or not isinstance(head, nn.Linear):
            raise TypeError(
                f"{type(model).__name__} has no get_decoder().layers and lm_head; DecoderShape needs a transformers "
                "causal LM or a VLM built on one"
            )
        per_token, q_dims, q_macs, k_macs = [], [], [], []
        for i, layer in enumerate(layers):
            linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
            attention = compat.attention_module(layer)
            q_proj, k_proj = getattr(attention, "q_proj", None), getattr(attention, "k_proj", None)
            if not linears or not isinstance(q_proj, nn.Linear) or not isinstance(k_proj, nn.Linear):
                raise TypeError(
                    f"decoder layer {i} ({type(layer).__name__}) has no self_attn.q_proj and k_proj linear modules"
                )
            if any(p.dim() >= 3 for p in layer.parameters()):
                raise TypeError(
                    f"decoder layer {i} ({type(layer).__name__}) holds mixture-of-experts weights (3-D tensors); "
                    "its MACs depend on the routing and are not counted yet (MoE models such as qwen3_vl_moe)"
                )
            per_token.append(sum(m.in_features * m.out_features for m in linears))
            q_dims.append(q_proj.out_features)
            q_macs.append(q_proj.in_features * q_proj.out_features)
            k_macs.append(k_proj.in_features * k_proj.out_features)
        return cls(tuple(per_token), tuple(q_dims), head.in_features, head.out_features, tuple(q_macs), tuple(k_macs))


@dataclass(frozen=True)
class LanguageModelMacs:
    """MACs of one prefill of the language model.

    Attributes:
        layers: MACs per decoder layer.
        layer_tokens: Tokens each layer processed.
        lm_head: MACs of the LM head.
    """

    layers: tuple[int, ...]
    layer_tokens: tuple[int, ...]
    lm_head: int

    @property
    def total(self) -> int:
        return sum(self.layers) + self.lm_head

    @property
    def flops(self) -> int:
        """``2 * total``."""
        return 2 * self.total


def language_model_macs(
    shape: DecoderShape,
    layer_tokens: Sequence[int],
    *,
    logits_positions: int,
    kv_tokens: Sequence[int] | None = None,
    batch: int = 1,
) -> LanguageModelMacs:
    """MACs of a prefill in which decoder layer ``i`` processed ``layer_tokens[i]`` tokens.

    Args:
        shape: From :meth:`DecoderShape.from_model`.
        layer_tokens: Query tokens per layer (one sample, or the padded width of a batch).
        logits_positions: Positions whose logits the LM head computes, per sample.
        kv_tokens: Keys per layer when they differ from the queries (a prefill on top of a cache);
            defaults to ``layer_tokens``.
        batch: Samples processed at that width (multiplies everything).
    """
    if len(layer_tokens) != shape.num_layers:
        raise ValueError(f"layer_tokens has {len(layer_tokens)} entries; the model has {shape.num_layers} layers")
    kv = layer_tokens if kv_tokens is None else kv_tokens
    layers = tuple(
        batch * (n * p + 2 * q * n * k)
        for n, k, p, q in zip(layer_tokens, kv, shape.linear_macs_per_token, shape.q_dims, strict=True)
    )
    return LanguageModelMacs(layers, tuple(layer_tokens), batch * logits_positions * shape.hidden * shape.vocab)


def attention_probe_macs(q_dim: int, queries: int, keys: int) -> int:
    """MACs of an attention probe that scores ``queries`` query rows against ``keys`` keys (QK^T only)."""
    return q_dim * queries * keys


def own_attention_macs(shape: DecoderShape, layer: int, keys: int, projected_queries: int, scored_rows: int) -> int:
    """MACs of computing layer ``layer``'s own attention before it runs (the engine's dry call of the layer).

    PyramidDrop's score: the key projection of every one of the ``keys`` tokens, the query projection
    of the ``projected_queries`` rows it needs, and ``QK^T`` for ``scored_rows`` query rows (summed
    over the sources read). The value projection is skipped; softmax and norms are not
    multiply-accumulates.
    """
    projections = keys * shape.k_proj_macs[layer] + projected_queries * shape.q_proj_macs[layer]
    return projections + scored_rows * keys * shape.q_dims[layer]


__all__ = ["DecoderShape", "LanguageModelMacs", "attention_probe_macs", "language_model_macs", "own_attention_macs"]
