"""The engine's refusals: what would otherwise run unpruned, or fail deep inside transformers."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from torch import nn

from tokenprune.engine import compat
from tokenprune.engine.stage import StagePlan
from tokenprune.errors import PipelineError, ReducerInputError, TokenpruneError


def check_layers_exist(layer_plans: Mapping[int, Sequence[StagePlan]], num_layers: int) -> None:
    """Refuse a ``layer: k`` stage the model has no layer for.

    Raises:
        PipelineError: naming the stage and the valid range.
    """
    for k, plans in layer_plans.items():
        if k >= num_layers:
            p = plans[0]
            raise PipelineError(
                f"stage {p.index} ({p.stage.reducer!r}) runs at layer {k}, but this model's language model has "
                f"{num_layers} decoder layers; use a layer between 1 and {num_layers - 1}"
            )


def bind_stages(plans: Sequence[StagePlan], model: nn.Module) -> None:
    """Let each stage's reducer check the model (:meth:`~tokenprune.TokenReducer.bind`) before any hook exists.

    Raises:
        ReducerInputError: the reducer's refusal, prefixed with its stage.
    """
    for p in plans:
        try:
            p.reducer.bind(model, p.stage.point)
        except ReducerInputError as exc:
            raise ReducerInputError(f"stage {p.index} ({p.stage.reducer!r} at {p.stage.point}): {exc}") from exc


def check_attention_implementation(impl: str | None) -> None:
    """Refuse a language model whose attention the engine cannot mask and probe.

    Raises:
        TokenpruneError: naming the implementation and the fix.
    """
    if impl not in ("sdpa", "eager"):
        raise TokenpruneError(
            f"tokenprune supports the 'sdpa' and 'eager' attention implementations, but the language model uses "
            f"{impl!r}; load the model with attn_implementation='sdpa'"
        )


def refuse_embeds_without_ids(kwargs: Mapping[str, Any], adapter_name: str) -> None:
    """Refuse a prefill given images and ``inputs_embeds`` but no ``input_ids`` (its visual tokens cannot be found).

    Raises:
        TokenpruneError: saying to pass ``input_ids``.
    """
    images = [name for name in ("pixel_values", "pixel_values_videos") if kwargs.get(name) is not None]
    if images:
        raise TokenpruneError(
            f"{adapter_name}: the model was called with inputs_embeds and {images[0]} but no input_ids; "
            "tokenprune finds the visual tokens by their placeholder ids, so this prefill would run unpruned. "
            "Pass input_ids (as the processor returns them) instead of inputs_embeds"
        )


def check_every_stage_ran(plans: Sequence[StagePlan], ran: Collection[int], model_type: str) -> None:
    """After a prefill with visual tokens: every stage ran (else the output would be unpruned).

    Raises:
        TokenpruneError: naming the first stage that did not run, the model type and the transformers release.
    """
    missed = [p for p in plans if p.index not in ran]
    if missed:
        p = missed[0]
        raise TokenpruneError(
            f"stage {p.index} ({p.stage.reducer!r} at {p.stage.point}) did not run on a prefill with visual "
            f"tokens ({model_type}, transformers {compat.transformers_version()}): the hook it needs was not called, "
            "so the output would be unpruned. This transformers release may have changed how the model calls its "
            "language model (see 'Compatibility' in docs/engine.md)"
        )


def check_own_attention_layers(own: Mapping[int, Collection[str]], layers: Sequence[nn.Module]) -> None:
    """Refuse an own-attention stage at ``layer: k`` whose layer ``k`` masks differently from layer ``k - 1``.

    The engine serves layer ``k``'s own attention with the mask and rotary tables that layer ``k - 1``
    received, which are layer ``k``'s only when both layers have the same attention type.

    Raises:
        PipelineError: naming the layer and both attention types.
    """
    for k in own:
        before, here = compat.layer_attention_type(layers[k - 1]), compat.layer_attention_type(layers[k])
        if before != here:
            raise PipelineError(
                f"a stage at layer {k} reads layer {k}'s own attention, but layer {k} uses {here} and layer {k - 1} "
                f"{before}; move the stage to a layer whose attention type matches the layer before it"
            )


def check_decode_layer(k: int, layers: Sequence[nn.Module]) -> None:
    """Refuse a ``decode: k`` stage whose signal layer ``k - 1`` has sliding-window attention.

    Its cache holds only the last keys of its window, so the visual tokens before it would have no
    attention and no keys to rank by.

    Raises:
        PipelineError: naming the layer and the layers a decode stage may use.
    """
    if compat.layer_attention_type(layers[k - 1]) != "sliding_attention":
        return
    usable = [i + 1 for i in range(len(layers) - 1) if compat.layer_attention_type(layers[i]) != "sliding_attention"]
    raise PipelineError(
        f"a decode stage at layer {k} reads layer {k - 1}'s attention, but layer {k - 1} uses sliding-window attention "
        f"(its cache holds only the last keys of its window); use a layer right after a full-attention layer: "
        f"{', '.join(map(str, usable)) or 'none in this model'}"
    )
