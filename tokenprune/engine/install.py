"""The install-time plan of the engine's hooks: what every forward does, fixed once when the hooks go in.

:func:`plan_install` checks the model against the stages (layers that exist, an attention
implementation the probe can read, a cache argument this transformers release names) and freezes
what the hooks of :mod:`tokenprune.engine.forward` read on every forward: the stages by insertion
point, the position policy, the mask kind, the decoder layers and how each per-token layer argument
follows a cut. Nothing in an :class:`InstallPlan` changes while the hooks are installed; what changes
from forward to forward is in :mod:`tokenprune.engine.forward_state`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from tokenprune.adapters.base import ModelAdapter
from tokenprune.channels import SignalChannel
from tokenprune.engine import compat
from tokenprune.engine.deepstack import adds_visual_residuals
from tokenprune.engine.guards import bind_stages, check_attention_implementation, check_decode_layer, check_layers_exist
from tokenprune.engine.hybrid import check_attention_layers, is_recurrent, layer_kinds
from tokenprune.engine.kv_sharing import KVSharing, check_shared_stages, kv_sharing
from tokenprune.engine.layer_args import LayerArg, layer_args_of, positional_names
from tokenprune.engine.masks import mask_kind
from tokenprune.engine.stage import StagePlan, plans_by_layer
from tokenprune.pipeline import Pipeline


@dataclass(frozen=True)
class InstallPlan:
    """What the hooks of one pipeline on one model do, decided at install time.

    Attributes:
        plans: Every stage, in pipeline order.
        post: The ``post_projector`` stages.
        layer: Decoder layer ``k`` -> the ``layer: k`` stages, in pipeline order.
        decode: The ``decode`` stage (at most one), and its layer ``k`` (``decode_layer``).
        prefill_plans: The stages that must run on a prefill with visual tokens (all but ``decode``).
        channels: The signal channels the stages read.
        compact: The ``compact`` position policy.
        protect_newlines: The pipeline's ``protect_newlines``.
        inside_lm: A stage changes something inside the language model (per-layer hooks needed).
        keeps_embeds: A layer stage reads the language model's input embeddings.
        residuals: The adapter adds visual residuals inside the decoder stack (DeepStack).
        masks: Keyword arguments of the engine's mask builders (``boolean``, ``dtype``).
        layers: The decoder layers.
        layer_args: How each per-token decoder-layer argument follows a cut.
        arg_names: Per decoder layer, its positional parameter names.
        recurrent: Per decoder layer, whether it is a linear-attention or convolution layer
            (:mod:`tokenprune.engine.hybrid`): its mask is 2-D and its state is built on the pruned sequence.
        produce_at: The layers ``k >= 1`` after whose layer ``k - 1`` a stage runs or a channel is produced.
        kv_sharing: The language model's KV sharing (:mod:`tokenprune.engine.kv_sharing`), where a layer stage
            or channel runs in the prefill (``None``: no sharing, or nothing for the layer hooks to follow).
        after_shared: A stage or channel reads a shared layer's output: the prefill runs them on every token.
    """

    plans: tuple[StagePlan, ...]
    post: tuple[StagePlan, ...]
    layer: Mapping[int, list[StagePlan]]
    decode: StagePlan | None
    decode_layer: int | None
    prefill_plans: tuple[StagePlan, ...]
    channels: tuple[SignalChannel, ...]
    compact: bool
    protect_newlines: bool
    inside_lm: bool
    keeps_embeds: bool
    residuals: bool
    masks: Mapping[str, Any]
    layers: tuple[nn.Module, ...]
    layer_args: Mapping[str, LayerArg]
    arg_names: tuple[tuple[str, ...], ...]
    recurrent: tuple[bool, ...]
    produce_at: tuple[int, ...]
    kv_sharing: KVSharing | None = None
    after_shared: bool = False

    @property
    def stage_kw(self) -> dict[str, bool]:
        """The pipeline options every stage runs with."""
        return {"compact_positions": self.compact, "protect_newlines": self.protect_newlines}


def plan_install(
    model: nn.Module,
    pipeline: Pipeline,
    adapter: ModelAdapter,
    plans: Sequence[StagePlan],
    channels: Sequence[SignalChannel] = (),
) -> InstallPlan:
    """Check the model against the stages and freeze the plan.

    Raises:
        TokenpruneError: a stage at a layer the model lacks, a decode layer that cannot hold one, an
            attention implementation that cannot be probed, or a transformers release whose cache
            argument is unknown.
    """
    by_layer = plans_by_layer(list(plans))
    decode = next((p for p in plans if p.stage.point.kind == "decode"), None)
    decode_layer = decode.stage.point.layer if decode is not None else None
    layers = list(adapter.decoder_layers())
    at_decode = {decode_layer: [decode]} if decode is not None and decode_layer else {}
    check_layers_exist({**by_layer, **at_decode}, len(layers))
    if decode_layer:
        check_decode_layer(decode_layer, layers)
    kinds = layer_kinds(adapter.text_config(), layers)
    check_attention_layers(by_layer, decode, kinds)
    sharing = kv_sharing(adapter.text_config(), len(layers))
    check_shared_stages(by_layer, sharing)
    bind_stages(list(plans), model)
    impl = compat.attention_implementation(adapter.text_config())
    if plans:
        check_attention_implementation(impl)
    masks = mask_kind(adapter, boolean=impl != "eager")
    compat.cache_argument_name(
        adapter.vlm().forward
    )  # refuse, at apply time, a release whose cache argument is unknown
    produce_at = tuple(sorted(set(by_layer) | {c.layer for c in channels if c.layer > 0}))
    return InstallPlan(
        plans=tuple(plans),
        post=tuple(p for p in plans if p.stage.point.kind == "post_projector"),
        layer=MappingProxyType(by_layer),
        decode=decode,
        decode_layer=decode_layer,
        prefill_plans=tuple(p for p in plans if p is not decode),
        channels=tuple(channels),
        compact=pipeline.positions == "compact",
        protect_newlines=pipeline.protect_newlines,
        # without a stage inside the language model every decoder layer holds its input: no per-layer hooks,
        # the multimodal model's post-hook records the layers at once (a hook dispatch per layer and step spared)
        inside_lm=bool(by_layer) or decode is not None,
        keeps_embeds=any("input_embeddings" in p.needs.signals for p in plans),
        residuals=adds_visual_residuals(adapter),
        masks=MappingProxyType(masks),
        layers=tuple(layers),
        layer_args=MappingProxyType(layer_args_of(adapter)),
        arg_names=tuple(positional_names(layer) for layer in layers),
        recurrent=tuple(is_recurrent(kind) for kind in kinds),
        produce_at=produce_at,
        kv_sharing=sharing if produce_at else None,
        after_shared=sharing is not None and any(k > sharing.first_shared for k in produce_at),
    )
