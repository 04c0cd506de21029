"""KV sharing (Gemma 4, Gemma 3n: ``num_kv_shared_layers``): the last layers reuse earlier layers' keys and values.

transformers (``modeling_gemma4.py``, 5.18 to 5.25) builds ``shared_kv_states`` afresh in every forward of the
language model: the last layer of each attention type before the first shared layer (the *source*,
``kv_sharing_modes == "store"``) puts the keys and values it attended with there (after its cache update: the
prompt's, or the cached ones plus the step's in decoding), and each shared layer (``"reuse"``) attends with its
own queries to its type's entry, computing no keys or values and keeping no cache of its own (a dummy cache
layer from 5.24; none at all in 5.18). From 5.24, the language model also slices the hidden states, per-layer
inputs, rotary tables and masks to the last ``logits_to_keep`` positions before the first shared layer
(``_maybe_slice_kv_shared_inputs``; ``generate()`` passes ``logits_to_keep=1`` in the prefill).

So a shared layer's keys cover exactly the tokens its source layer held. The engine serves:

* cuts before the language model (``pre_projector``, ``post_projector``): every layer runs on the kept tokens,
  the sources hold them, the model's own slicing slices the pruned sequence;
* ``layer: k`` cuts with ``k`` at or before the earliest source layer: the sources and the shared layers hold
  the same kept tokens, in the prefill and in every decoding step. The engine has the language model run the
  shared layers of such a prefill on every kept token (``logits_to_keep=0`` to the language model), since the
  model's slicing would take the last positions of the unpruned arguments, not the kept tokens';
* ``decode: k`` stages at any ``k``: a shared layer from ``k`` on attends to the kept columns of its source's
  keys and values, gathered inside its attention call like every other layer's.

A ``layer: k`` stage after the earliest source would leave a shared layer with queries for the kept tokens but
keys and values of every token (its source ran before the cut); it is refused at ``apply()``
(:func:`check_layer_cuts`), naming the layers a cut may use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokenprune.engine.masks import causal_mask, slice_mask
from tokenprune.engine.sequence import TokenSequence, gather_position_ids, position_ids_like
from tokenprune.engine.stage import StagePlan
from tokenprune.errors import PipelineError


@dataclass(frozen=True)
class KVSharing:
    """Which decoder layers share keys and values.

    Attributes:
        first_shared: The first layer that reuses keys and values (every later one does too).
        sources: Attention type -> the layer whose keys and values the shared layers of that type reuse.
        layers: The number of decoder layers.
    """

    first_shared: int
    sources: Mapping[str, int]
    layers: int

    @property
    def earliest_source(self) -> int:
        """The earliest source layer: a ``layer: k`` cut may run at ``k`` up to this one."""
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
    types = list(getattr(text_config, "layer_types", None) or ["full_attention"] * layers)[:layers]
    sources = {kind: max(i for i in range(first) if types[i] == kind) for kind in set(types[:first])}
    return KVSharing(first_shared=first, sources=sources, layers=layers)


def check_layer_cuts(layer_plans: Mapping[int, Sequence[StagePlan]], sharing: KVSharing | None) -> None:
    """Refuse a ``layer: k`` stage after the earliest source layer of a model that shares keys and values.

    Raises:
        PipelineError: naming the stage, the source and shared layers, and the ``k`` the stage may use.
    """
    if sharing is None:
        return
    limit = sharing.earliest_source
    for k, plans in sorted(layer_plans.items()):
        if k <= limit:
            continue
        plan = plans[0]
        sources = ", ".join(f"layer {i} ({kind})" for kind, i in sorted(sharing.sources.items(), key=lambda e: e[1]))
        raise PipelineError(
            f"stage {plan.index} ({plan.stage.reducer!r} at {plan.stage.point}) cuts tokens before layer {k}, but "
            f"this model shares keys and values: layers {sharing.first_shared} to {sharing.layers - 1} attend with "
            f"the keys and values of {sources}, computed before the cut over every token, and tokenprune does not "
            f"gather them to the kept tokens; {_usable(limit)}"
        )


def _usable(limit: int) -> str:
    before = "prune before the language model (post_projector or pre_projector)"
    if limit < 1:
        return f"layer 0's keys and values are shared, so no layer: k stage can run on this model; {before}"
    return (
        f"put the stage at layer: k for k in {'1' if limit == 1 else f'1..{limit}'} (at or before the earliest "
        f"layer whose keys and values are shared), or {before}"
    )


def full_prefill(kwargs: dict[str, Any], lm_visual: Tensor, *, always: bool) -> bool:
    """Have the language model run its shared layers on every token of this prefill (``logits_to_keep=0``), in
    place, where its own slicing to the last ``logits_to_keep`` positions cannot follow a layer cut: ``always``
    (a signal channel reads a shared layer's output), or a visual token among those last columns of the language
    model's input ``lm_visual`` ``(B, L)`` (a layer stage may drop it; one host read per prefill). Otherwise
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
