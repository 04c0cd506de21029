"""What pruned layers and decoding steps receive: sliced prefill inputs, and the caller's decoding masks and
positions mapped onto the pruned KV cache.

The caller (or ``generate``) keeps describing the *unpruned* sequence: a 2-D mask over every token
of the prompt plus the tokens decoded so far, positions that continue from the unpruned length.
These functions translate that to what the pruned cache holds, at the multimodal model's input
(post_projector stages shortened every layer) and at each decoder layer that a layer stage pruned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokenprune.adapters.base import ModelAdapter
from tokenprune.engine import positions as P
from tokenprune.engine.forward_state import PrefillState
from tokenprune.engine.layer_args import LayerArg, LayerCut, cut_prefill_args, layer_args_of
from tokenprune.engine.masks import causal_mask
from tokenprune.engine.sequence import TokenSequence, position_ids_like
from tokenprune.errors import TokenpruneError


def check_decoding_mask(mask: Any, st: PrefillState) -> None:
    """Refuse a decoding step's mask that does not describe the unpruned sequence.

    Raises:
        TokenpruneError: a 2-D or 4-D mask whose key length is not the unpruned length so far, or a
            mask of another kind.
    """
    if mask is None:
        return
    expected = st.keys_so_far
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 4):
        shape = f" of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else ""
        raise TokenpruneError(
            f"decoding step after a pruned prefill: unsupported attention_mask ({type(mask).__name__}{shape}); pass "
            f"a (batch, {expected}) mask over the unpruned sequence, as generate() does"
        )
    if mask.shape[-1] != expected:
        raise TokenpruneError(
            f"decoding step after a pruned prefill: attention_mask covers {mask.shape[-1]} tokens, but the unpruned "
            f"sequence so far has {expected}; pass the mask over the full (unpruned) sequence, as generate() does, "
            "not over the pruned cache"
        )


def model_decoding_kwargs(kw: dict[str, Any], st: PrefillState, adapter: ModelAdapter, compact: bool) -> dict[str, Any]:
    """The multimodal model's keyword arguments for a decoding step after post_projector stages.

    The caller's 2-D mask keeps its decoded part and takes the pruned prompt's mask for the rest;
    positions continue from the unpruned length (``original``) or shift down by the freed positions.

    Raises:
        TokenpruneError: a 4-D mask (it cannot be mapped onto the pruned cache).
    """
    mask = kw.get("attention_mask")
    batch, q = st.input_mask.shape[0], st.step_length
    position_ids = kw.get("position_ids")
    if position_ids is None:
        position_ids = adapter.decode_positions(kw, st.input_length + st.decoded, q)
    if isinstance(mask, Tensor) and mask.dim() == 2:
        kw["attention_mask"] = torch.cat([st.lm_mask.to(mask.dtype), mask[:, st.input_length :]], dim=1)
    elif mask is None:
        ones = torch.ones(batch, st.decoded + q, dtype=torch.long, device=st.lm_mask.device)
        kw["attention_mask"] = torch.cat([st.lm_mask.long(), ones], dim=1)
    else:
        raise TokenpruneError(
            "decoding step after a post_projector stage: only 2-D attention masks (or none) can be mapped onto the "
            "pruned cache; pass a (batch, length) attention_mask"
        )
    if compact and st.lm_freed_positions is not None:
        rows, fmt = P.to_rows(position_ids, batch)
        position_ids = P.from_rows(rows - st.lm_freed_positions.unsqueeze(-1), fmt)
    kw["position_ids"] = position_ids
    return kw


def pruned_layer_call(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    hidden: Tensor,
    seg: TokenSequence,
    st: PrefillState,
    adapter: ModelAdapter,
    layer: int,
    *,
    compact: bool,
    boolean: bool,
    dtype: torch.dtype,
    table: Mapping[str, LayerArg] | None = None,
    names: tuple[str, ...] = (),
    recurrent: bool = False,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of a decoder layer that a layer stage pruned (it holds the tokens of ``seg``).

    In the prefill: every per-token argument the language model computed for the whole sequence follows
    the cut to the kept tokens, as :mod:`tokenprune.engine.layer_args` declares (``table``: the engine's
    with the adapter's entries; ``names``: the layer's positional parameter names). By default the 4-D
    mask, rotary tables and position ids are sliced (under ``compact`` positions the rotary tables are
    recomputed for the renumbered positions) and any other ``(B, L, ...)`` tensor is gathered. Where the
    model passed no mask (sdpa, no padding) and the kept tokens have no padding either, none is passed
    on: the attention stays causal without an explicit mask, as in the stock model (an explicit 4-D mask
    made sdpa 1.5x to 1.9x slower on CPU).

    In a decoding step: the new tokens attend to every kept token of this layer's cache that is not
    padding, and to the tokens decoded so far. The model sized its mask from some layer's cache
    (layer 0, or the first layer of that attention type, which may be pruned), so the mask is rebuilt
    over this layer's own cache rather than sliced.

    A ``recurrent`` layer (linear attention, short convolution: :mod:`tokenprune.engine.hybrid`) takes a 2-D
    padding mask instead: the kept tokens' in the prefill, the model's own (for the new tokens, or none) in
    decoding steps; its state in the cache was built from the kept tokens by the layer itself.

    Raises:
        TokenpruneError: in decoding, the model's mask fits neither the unpruned nor this layer's cache.
    """
    if table is None:
        table = layer_args_of(adapter)
    call = _PrunedCall(hidden, seg, st, adapter, layer, compact, boolean, dtype, recurrent)
    if st.in_prefill:
        return _cut_prefill(args, kwargs, call, table, names)
    return args, _decoding_layer_kwargs(kwargs, call)


@dataclass(frozen=True)
class _PrunedCall:
    """What :func:`pruned_layer_call` cuts a layer's arguments for (see its parameters)."""

    hidden: Tensor
    seg: TokenSequence
    st: PrefillState
    adapter: ModelAdapter
    layer: int
    compact: bool
    boolean: bool
    dtype: torch.dtype
    recurrent: bool = False


def _cut_prefill(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call: _PrunedCall,
    table: Mapping[str, LayerArg],
    names: tuple[str, ...],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A prefill layer's arguments after the cut, cut once per segment where the model hands every layer the
    same objects (the mask, rotary tables and position ids are computed once per forward): later layers of the
    segment reuse the first one's (not under ``compact``, whose rotary tables depend on the layer). A hybrid
    model's recurrent and attention layers keep one such cut each (their masks differ in form)."""
    hidden, seg, st, layer, compact = call.hidden, call.seg, call.st, call.layer, call.compact
    given = (seg, args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
    if st.sliced is None or st.sliced[0] is not seg:
        st.sliced = (seg, {})
    kept = st.sliced[1].get(call.recurrent)
    if not compact and kept is not None and _same_objects(kept[0], given):
        rest, sliced = kept[1]
        return (args[0], *rest), {**kwargs, **sliced}
    all_valid = st.all_valid(seg)
    cut = LayerCut(hidden, seg, st.lm_length, layer, compact, call.adapter, all_valid, call.recurrent)
    boolean, dtype = call.boolean, call.dtype
    out_args, out_kwargs = cut_prefill_args(args, dict(kwargs), cut, table, names, boolean=boolean, dtype=dtype)
    st.sliced[1][call.recurrent] = (
        given,
        (out_args[1:], {k: v for k, v in out_kwargs.items() if k != "hidden_states"}),
    )
    return out_args, out_kwargs


def _same_objects(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two ``(segment, positional, keyword)`` triples hold the very same objects."""
    (seg_a, args_a, kw_a), (seg_b, args_b, kw_b) = a, b
    return (
        seg_a is seg_b
        and len(args_a) == len(args_b)
        and all(x is y for x, y in zip(args_a, args_b, strict=True))
        and kw_a.keys() == kw_b.keys()
        and all(kw_a[k] is kw_b[k] for k in kw_a)
    )


def _decoding_layer_kwargs(kwargs: dict[str, Any], call: _PrunedCall) -> dict[str, Any]:
    """A pruned layer's keyword arguments in a decoding step (see :func:`pruned_layer_call`)."""
    seg, st, layer = call.seg, call.st, call.layer
    if call.recurrent:  # its 2-D mask covers the new tokens only; its state holds the kept tokens already
        return kwargs
    mask = kwargs.get("attention_mask")
    extra = st.decoded + st.step_length
    valid = torch.cat([seg.valid, seg.valid.new_ones(seg.valid.shape[0], extra)], 1)
    if isinstance(mask, Tensor):
        _check_mask_width(int(mask.shape[-1]), call, extra, int(valid.shape[1]))
    if mask is not None or seg.has_padding_slots or not st.all_valid(seg):
        kwargs["attention_mask"] = causal_mask(valid, q=st.step_length, boolean=call.boolean, dtype=call.dtype)
    if call.compact and st.step_positions is not None:
        rows = st.step_positions - (seg.freed_positions - st.lm_freed_positions).unsqueeze(-1)
        kwargs["position_embeddings"] = call.adapter.rotary(call.hidden, rows, layer)
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, Tensor):
            kwargs["position_ids"] = position_ids_like(rows, position_ids)
    return kwargs


def _check_mask_width(keys: int, call: _PrunedCall, extra: int, held: int) -> None:
    """Refuse a decoding step's mask over ``keys`` keys that fits no cache the model may have sized it from
    (``held``: this layer's cache, new tokens included); the layer's config is read only where the usual two miss."""
    st, layer = call.st, call.layer
    if keys in (st.lm_length + extra, held):
        return
    widths = _mask_widths(st, call.adapter, layer, extra) | {held}
    if keys not in widths:
        raise TokenpruneError(
            f"decoding step at layer {layer}: the attention mask covers {keys} keys, expected one of "
            f"{sorted(widths)}: the unpruned cache ({st.lm_length + extra}), this layer's ({held}) or "
            "that of the layer the model sized its mask from, new tokens included"
            + _windowed_layer_reason(call.adapter, layer, keys)
        )


def _mask_widths(st: PrefillState, adapter: ModelAdapter, layer: int, extra: int) -> set[int]:
    """The key lengths a decoding step's mask at ``layer`` may have: the model sizes each kind's mask from one
    layer's cache (transformers 5.25: the first layer of that attention kind, such as Gemma 4's first full-attention
    layer 1; earlier releases: layer 0), which a layer cut before it pruned to its segment's tokens; or the mask
    covers the unpruned cache. ``extra``: the tokens decoded so far, this step's included."""
    types = tuple(getattr(adapter.text_config(), "layer_types", None) or ())
    kind = types[layer] if layer < len(types) else None
    sized_from = {0, types.index(kind)} if kind is not None else {0}
    widths = {st.lm_length, *(_held(st, j) for j in sized_from)}
    return {w + extra for w in widths}


def _held(st: PrefillState, layer: int) -> int:
    """How many prefill tokens (padding slots included) decoder layer ``layer`` caches."""
    seg = st.segment(layer)
    return st.lm_length if seg is None else int(seg.valid.shape[1])


def _windowed_layer_reason(adapter: ModelAdapter, layer: int, keys: int) -> str:
    """Why a decoding step's mask does not fit, where the layer attends within a window (else ``""``)."""
    types = getattr(adapter.text_config(), "layer_types", None) or ()
    kind = types[layer] if layer < len(types) else None
    if kind not in ("chunked_attention", "sliding_attention"):
        return ""
    return (
        f"; model {adapter.name!r}: layer {layer} is a {kind} layer whose cache and mask keep only its window "
        f"({keys} keys), and tokenprune serves decoding after a layer cut only while the prompt plus the generated "
        "tokens fit in that window (attention_chunk_size / sliding_window); prune after the projector instead, or "
        "keep prompts shorter"
    )


def decoding_positions(
    position_ids: Tensor | None, start: int, batch: int, length: int, device: torch.device
) -> Tensor:
    """The position rows of a decoding step: the caller's ``position_ids``, else ``start, start + 1, ...``.

    ``start`` is the pruned prefill's length plus the tokens decoded so far.
    """
    if position_ids is not None:
        return P.to_rows(position_ids, batch)[0]
    return torch.arange(start, start + length, device=device)[None, None].expand(1, batch, -1)
