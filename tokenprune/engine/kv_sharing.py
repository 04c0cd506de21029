"""KV sharing (Gemma 4, Gemma 3n: ``num_kv_shared_layers``): the last layers reuse earlier layers' keys and values.

transformers (``modeling_gemma4.py``, 5.18 to 5.25) builds ``shared_kv_states`` afresh in every forward of the
language model: the last layer of each attention type before the first shared layer (the *source*,
``kv_sharing_modes == "store"``) puts the keys and values it attended with there (after its cache update: the
prompt's, or the cached ones plus the step's in decoding), and each shared layer (``"reuse"``) attends with
its own queries to its type's entry, computing no keys or values and keeping no cache of its own (a dummy
cache layer in 5.24 and 5.25; none at all in 5.18 and 5.21). In 5.24 and 5.25, the language model also slices
the hidden states, per-layer inputs, rotary tables and masks to the last ``logits_to_keep`` positions before
the first shared layer (``_maybe_slice_kv_shared_inputs``; ``generate()`` passes ``logits_to_keep=1`` in the
prefill).

So a shared layer's keys cover exactly the tokens its source layer held. The engine serves:

* cuts before the language model (``pre_projector``, ``post_projector``): every layer runs on the kept tokens,
  the sources hold them, the model's own slicing slices the pruned sequence;
* ``layer: k`` cuts up to the earliest source layer: the sources and the shared layers hold the same kept
  tokens, in the prefill and in every decoding step;
* ``layer: k`` cuts after it: a shared layer that holds fewer tokens than its source gets the source's keys and
  values gathered to its own tokens (:func:`shared_keys_call`: the prefill columns, then the decoded tokens);
  refused where that cannot stand for the layer's own keys (:func:`check_shared_stages`: merges, a shared
  layer's own attention);
* ``decode: k`` stages: a shared layer from ``k`` on attends to the kept columns of its keys, selected inside
  its attention call like every other layer's.

In a prefill the model sliced to its last positions, a pruned shared layer's mask keys and position ids follow
the cut (:func:`tail_call`); where that cannot hold, the language model gets ``logits_to_keep=0``
(:func:`full_prefill`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokenprune.engine.forward_state import PrefillState
from tokenprune.engine.masks import causal_mask, slice_mask
from tokenprune.engine.sequence import TokenSequence, gather_position_ids, position_ids_like
from tokenprune.engine.stage import StagePlan
from tokenprune.errors import PipelineError, TokenpruneError


@dataclass(frozen=True)
class KVSharing:
    """Which decoder layers share keys and values.

    Attributes:
        first_shared: The first layer that reuses keys and values (every later one does too).
        sources: Attention type -> the layer whose keys and values the shared layers of that type reuse.
        kinds: Each decoder layer's attention type.
    """

    first_shared: int
    sources: Mapping[str, int]
    kinds: tuple[str, ...]

    @property
    def earliest_source(self) -> int:
        """The earliest source layer: a ``layer: k`` cut up to this one leaves every source and shared layer the
        same tokens."""
        return min(self.sources.values())


def kv_sharing(text_config: Any, layers: int) -> KVSharing | None:
    """The model's KV sharing, from its text config's ``num_kv_shared_layers`` and ``layer_types`` (``None``:
    no layer shares). The sources are the last layer of each type before the first shared layer, as
    ``Gemma4TextConfig.kv_sharing_modes`` marks them ``"store"`` (and ``Gemma4TextAttention`` of 5.18 computes).
    """
    shared = getattr(text_config, "num_kv_shared_layers", None)
    if not isinstance(shared, int) or shared <= 0 or shared >= layers:
        return None
    first = layers - shared
    kinds = tuple(getattr(text_config, "layer_types", None) or ["full_attention"] * layers)[:layers]
    sources = {kind: max(i for i in range(first) if kinds[i] == kind) for kind in set(kinds[:first])}
    return KVSharing(first_shared=first, sources=sources, kinds=kinds)


def check_shared_stages(layer_plans: Mapping[int, Sequence[StagePlan]], sharing: KVSharing | None) -> None:
    """Refuse the ``layer: k`` stages after the earliest source layer that KV sharing cannot follow: a reducer
    that may merge (a merged token has no keys of its own in the source layer) and a stage reading the own
    attention of a shared layer (its dry call would attend to the source's keys of every token).

    Raises:
        PipelineError: naming the stage, the source and shared layers, and the ``k`` the stage may use.
    """
    if sharing is None:
        return
    for k, plans in sorted(layer_plans.items()):
        if k <= sharing.earliest_source:
            continue
        for plan in plans:
            if type(plan.reducer).capabilities.merges:
                why = "it may merge tokens, and a merged token has no keys and values in the source layer"
            elif plan.needs.own_attention and k >= sharing.first_shared:
                why = f"it reads layer {k}'s own attention, and layer {k} computes no keys of its own"
            else:
                continue
            raise PipelineError(
                f"stage {plan.index} ({plan.stage.reducer!r} at {plan.stage.point}) cannot run there: this model "
                f"shares keys and values ({_shared(sharing)}) and {why}; {_where(sharing)}"
            )


def _shared(sharing: KVSharing) -> str:
    sources = ", ".join(f"layer {i} ({kind})" for kind, i in sorted(sharing.sources.items(), key=lambda e: e[1]))
    return f"layers {sharing.first_shared} to {len(sharing.kinds) - 1} attend with the keys and values of {sources}"


def _where(sharing: KVSharing) -> str:
    limit = sharing.earliest_source
    if limit < 1:
        return "put the stage before the language model (layer 0 is a source, so every layer: k follows one)"
    ks = "1" if limit == 1 else f"1..{limit}"
    return (
        f"put the stage at layer: k for k in {ks} (at or before the earliest source layer) or before the language model"
    )


def full_prefill(kwargs: dict[str, Any], lm_visual: Tensor, *, always: bool) -> bool:
    """Have the language model run its shared layers on every token of this prefill (``logits_to_keep=0``), in
    place, where its own slicing to the last ``logits_to_keep`` positions cannot follow a layer cut: ``always``
    (a stage or signal channel reads a shared layer's output), or a visual token among those last columns of the
    language model's input ``lm_visual`` ``(B, L)`` (a layer stage may drop it; one host read per prefill). Otherwise
    those last columns are text, which every cut keeps, and :func:`tail_call` follows the cut. Whether
    ``kwargs`` changed.
    """
    keep = kwargs.get("logits_to_keep")
    if not isinstance(keep, int) or keep <= 0 or keep >= int(lm_visual.shape[1]):
        return False
    if always or bool(lm_visual[:, -keep:].any()):
        kwargs["logits_to_keep"] = 0
        return True
    return False


def tail_call(
    kwargs: dict[str, Any],
    hidden: Tensor,
    seg: TokenSequence,
    adapter: Any,
    layer: int,
    *,
    all_valid: bool,
    compact: bool,
    boolean: bool,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """A shared layer's keyword arguments in a prefill that a layer cut pruned (to ``seg``) and the model then
    sliced to its last ``n`` positions (``hidden`` ``(B, n, D)``, the last ``n`` kept tokens: the language
    model's last ``n`` input columns, text, which :func:`full_prefill` made sure of).

    The model sliced its per-layer input, rotary tables and mask rows to those columns already; the mask's
    key columns follow the cut (the source layer's keys are the kept tokens'), position ids (never sliced by
    the model) are gathered, and under ``compact`` positions the rotary tables are recomputed.
    """
    n = int(hidden.shape[1])
    cols, valid = seg.lm_column, seg.valid
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor):
        rows = torch.arange(n, device=cols.device).expand(cols.shape[0], n)
        kwargs["attention_mask"] = slice_mask(mask, rows, cols, valid, boolean=boolean, dtype=dtype)
    elif mask is None and not (all_valid and not seg.has_padding_slots):
        kwargs["attention_mask"] = causal_mask(valid, q=n, boolean=boolean, dtype=dtype)
    positions = seg.positions[..., -n:]
    if compact:
        kwargs["position_embeddings"] = adapter.rotary(hidden, positions, layer)
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, Tensor):
        tail = cols[:, -n:]
        kwargs["position_ids"] = (
            position_ids_like(positions, position_ids) if compact else gather_position_ids(position_ids, tail)
        )
    return kwargs


def shared_keys_call(
    kwargs: dict[str, Any], layer: int, sharing: KVSharing, st: PrefillState, seg: TokenSequence
) -> dict[str, Any]:
    """A shared layer's ``shared_kv_states`` with its source's keys and values gathered to the tokens the
    layer holds (``seg``), where a layer cut between the source and the layer left it fewer tokens.

    In the prefill the source's keys are its prefill columns; in a decoding step those, then the tokens
    decoded so far (this step's included). The gathered copy goes to this layer only; the model's
    ``shared_kv_states`` keeps the source's own.

    Raises:
        TokenpruneError: no keys and values of the source in ``shared_kv_states``, or a source that keeps only
            its window (a sliding layer past its window in decoding).
    """
    source = sharing.sources[sharing.kinds[layer]]
    src = st.segment(source)
    shared = kwargs.get("shared_kv_states")
    kind = sharing.kinds[layer]
    if src is seg:
        return kwargs
    if shared is None or kind not in shared:
        raise TokenpruneError(
            f"decoder layer {layer} reuses the keys and values of layer {source}, but received no shared_kv_states "
            f"entry for {kind!r}; tokenprune follows transformers' Gemma 4 KV sharing (the source stores them)"
        )
    key, value = shared[kind]
    idx = _source_columns(st, source, src, seg)
    width = int(src.valid.shape[1]) if src is not None else st.lm_length
    extra = 0 if st.in_prefill else st.decoded + st.step_length
    if int(key.shape[2]) != width + extra:
        raise TokenpruneError(
            f"decoder layer {layer} reuses the keys and values of layer {source} ({kind}), which hold "
            f"{int(key.shape[2])} keys, not its {width} prefill tokens plus the {extra} decoded: a sliding layer "
            "past its window (sliding_window); tokenprune gathers the shared keys to a layer cut's kept tokens only "
            "while prompt and output fit in the window; cut at or before the earliest source layer instead"
        )
    if extra:
        new = torch.arange(width, width + extra, device=idx.device).expand(idx.shape[0], extra)
        idx = torch.cat([idx, new], 1)
    index = idx[:, None, :, None].expand(key.shape[0], key.shape[1], -1, key.shape[3])
    out = copy.copy(shared)
    out[kind] = (key.gather(2, index), value.gather(2, index.expand(*index.shape[:3], value.shape[3])))
    kwargs["shared_kv_states"] = out
    return kwargs


def _source_columns(st: PrefillState, source: int, src: TokenSequence | None, seg: TokenSequence) -> Tensor:
    """``(B, L')`` the column in the source's prefill keys of each token of ``seg`` (0 for a padding slot, which
    the layer's mask leaves out), computed once per (source, segment) and prefill."""
    hit = st.shared_columns.get((source, id(seg)))
    if hit is not None and hit[0] is seg:
        return hit[1]
    cols = seg.lm_column
    if src is None:  # the source holds the language model's input: its columns are the lm columns
        idx = cols.clamp(min=0)
    else:
        batch, width = int(src.lm_column.shape[0]), int(src.lm_column.shape[1])
        inverse = torch.zeros(batch, st.lm_length + 1, dtype=torch.long, device=cols.device)
        slots = torch.where(src.lm_column >= 0, src.lm_column, st.lm_length)
        inverse.scatter_(1, slots, torch.arange(width, device=cols.device).expand(batch, width))
        idx = inverse.gather(1, cols.clamp(min=0))
    st.shared_columns[(source, id(seg))] = (seg, idx)
    return idx
