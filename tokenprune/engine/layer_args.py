"""Per-token arguments of a decoder layer, and how each follows a cut: declared in one place.

A layer stage shortens the sequence; every later decoder layer must then receive, for each argument
the language model computed per token (the attention mask, the rotary tables, the position ids, and
model-specific ones such as Gemma 3n's per-layer embeddings or a linear-attention layer's 2-D padding
mask), only the kept tokens' entries. :class:`LayerArg` says how one argument follows a cut:

``"columns"``
    Gather the kept columns along the token ``axis`` (a tensor whose axis 0 is the batch or 1, or a
    tuple/list of them); in decoding steps passed on as given (it covers the new tokens only).
``"mask"``
    The 4-D attention mask (additive or boolean, as the attention implementation needs), sliced to the
    kept queries and keys; created where the kept tokens have padding; rebuilt over the layer's own
    cache in decoding steps. At a recurrent layer (linear attention, short convolution:
    :mod:`tokenprune.engine.hybrid`) the model passes its 2-D padding mask under the same name: it follows
    as ``"padding_mask"``, and is created (the kept tokens' ``valid``) where they have padding.
``"padding_mask"``
    A 2-D ``(B, L)`` mask (1 = real token), as linear-attention layers take: gathered, zero on padding
    slots; passed on as given in decoding steps (it covers the new tokens only).
``"positions"``
    Position ids (``(B, L)`` or ``(R, B, L)``): gathered, or renumbered under ``compact`` positions.
``"rotary"``
    Rotary tables ``(cos, sin)``: gathered, or recomputed by the adapter under ``compact`` positions.
``"recompute"``
    ``recompute(value, cut)`` returns the argument for the kept tokens (:class:`LayerCut`); in decoding
    steps passed on as given.
``"keep"``
    Passed on as given (not per token).

The engine's table is :data:`DEFAULT_LAYER_ARGS`; an adapter adds or overrides entries with
:meth:`tokenprune.adapters.base.ModelAdapter.layer_args`. An argument in neither is per token by the
generic default when it is a tensor of at least two dimensions whose axis 1 has the language model's
input width and whose axis 0 the batch (or 1): its kept columns are gathered. Positional arguments
after the hidden states are named by the layer's signature and follow the same rules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tokenprune.engine.masks import slice_mask
from tokenprune.engine.sequence import TokenSequence, gather_position_ids, gather_tokens, position_ids_like
from tokenprune.errors import TokenpruneError

Follow = Literal["columns", "mask", "padding_mask", "positions", "rotary", "recompute", "keep"]


@dataclass(frozen=True)
class LayerCut:
    """What a per-token argument needs to follow a cut into the prefill's decoder layer ``layer``.

    Attributes:
        hidden: ``(B, L', D)`` the layer's input (the kept tokens).
        sequence: The kept tokens; ``sequence.lm_column`` ``(B, L')`` are their columns in the language
            model's input (``-1``: a padding slot), ``sequence.valid`` the real ones, ``sequence.positions``
            ``(R, B, L')`` their positions.
        width: ``L``, the language model's input width (the unpruned width of every per-token argument).
        layer: The decoder layer's index.
        compact: The pipeline renumbers positions (``positions: compact``).
        adapter: The model family's adapter.
        all_valid: ``sequence`` has no padding slot (``sequence.valid.all()``), read from the device once per
            sequence by the engine, so that no decoder layer reads it again.
        recurrent: The layer is recurrent (linear attention, short convolution): its ``"mask"`` argument is a
            2-D padding mask (:mod:`tokenprune.engine.hybrid`).
    """

    hidden: Tensor
    sequence: TokenSequence
    width: int
    layer: int
    compact: bool
    adapter: Any
    all_valid: bool = False
    recurrent: bool = False


@dataclass(frozen=True)
class LayerArg:
    """How one argument of a decoder layer follows a cut (see the module docstring for each ``follow``).

    Attributes:
        follow: The rule.
        axis: The token axis for ``"columns"``.
        recompute: For ``"recompute"``: ``recompute(value, cut) -> new value`` (``value`` may be ``None``).
    """

    follow: Follow
    axis: int = 1
    recompute: Callable[[Any, LayerCut], Any] | None = None

    def __post_init__(self) -> None:
        if (self.follow == "recompute") != (self.recompute is not None):
            raise ValueError("LayerArg: a `recompute` function is given exactly when follow='recompute'")


COLUMNS = LayerArg("columns")
KEEP = LayerArg("keep")

DEFAULT_LAYER_ARGS: Mapping[str, LayerArg] = {
    "hidden_states": KEEP,  # the layer's input itself: the engine's hidden rows already
    "attention_mask": LayerArg("mask"),
    "position_embeddings": LayerArg("rotary"),
    "position_ids": LayerArg("positions"),
}

#: Per-token inputs of the language model itself (beside ``inputs_embeds``, the mask and positions) that follow
#: a post_projector cut: ``(B, L, ...)`` gathered along the token axis (Gemma 4's ``per_layer_inputs``).
LM_PER_TOKEN_INPUTS = ("per_layer_inputs", "moe_mm_token_type_ids")


def cut_lm_inputs(kwargs: dict[str, Any], columns: Tensor, width: int) -> None:
    """Gather the language model's per-token inputs of :data:`LM_PER_TOKEN_INPUTS` in ``kwargs`` to ``columns``
    (``(B, L')`` columns of the ``width``-token input, ``-1``: a padding slot, which reads column 0), in place.

    Raises:
        TokenpruneError: such an input is not a ``(B or 1, width, ...)`` tensor.
    """
    for name in LM_PER_TOKEN_INPUTS:
        value = kwargs.get(name)
        if value is None:
            continue
        if not isinstance(value, Tensor) or value.dim() < 2 or int(value.shape[1]) != width:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise TokenpruneError(
                f"the language model's {name} ({shape}) is not a per-token (batch, {width}, ...) tensor; the engine "
                "cannot follow a post_projector cut with it"
            )
        kwargs[name] = gather_tokens(value, columns)


_ABSENT = object()


def layer_args_of(adapter: Any) -> dict[str, LayerArg]:
    """The engine's table with the adapter's entries (:meth:`~ModelAdapter.layer_args`) over it."""
    own = getattr(adapter, "layer_args", None)
    return {**DEFAULT_LAYER_ARGS, **(dict(own()) if callable(own) else {})}


def positional_names(layer: nn.Module) -> tuple[str, ...]:
    """The names of ``layer.forward``'s positional parameters, the hidden states first (none if unknown)."""
    try:
        params = inspect.signature(layer.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a signature: positional arguments pass on as given
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


def cut_prefill_args(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cut: LayerCut,
    table: Mapping[str, LayerArg],
    names: tuple[str, ...] = (),
    *,
    boolean: bool,
    dtype: torch.dtype,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A prefill decoder layer's positional and keyword arguments, following the cut to ``cut.sequence``.

    ``args[0]`` (the hidden states) is left as it is; ``args[i]`` is named ``names[i]``. A declared
    ``"mask"`` or ``"rotary"`` argument absent from the call is still set where the cut needs it (a mask
    for padded kept tokens, rotary tables under ``compact``), as the model's own code would compute it.
    """
    out_args = list(args)
    for i in range(1, len(args)):
        name = names[i] if i < len(names) else None
        value = _follow(table.get(name) if name else None, args[i], cut, boolean, dtype)
        if value is not _ABSENT:
            out_args[i] = value
    given = set(names[: len(args)])
    for name in {**kwargs, **{n: None for n, a in table.items() if a.follow in ("mask", "rotary")}}:
        if name in given:
            continue
        value = _follow(table.get(name), kwargs.get(name), cut, boolean, dtype)
        if value is not _ABSENT:
            kwargs[name] = value
    return tuple(out_args), kwargs


def _follow(arg: LayerArg | None, value: Any, cut: LayerCut, boolean: bool, dtype: torch.dtype) -> Any:
    """``value`` for the kept tokens, or ``_ABSENT`` to leave it as it is."""
    if arg is None:
        arg = COLUMNS if _per_token(value, cut) else KEEP
    seq, cols = cut.sequence, cut.sequence.lm_column
    if arg.follow == "keep":
        return _ABSENT
    if arg.follow == "recompute":
        return arg.recompute(value, cut)  # type: ignore[misc]
    if arg.follow == "mask":
        if value is None and not seq.has_padding_slots and cut.all_valid:
            return _ABSENT
        if cut.recurrent:
            return _padding_mask(value, cut)
        return slice_mask(value, cols, cols, seq.valid, boolean=boolean, dtype=dtype)
    if arg.follow == "rotary":
        if cut.compact:
            return cut.adapter.rotary(cut.hidden, seq.positions, cut.layer)
        return _ABSENT if value is None else tuple(gather_tokens(t, cols) for t in value)
    if arg.follow in ("positions", "padding_mask") and not isinstance(value, Tensor):
        return _ABSENT
    if arg.follow == "positions":
        return position_ids_like(seq.positions, value) if cut.compact else gather_position_ids(value, cols)
    if arg.follow == "padding_mask":
        return _padding_mask(value, cut)
    return _gather(value, cols, arg.axis) if isinstance(value, (Tensor, tuple, list)) else _ABSENT


def _padding_mask(value: Any, cut: LayerCut) -> Tensor:
    """``(B, L')`` the kept tokens' 2-D padding mask (1 = real token): ``value`` gathered (``(B, L)``, the
    model's), or ``cut.sequence.valid`` where the model passed none."""
    valid = cut.sequence.valid
    if not isinstance(value, Tensor):
        return valid.to(torch.long)
    if value.dim() != 2:
        raise TokenpruneError(
            f"decoder layer {cut.layer} is a recurrent layer (linear attention or convolution) but received a "
            f"{value.dim()}-D attention mask; tokenprune passes such layers a 2-D (batch, length) padding mask"
        )
    return gather_tokens(value, cut.sequence.lm_column) * valid.to(value.dtype)


def _per_token(value: Any, cut: LayerCut) -> bool:
    """The generic default: a tensor of the batch (or 1) by the language model's input width."""
    return (
        isinstance(value, Tensor)
        and value.dim() >= 2
        and int(value.shape[1]) == cut.width
        and int(value.shape[0]) in (1, int(cut.hidden.shape[0]))
    )


def _gather(value: Any, cols: Tensor, axis: int) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(v, cols, axis) for v in value)
    moved = value.movedim(axis, 1)
    return gather_tokens(moved, cols).movedim(1, axis)
