"""Analytic MACs of a decoder-only language model, layer by layer, from the tokens each layer saw.

Per decoder layer with ``n`` query tokens attending to ``n_kv`` keys:

    MACs = n * P + 2 * q_dim * n * n_kv                    (an attention layer)
    MACs = n * P + (n + kernel - 1) * channels * kernel    (a short-convolution layer, LFM2)

where ``P`` is the layer's matrix-product MACs per token: the sum of ``in_features * out_features``
over its linear modules (the q, k, v and o projections and the MLP: three matrices for
SwiGLU/GeGLU, two otherwise, so GQA and gated MLPs are exact rather than approximated), and, for a
mixture-of-experts MLP, ``router + top_k * expert``: the router's ``hidden * num_experts`` (every
token is scored against every expert) plus ``top_k`` times one expert's ``in * out`` summed over its
matrices (every token runs through exactly ``top_k`` experts, whichever they are; transformers drops
no token for capacity), and any shared expert's linears as above. ``q_dim = heads * head_dim``
(QK^T and AV). The LM head adds ``positions * hidden * vocab`` for the positions whose logits are
computed (one in ``generate``, every position in a plain forward unless ``logits_to_keep`` says
otherwise). A short convolution is depthwise and causal, padded by ``kernel - 1`` on both sides and cut
back to ``n`` outputs afterwards, so it computes ``n + kernel - 1`` outputs, as torch and fvcore count them.
Linear-attention (Gated DeltaNet) layers are refused. A layer that reuses an earlier layer's keys and values
(Gemma 4's KV sharing: ``is_kv_shared_layer``) has no key or value projection to count, and attends to as many
keys as it holds tokens (the engine gathers the shared keys to them).

This is FastV's ``4nd^2 + 2n^2d + 2ndm`` made exact for GQA, gated MLPs and routed experts. It
matches fvcore and ``torch.utils.flop_counter`` to the MAC (see the tests).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from tokenprune.engine import compat


@dataclass(frozen=True)
class DecoderShape:
    """The shape facts of a language model that its MACs depend on.

    Attributes:
        linear_macs_per_token: Per decoder layer, its matrix-product MACs per token (``P`` above): the
            sum of ``in * out`` over its linear modules, plus ``router + top_k * expert`` for each
            mixture-of-experts block (see :func:`experts_macs_per_token`).
        q_dims: Per decoder layer, ``heads * head_dim`` of its queries.
        hidden: Hidden size (input of the LM head).
        vocab: Output size of the LM head.
        q_proj_macs: Per decoder layer, ``in * out`` of its query projection (per token).
        k_proj_macs: Per decoder layer, ``in * out`` of its key projection (per token).
        conv: Per decoder layer, ``(macs per output, kernel)`` of its causal depthwise convolution (a short
            convolution layer: ``channels * kernel`` MACs per output, ``n + kernel - 1`` outputs for ``n``
            tokens, as the padded convolution computes them); ``(0, 1)`` where it has none. Empty: none.
    """

    linear_macs_per_token: tuple[int, ...]
    q_dims: tuple[int, ...]
    hidden: int
    vocab: int
    q_proj_macs: tuple[int, ...]
    k_proj_macs: tuple[int, ...]
    conv: tuple[tuple[int, int], ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.q_dims)

    @classmethod
    def from_model(cls, model: nn.Module) -> DecoderShape:
        """Read the shapes off a transformers causal LM or VLM (``get_decoder().layers``, ``lm_head``)."""
        decoder, head = decoder_and_head(model)
        layers = getattr(decoder, "layers", None)
        if layers is None or not isinstance(head, nn.Linear):
            raise TypeError(
                f"{type(model).__name__} has no get_decoder().layers and lm_head; DecoderShape needs a transformers "
                "causal LM or a VLM built on one"
            )
        kinds = _refuse_recurrent_layers(decoder, layers)
        per_token, q_dims, q_macs, k_macs, conv = [], [], [], [], []
        for i, layer in enumerate(layers):
            linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
            per_token.append(_macs_per_token(layer, i))
            if kinds[i] == "conv":
                conv.append(_short_conv(layer, i))
                q_dims.append(0), q_macs.append(0), k_macs.append(0)
                continue
            attention = compat.attention_module(layer)
            q_proj, k_proj = getattr(attention, "q_proj", None), getattr(attention, "k_proj", None)
            shared = getattr(attention, "is_kv_shared_layer", False) is True  # KV sharing: no key projection
            if not linears or not isinstance(q_proj, nn.Linear) or not (shared or isinstance(k_proj, nn.Linear)):
                raise TypeError(
                    f"decoder layer {i} ({type(layer).__name__}) has no self_attn.q_proj and k_proj linear modules"
                )
            conv.append((0, 1))
            q_dims.append(q_proj.out_features)
            q_macs.append(q_proj.in_features * q_proj.out_features)
            k_macs.append(0 if shared else k_proj.in_features * k_proj.out_features)
        convs = tuple(conv) if any(c for c, _ in conv) else ()
        return cls(
            tuple(per_token), tuple(q_dims), head.in_features, head.out_features, tuple(q_macs), tuple(k_macs), convs
        )


def decoder_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The decoder stack (``get_decoder()``, holding ``layers``) and the LM head of a causal LM or VLM.

    Llama 4's ``get_decoder()`` is its ``Llama4ForCausalLM``, which holds both: the stack is its ``model`` and the
    head its output embeddings.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and not hasattr(decoder, "layers"):
        decoder = getattr(decoder, "model", decoder)
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    return decoder, head


def _short_conv(layer: nn.Module, index: int) -> tuple[int, int]:
    """``(out_channels * in_channels / groups * kernel, kernel)`` of a short-convolution layer's one causal
    ``nn.Conv1d`` (LFM2's depthwise ``conv.conv``): its MACs per output position, and its kernel size.

    Raises:
        TypeError: the layer holds no such convolution, or several.
    """
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv1d)]
    if len(convs) != 1 or convs[0].padding != (convs[0].kernel_size[0] - 1,):
        raise TypeError(
            f"decoder layer {index} ({type(layer).__name__}) is a conv layer without one causal nn.Conv1d "
            f"(padding kernel - 1); found {len(convs)}"
        )
    (c,) = convs
    return c.out_channels * (c.in_channels // c.groups) * c.kernel_size[0], c.kernel_size[0]


def _refuse_recurrent_layers(decoder: nn.Module, layers: Sequence[nn.Module]) -> tuple[str, ...]:
    """Each layer's kind; refuse a language model with linear-attention layers, whose MACs are not counted (yet).

    Gated DeltaNet's chunked delta rule computes its products on chunks of 64 tokens (padded), so an analytic
    count would not match what torch and fvcore measure without following the kernel's implementation. Short
    convolution layers (``conv``) are counted (:func:`_short_conv`).

    Raises:
        TypeError: naming the layer kind and the layers.
    """
    from tokenprune.engine.hybrid import layer_kinds

    kinds = layer_kinds(getattr(decoder, "config", None), layers)
    odd = [i for i, kind in enumerate(kinds) if kind == "linear_attention"]
    if odd:
        names = sorted({kinds[i] for i in odd})
        raise TypeError(
            f"decoder layers {', '.join(map(str, odd[:8]))}{', ...' if len(odd) > 8 else ''} are "
            f"{' and '.join(names)} layers: tokenprune counts the FLOPs (analytic, torch, fvcore) of softmax-attention "
            "and short-convolution decoder layers only; the pruning itself works on this model, its FLOP count "
            "does not"
        )
    return kinds


def _macs_per_token(layer: nn.Module, index: int) -> int:
    """``P`` of one decoder layer: its linear modules' ``in * out``, and each experts block's routed cost.

    Every parameter of two or more dimensions must be accounted for (a linear module's weight, an
    experts module's stacked matrices, a router's weight): anything else raises rather than being
    left out of the count.
    """
    linears = sum(m.in_features * m.out_features for m in layer.modules() if isinstance(m, nn.Linear))
    parents = {id(child): module for module in layer.modules() for child in module.children()}
    accounted = {id(m.weight) for m in layer.modules() if isinstance(m, nn.Linear)}
    routed = 0
    _refuse_modality_experts(layer, index)
    for module in layer.modules():
        if isinstance(module, nn.Conv1d):  # a short convolution: counted per output (DecoderShape.conv)
            accounted.add(id(module.weight))
            continue
        if any(p.dim() == 3 for p in module.parameters(recurse=False)):
            block = parents.get(id(module), layer)
            macs, params = experts_macs_per_token(block, module, layer_index=index)
            routed += macs
            accounted |= {id(p) for p in params}
    for name, param in layer.named_parameters():
        if param.dim() >= 2 and id(param) not in accounted:
            raise TypeError(
                f"decoder layer {index} ({type(layer).__name__}) has a {param.dim()}-D parameter {name!r} "
                f"{tuple(param.shape)} that is neither a linear module's weight nor part of a mixture-of-experts "
                "block DecoderShape can read (experts stacked as (num_experts, ., .) tensors, a router with a "
                "(num_experts, hidden) weight); its MACs would be left out"
            )
    return linears + routed


def _refuse_modality_experts(layer: nn.Module, index: int) -> None:
    """Refuse a layer with several experts modules (ERNIE-4.5-VL's ``text_moe`` and ``vision_moe``): each token runs
    through the experts of its modality, so a layer's MACs depend on how many of its tokens are visual, which the
    per-token count ``n * P`` does not know.

    Raises:
        TypeError: naming the layer and its experts modules.
    """
    names = [n for n, m in layer.named_modules() if any(p.dim() == 3 for p in m.parameters(recurse=False))]
    if len(names) > 1:
        raise TypeError(
            f"decoder layer {index} ({type(layer).__name__}) has {len(names)} experts modules ({', '.join(names)}): "
            "modality-isolated mixture-of-experts layers (each token runs through its modality's experts, so a "
            "layer's MACs depend on its visual-token count); tokenprune counts the FLOPs (analytic, torch, fvcore) "
            "of layers with one experts module only; the pruning itself works on this model, its FLOP count does not"
        )


def experts_macs_per_token(
    block: nn.Module, experts: nn.Module, *, layer_index: int = 0
) -> tuple[int, list[nn.Parameter]]:
    """Per-token MACs of a mixture-of-experts block's routed part, ``router + top_k * expert``.

    Follows transformers' MoE convention (``integrations/moe.py``, ``@use_experts_implementation``):

    * ``experts`` stacks each matrix of all its experts in one 3-D parameter, ``(num_experts, out, in)``
      or transposed (``gate_up_proj`` and ``down_proj``, or ``up_proj`` and ``down_proj`` without a
      gate; biases ``(num_experts, out)``), so one expert costs the sum of ``in * out`` over them;
    * the router is ``block`` itself or one of its children, with a ``(num_experts, hidden)`` weight
      applied to every token (a router that is an ``nn.Linear`` is counted with the linear modules);
    * ``top_k`` is read from the router, the block, or the experts' config (``num_experts_per_tok``).

    Every token runs through exactly ``top_k`` experts (transformers drops none for capacity), so
    the cost does not depend on the routing; where the experts module takes no routing (its forward takes the
    hidden states only: Llama 4), every token runs through every expert. A shared expert is made of linear
    modules and is counted with them.

    Returns the MACs and the parameters they account for (expert matrices and biases, router weight).

    Raises:
        TypeError: If the block does not follow that convention (naming the class and what is missing).
    """
    where = (
        f"decoder layer {layer_index}: mixture-of-experts block {type(block).__name__} "
        f"(experts {type(experts).__name__})"
    )
    matrices = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
    num_experts = {p.shape[0] for p in matrices}
    declared = getattr(experts, "num_experts", None)
    if len(num_experts) != 1 or (declared is not None and num_experts != {declared}):
        shapes = [tuple(p.shape) for p in matrices]
        raise TypeError(f"{where}: its 3-D parameters {shapes} do not stack one matrix per expert along dimension 0")
    (n_experts,) = num_experts
    biases = [p for p in experts.parameters(recurse=False) if p.dim() == 2 and p.shape[0] == n_experts]
    if any(p.dim() >= 2 for p in experts.parameters() if all(p is not q for q in (*matrices, *biases))):
        raise TypeError(f"{where}: the experts module holds parameters other than stacked expert matrices and biases")
    per_expert = sum(p.shape[1] * p.shape[2] for p in matrices)
    routers = [
        m
        for m in (block, *block.children())
        if m is not experts
        and isinstance(getattr(m, "weight", None), nn.Parameter)
        and m.weight.dim() == 2
        and m.weight.shape[0] == n_experts
    ]
    if len(routers) != 1:
        found = "none" if not routers else ", ".join(type(m).__name__ for m in routers)
        raise TypeError(
            f"{where}: expected one router (a module with a ({n_experts}, hidden) weight) next to the experts, "
            f"found {found}"
        )
    (router,) = routers
    top_k = _top_k(router, block, experts)
    if top_k is None:
        raise TypeError(
            f"{where}: no top_k on the router ({type(router).__name__}) or the block, and no num_experts_per_tok in "
            "the experts' config; the experts each token runs through are unknown"
        )
    if not 0 < top_k <= n_experts:
        raise TypeError(f"{where}: top_k {top_k} is not between 1 and the {n_experts} experts")
    router_macs = 0 if isinstance(router, nn.Linear) else router.weight.numel()
    runs = n_experts if _dense_experts(experts) else top_k
    return router_macs + runs * per_expert, [*matrices, *biases, router.weight]


def _dense_experts(experts: nn.Module) -> bool:
    """Whether the experts module runs every expert on every token: its forward takes the hidden states only, no
    routing (Llama 4's ``Llama4TextExperts``: the block zeroes the unselected experts' inputs by their scores)."""
    try:
        params = inspect.signature(experts.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len([p for p in params if p.kind in kinds]) == 1


def _top_k(router: nn.Module, block: nn.Module, experts: nn.Module) -> int | None:
    for owner in (router, block):
        for name in ("top_k", "num_experts_per_tok"):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
    value = getattr(getattr(experts, "config", None), "num_experts_per_tok", None)
    return value if isinstance(value, int) else None


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
    conv = shape.conv or ((0, 1),) * shape.num_layers
    layers = tuple(
        batch * (n * p + 2 * q * n * k + (c * (n + width - 1) if c else 0))
        for n, k, p, q, (c, width) in zip(
            layer_tokens, kv, shape.linear_macs_per_token, shape.q_dims, conv, strict=True
        )
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


__all__ = [
    "DecoderShape",
    "LanguageModelMacs",
    "attention_probe_macs",
    "experts_macs_per_token",
    "language_model_macs",
    "own_attention_macs",
]
