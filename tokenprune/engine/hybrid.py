"""Hybrid language models: decoder layers that are not softmax attention, and what the engine does at them.

transformers 5.x names each decoder layer's kind in the text config's ``layer_types``. The engine serves:

``full_attention``, ``sliding_attention``, ``chunked_attention``
    Softmax attention over a KV cache: a 4-D mask (or none), sliced at a cut and rebuilt over the
    layer's own cache in decoding steps (see :mod:`tokenprune.engine.pruned_inputs`).
``linear_attention`` (Gated DeltaNet: Qwen3.5, MiniCPM-V 4.6/4.7), ``conv`` (LFM2's gated short convolution)
    A recurrent layer: it takes a 2-D ``(B, L)`` padding mask (``None`` where no token is padding, and in
    single-token decoding steps) and keeps a fixed-size state in the cache (a convolution window and, for
    linear attention, a recurrent matrix). At a cut it receives the kept tokens' 2-D mask (zero on the
    padding slots, which the engine puts on the left, where they leave the state untouched) and builds its
    state from the pruned sequence itself; in decoding steps its mask passes on as the model gives it.

Stages that read attention (the probe of layer ``k - 1``, its keys or text rows, layer ``k``'s own
attention, a decode stage's layer ``k - 1``) are refused where that layer is not softmax attention
(:func:`check_attention_layers`), naming the layers they may use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from tokenprune.adapters.shape import RECURRENT_LAYERS, SOFTMAX_ATTENTION
from tokenprune.engine import compat
from tokenprune.engine.stage import StagePlan
from tokenprune.errors import PipelineError

#: Layer kinds of softmax attention over a KV cache (``None``: a family that names no kind).
SOFTMAX_KINDS = frozenset(kind for kind in SOFTMAX_ATTENTION if kind is not None)
#: Layer kinds that take a 2-D padding mask and keep a recurrent/convolution state instead of keys and values.
RECURRENT_KINDS = RECURRENT_LAYERS
#: Every layer kind the engine cuts tokens through.
SERVED_KINDS = SOFTMAX_KINDS | RECURRENT_KINDS


def layer_kinds(text_config: Any, layers: Sequence[nn.Module]) -> tuple[str, ...]:
    """Each decoder layer's kind: the config's ``layer_types`` where it names one per layer, else read from the
    layer (its attention module's type; ``linear_attention`` for a ``linear_attn`` module, ``conv`` for ``conv``)."""
    types = getattr(text_config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) >= len(layers):
        return tuple(str(t) if t is not None else "full_attention" for t in types[: len(layers)])
    return tuple(_module_kind(layer) for layer in layers)


def _module_kind(layer: nn.Module) -> str:
    if compat.attention_module(layer) is not None:
        return compat.layer_attention_type(layer) or "full_attention"
    for name, kind in (("linear_attn", "linear_attention"), ("conv", "conv")):
        if isinstance(getattr(layer, name, None), nn.Module):
            return kind
    return "unknown"


def is_recurrent(kind: str) -> bool:
    """Whether a layer of ``kind`` takes a 2-D padding mask and keeps a state of its own (no KV cache)."""
    return kind in RECURRENT_KINDS


def attention_layers(kinds: Sequence[str]) -> list[int]:
    """The indices of the softmax-attention layers."""
    return [i for i, kind in enumerate(kinds) if kind in SOFTMAX_KINDS]


def default_layer(kinds: Sequence[str], preferred: int = 2) -> int | None:
    """The layer ``k`` for a ``layer: k`` stage that reads attention: ``preferred`` (tokenprune's usual
    ``layer: 2``) where layer ``preferred - 1`` is softmax attention, else the first ``k > preferred`` whose
    layer ``k - 1`` is (Qwen3.5's 3 linear-attention layers to 1 full: ``layer: 4``); ``None`` where no layer
    after ``preferred - 1`` is. A stage that needs layer ``k``'s own attention too (PyramidDrop) also needs
    layer ``k`` to be softmax attention (:func:`check_attention_layers` names those layers)."""
    usable = [i + 1 for i in attention_layers(kinds) if preferred <= i + 1 < len(kinds)]
    return usable[0] if usable else None


def check_attention_layers(
    layer_plans: Mapping[int, Sequence[StagePlan]], decode: StagePlan | None, kinds: Sequence[str]
) -> None:
    """Refuse a stage that reads attention at a layer without softmax attention.

    A stage at ``layer: k`` reads layer ``k - 1``'s attention (probe sources, keys, text rows) and layer
    ``k``'s own attention; a ``decode: k`` stage reads layer ``k - 1``'s. Only a model with a layer that
    is not softmax attention is checked (every kind elsewhere passes as before).

    Raises:
        PipelineError: naming the stage, the layer, its kind and the layers the stage may use.
    """
    if all(kind in SOFTMAX_KINDS for kind in kinds):
        return
    reads_previous = [i + 1 for i in attention_layers(kinds) if i + 1 < len(kinds)]
    own_usable = [k for k in reads_previous if kinds[k] in SOFTMAX_KINDS]
    for k, plans in layer_plans.items():
        for p in plans:
            needs = p.needs
            if needs.attention or {"keys", "text_attention"} & set(needs.signals):
                _require_attention(p, k - 1, kinds, f"layer {k - 1}'s attention", reads_previous)
            if needs.own_attention:  # computed with layer k - 1's arguments: both must be attention layers
                what = f"layer {k}'s own attention (computed with the arguments layer {k - 1} received)"
                for layer in (k, k - 1):
                    _require_attention(p, layer, kinds, what, own_usable)
    if decode is not None and decode.stage.point.layer:
        k = int(decode.stage.point.layer)
        _require_attention(decode, k - 1, kinds, f"layer {k - 1}'s attention and keys", reads_previous)


def _require_attention(plan: StagePlan, layer: int, kinds: Sequence[str], what: str, usable: Sequence[int]) -> None:
    if layer >= len(kinds) or kinds[layer] in SOFTMAX_KINDS:
        return
    point = plan.stage.point
    where = f"{'layer' if point.kind == 'layer' else 'decode'}: k for k in {_listed(usable)}" if usable else None
    raise PipelineError(
        f"stage {plan.index} ({plan.stage.reducer!r} at {point}) reads {what}, but layer {layer} is a "
        f"{kinds[layer]} layer (no softmax attention to read); this model's softmax-attention layers are "
        f"{_listed(attention_layers(kinds))}, so "
        + (
            f"put the stage at {where} (the first such k at or after the layer you meant)"
            if where
            else "no layer of this model serves the stage"
        )
    )


def _listed(indices: Sequence[int]) -> str:
    shown = ", ".join(map(str, indices[:12]))
    return (shown + (", ..." if len(indices) > 12 else "")) or "none"
