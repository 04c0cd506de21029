"""Layer-stage inputs beyond the hidden states and the probe's attention: a layer's own attention on its
input (served by a dry call of its attention module), the previous layer's keys, the final norm."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from tokenprune.adapters.base import ModelAdapter
from tokenprune.engine import compat
from tokenprune.engine.forward_state import PrefillState
from tokenprune.engine.guards import check_own_attention_layers
from tokenprune.engine.probe import AttentionProbe, ProbeRows
from tokenprune.engine.pruned_inputs import pruned_layer_call
from tokenprune.engine.sequence import TokenSequence
from tokenprune.engine.stage import (
    StagePlan,
    StageSignals,
    key_layers,
    own_attention_layers,
    probed_layers,
    text_attention_layers,
)
from tokenprune.errors import TokenpruneError


def probed_attention(probe: AttentionProbe | None, k: int) -> dict[str, Tensor] | None:
    """The probe's attention of layer ``k - 1`` for the stages at ``layer: k`` (``None`` if none read it).

    Raises:
        TokenpruneError: the layer was probed but recorded nothing.
    """
    if probe is None or (k - 1) not in probe.layers:
        return None
    attention = probe.scores.get(k - 1)
    if attention is None:
        raise TokenpruneError(
            f"the attention probe recorded nothing at layer {k - 1}; the layer's attention did not go "
            "through the probe (is the attention implementation overridden elsewhere?)"
        )
    return attention


#: Channel-name prefix of the probe's signals of layer ``k - 1`` while the ``layer: k`` stages run (see
#: :func:`with_probe_channels`); a registered channel's name has no ``:``.
PROBE = "probe:"
ATTENTION_CHANNEL, KEYS_CHANNEL, TEXT_ATTENTION_CHANNEL = PROBE + "attention:", PROBE + "keys", PROBE + "text_attention"


def with_probe_channels(seq: TokenSequence, probe: AttentionProbe | None, k: int) -> TokenSequence:
    """``seq`` with the probe's records of layer ``k - 1`` as channels of its columns, so that every cut of a
    ``layer: k`` stage carries them through the sequence's own gather (a merged token keeps its root's value):
    ``probe:attention:<source>`` ``(B, L)``, ``probe:keys`` ``(B, L, Dk)`` and ``probe:text_attention``
    ``(B, L, T)`` (each column's attention from the ``T`` text rows). ``seq`` itself is left as it is.

    Raises:
        TokenpruneError: the layer was probed but recorded nothing.
    """
    attention = probed_attention(probe, k) or {}
    channels = {ATTENTION_CHANNEL + source: scores for source, scores in attention.items()}
    if probe is not None and (keys := probe.key_states.get(k - 1)) is not None:
        channels[KEYS_CHANNEL] = keys
    if probe is not None and (text := probe.text_scores.get(k - 1)) is not None:
        channels[TEXT_ATTENTION_CHANNEL] = text.transpose(1, 2)
    return replace(seq, channels={**seq.channels, **channels}) if channels else seq


def probe_channels(seq: TokenSequence) -> tuple[dict[str, Tensor] | None, Tensor | None, Tensor | None]:
    """The probe's channels of ``seq`` (:func:`with_probe_channels`) on its current columns: per source ``(B, L)``
    attention (``None``: none probed), ``(B, L, Dk)`` keys and ``(B, T, L)`` per-text-row attention."""
    attention = {
        name.removeprefix(ATTENTION_CHANNEL): values
        for name, values in seq.channels.items()
        if name.startswith(ATTENTION_CHANNEL)
    }
    text = seq.channels.get(TEXT_ATTENTION_CHANNEL)
    return attention or None, seq.channels.get(KEYS_CHANNEL), None if text is None else text.transpose(1, 2)


@dataclass
class DryCall:
    """What a dry call of decoder layer ``k``'s attention needs.

    Attributes:
        layer: Decoder layer ``k``.
        layer_kwargs: The keyword arguments layer ``k - 1`` received from the language model, before the
            engine sliced them (``None`` if it received none).
        state: The current prefill.
        adapter: The model family's adapter (rotary tables under ``compact`` positions).
        compact: The ``compact`` position policy.
        mask_kind: Keyword arguments of the engine's mask builders (``boolean``, ``dtype``).
    """

    layer: nn.Module
    layer_kwargs: dict[str, Any] | None
    state: PrefillState
    adapter: ModelAdapter
    compact: bool
    mask_kind: dict[str, Any]


def own_attention(k: int, hidden: Tensor, seq: TokenSequence, probe: AttentionProbe, dry: DryCall) -> dict[str, Tensor]:
    """Layer ``k``'s own attention on ``hidden`` (``(B, L, D)``, the tokens of ``seq``), before layer ``k`` runs.

    Calls layer ``k``'s input norm and attention module (the model's own code: q/k projections, q/k
    norms, RoPE, grouped heads) with what layer ``k`` would receive for ``seq``: layer ``k - 1``'s
    language-model arguments, sliced to ``seq`` as :func:`pruned_layer_call` slices them, without
    the cache. The probe takes ``q`` and ``k`` at the attention function and stops the call. The
    value projection is skipped, and the query projection computed for the last row only when that
    is the only row read (:func:`compat.lean_projections`).

    Returns:
        ``{source: (B, L) float32}`` for the probe's sources at layer ``k``.
    """
    if dry.layer_kwargs is None:
        raise TokenpruneError(f"layer {k - 1} ran without keyword arguments; layer {k}'s own attention needs them")
    kw = dict(dry.layer_kwargs)
    if seq is not dry.state.lm_sequence:
        st, adapter = dry.state, dry.adapter
        kw = pruned_layer_call((hidden,), kw, hidden, seq, st, adapter, k, compact=dry.compact, **dry.mask_kind)[1]
    attn = compat.attention_module(dry.layer)
    if attn is None:
        raise TokenpruneError(f"decoder layer {k} has no attention module; its own attention cannot be computed")
    kw = compat.dry_attention_kwargs(kw)
    normed = compat.input_norm(dry.layer)(hidden)
    rows = ProbeRows(visual=seq.visual, valid=seq.valid)
    query_rows = 1 if probe.own.get(k, frozenset()) == {"last"} else None
    with compat.lean_projections(attn, query_rows):
        return probe.dry_run(k, lambda: attn(hidden_states=normed, **kw), rows)


def stage_signals(
    k: int,
    plan: StagePlan,
    hidden: Tensor,
    seq: TokenSequence,
    probe: AttentionProbe | None,
    dry: DryCall | None,
    keys: Tensor | None,
    language_model: nn.Module,
) -> StageSignals:
    """The inputs ``plan``'s reducer asks for beyond the probe's attention, for the tokens of ``seq``.

    Args:
        k: The stage's layer.
        plan: The stage.
        hidden: ``(B, L, D)`` hidden states entering layer ``k``.
        seq: Their sequence.
        probe: The engine's probe (``None`` if no stage needs one).
        dry: For an own-attention stage, what the dry call needs; ``None`` otherwise.
        keys: ``(B, L, Dk)`` keys of layer ``k - 1`` on the columns of ``seq``, if recorded.
        language_model: Where the final norm lives.

    Raises:
        TokenpruneError: a signal the reducer needs could not be computed.
    """
    start = time.perf_counter()
    wanted = plan.needs.signals
    if "keys" in wanted and keys is None:
        raise TokenpruneError(f"the attention probe recorded no keys at layer {k - 1} (needed by stage {plan.index})")
    own = own_attention(k, hidden, seq, probe, dry) if dry is not None and probe is not None else None
    return StageSignals(
        own_attention=own,
        keys=keys if "keys" in wanted else None,
        final_norm=compat.final_norm(language_model) if "final_norm" in wanted else None,
        seconds=time.perf_counter() - start if own is not None else 0.0,
    )


def with_text_signals(
    plan: StagePlan, signals: StageSignals, text_attention: Tensor | None, state: PrefillState | None
) -> StageSignals:
    """``signals`` plus the ``text_attention`` and ``input_embeddings`` signals ``plan``'s reducer asks for.

    Raises:
        TokenpruneError: the probe recorded no per-text-row attention, or the input embeddings are missing.
    """
    wanted = plan.needs.signals
    if "text_attention" in wanted and text_attention is None:
        raise TokenpruneError(
            f"the attention probe recorded no per-text-row attention before stage {plan.index}; the layer's "
            "attention did not go through the probe (is the attention implementation overridden elsewhere?)"
        )
    embeds = state.lm_embeds if state is not None and "input_embeddings" in wanted else None
    if "input_embeddings" in wanted and embeds is None:
        raise TokenpruneError(f"the language model's input embeddings were not recorded for stage {plan.index}")
    return replace(
        signals,
        text_attention=text_attention if "text_attention" in wanted else None,
        input_embeds=embeds,
        input_sequence=state.lm_sequence if embeds is not None and state is not None else None,
    )


def attention_probe_for(
    layer_plans: Mapping[int, list[StagePlan]],
    language_model: nn.Module,
    layers: list[nn.Module],
    decode: StagePlan | None = None,
) -> AttentionProbe | None:
    """The attention probe the layer stages and the decode stage need (installed), or ``None`` when none does.

    Raises:
        TokenpruneError: a stage reads a layer's own attention where that is refused, or the language
            model's attention implementation cannot be probed.
    """
    probed, own = probed_layers(layer_plans), own_attention_layers(layer_plans)
    keys, text_rows = key_layers(layer_plans), text_attention_layers(layer_plans)
    check_own_attention_layers(own, layers)
    if not (probed or own or keys or text_rows or decode):
        return None
    probe = AttentionProbe(layers=probed, own=own, keys=keys, text_rows=text_rows)
    if decode is not None:
        probe.decode_from = int(decode.stage.point.layer)  # type: ignore[arg-type]
        probe.decode_layer = probe.decode_from - 1
    probe.install(language_model, layers)
    return probe
