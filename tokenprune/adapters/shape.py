"""Which models the generic adapter serves: the standard transformers-5 VLM shape, checked by feature.

A model has the standard shape when (every check reads a method, an attribute or a signature, never a
list of names):

* the top-level model holds the multimodal base model as ``.model``, which has ``get_image_features``
  and a language model (``language_model``, else ``text_model`` as Idefics2 names it) with a ``layers``
  ``ModuleList``; or the top-level model is itself the base model, with ``get_image_features``, and its
  ``.model`` the decoder stack (:func:`base_model_of`: the omni thinkers before transformers 5.21);
* the image features replace placeholder tokens of one sequence (no cross-attention to them, no
  encoder-decoder, no discrete image codes embedded with the text table);
* every decoder layer is a softmax self-attention layer (``self_attn``) or a recurrent layer the engine
  cuts through (Gated DeltaNet ``linear_attn``, short convolution ``conv``: :data:`RECURRENT_LAYERS`),
  called with ``hidden_states``, ``attention_mask`` and ``position_embeddings`` and no other per-token
  input than token types (``*token_type_ids``, ``(B, L)``) and per-layer embeddings (``per_layer_input``),
  which the engine's layer-argument seam (:mod:`tokenprune.engine.layer_args`) gathers with the kept
  tokens, and no layer shares another layer's keys and values;
* the language model takes no visual features of its own, or exactly Qwen3-VL's DeepStack residuals
  (``visual_pos_masks``, ``deepstack_visual_embeds`` and a ``_deepstack_process`` method: served by
  :class:`~tokenprune.adapters.generic.GenericDeepStackAdapter`), and has a rotary embedding module
  ``rotary_emb``.

:func:`refusal` returns the first check a model fails, as a reason for
:class:`~tokenprune.errors.UnsupportedModelError`; ``None`` means the generic adapter serves it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

#: Decoder-layer arguments the engine knows: it slices the per-token ones at a cut and passes the others.
LAYER_ARGUMENTS = frozenset(
    {
        "hidden_states",
        "attention_mask",
        "position_embeddings",
        "position_ids",
        "past_key_values",
        "past_key_value",
        "cache",
        "cache_position",
        "use_cache",
        "kwargs",
        "per_layer_input",  # Gemma 4's per-layer embeddings: per token, gathered at a cut
        "shared_kv_states",  # Gemma 4's KV-sharing storage: unused where no layer shares (see _shared_layers)
    }
)
#: Language-model inputs the engine gathers to the kept tokens after post_projector stages (per token, axis 1).
LM_PER_TOKEN_INPUTS = frozenset({"per_layer_inputs"})
#: How the names of per-token ``(B, L)`` decoder-layer arguments end that the engine's generic layer-argument
#: default gathers correctly at a cut (ERNIE-4.5-VL's ``moe_mm_token_type_ids`` route its MoE experts).
PER_TOKEN_SUFFIXES = ("token_type_ids",)
#: Attention types whose layers attend with softmax over a KV cache (the engine's masks and probes fit them).
SOFTMAX_ATTENTION = frozenset({"full_attention", "sliding_attention", "chunked_attention", None})
#: Layer types with a 2-D padding mask and a fixed-size state of their own, which the engine cuts through
#: (:mod:`tokenprune.engine.hybrid`): Gated DeltaNet linear attention, gated short convolution.
RECURRENT_LAYERS = frozenset({"linear_attention", "conv"})
#: Their mixer modules, by layer type.
RECURRENT_MODULES = {"linear_attention": "linear_attn", "conv": "conv"}
#: Layer types the engine refuses, with the reason.
REFUSED_LAYERS = {
    "indexed_attention": "indexed (sparse) attention: an indexer keeps a key cache of its own and picks the "
    "top-k keys per query, the indices threaded from layer to layer (prev_topk_indices); the engine does not cut "
    "that cache nor those indices",
    "hybrid_sliding": "layers that run sliding-window attention and linear attention side by side, with block "
    "states and relative-distance inputs the engine does not cut",
    "reference_sliding_attention": "reference sliding-window attention: its cache keeps the whole prefill plus a "
    "window of the latest decoded tokens, evicting decoded tokens as it goes; the engine does not rebuild that "
    "mask over a pruned prefill",
    "hybrid": "layers that run full attention and linear attention side by side in one cache layer",
}


def _call_parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _extra_arguments(params: dict[str, inspect.Parameter]) -> list[str]:
    """Arguments beyond :data:`LAYER_ARGUMENTS`, less flags (``output_*``, ``use_*``, ``return_*``)."""
    flags = ("output_", "use_", "return_")
    return [
        name
        for name, p in params.items()
        if name not in LAYER_ARGUMENTS
        and not name.startswith(flags)
        and not name.endswith(PER_TOKEN_SUFFIXES)
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    ]


def text_config(language_model: nn.Module) -> Any:
    """The language model's config (``None`` where it has none)."""
    return getattr(language_model, "config", None)


def _decoder_stack(module: nn.Module) -> bool:
    return isinstance(getattr(module, "layers", None), nn.ModuleList)


def base_model_of(model: nn.Module) -> nn.Module | None:
    """The multimodal base model, which receives ``input_ids`` and calls ``get_image_features``: ``.model``, or
    the top-level model itself where ``.model`` is its decoder stack (``layers``, no ``get_image_features``) and
    the top-level model has ``get_image_features`` (Qwen2.5-Omni's and Qwen3-Omni's thinkers before transformers
    5.21); ``None`` where there is no ``.model``."""
    vlm = getattr(model, "model", None)
    if not isinstance(vlm, nn.Module):
        return None
    features = "get_image_features"
    if _decoder_stack(vlm) and not callable(getattr(vlm, features, None)) and callable(getattr(model, features, None)):
        return model
    return vlm


def _no_base_model(model: nn.Module) -> str | None:
    if base_model_of(model) is not None:
        return None
    return (
        f"the top-level model {type(model).__name__} holds no multimodal base model as `.model` (the image "
        "features and the language model live elsewhere); it needs a dedicated adapter"
    )


def language_model_of(vlm: nn.Module | None) -> nn.Module | None:
    """The base model's decoder stack: ``language_model``, else ``text_model`` holding ``layers`` (Idefics2), else
    ``model`` holding ``layers`` where the base model is a top-level model (see :func:`base_model_of`)."""
    lm = getattr(vlm, "language_model", None)
    if isinstance(lm, nn.Module):
        return lm
    text = getattr(vlm, "text_model", None)
    if isinstance(text, nn.Module) and _decoder_stack(text):
        return text
    inner = getattr(vlm, "model", None)
    if isinstance(inner, nn.Module) and vlm is not None and base_model_of(vlm) is vlm:
        return inner
    return None


def _encoder_decoder(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    lm = language_model_of(base_model_of(model))
    subs = [getattr(cfg, "text_config", None), getattr(cfg, "decoder", None)]
    flagged = getattr(cfg, "is_encoder_decoder", False) or any(getattr(c, "is_encoder_decoder", False) for c in subs)
    if flagged or (hasattr(lm, "encoder") and hasattr(lm, "decoder")):
        return "it is an encoder-decoder model: the image features go into an encoder, not the decoder's sequence"
    return None


def _cross_attention(model: nn.Module) -> str | None:
    lm = language_model_of(base_model_of(model))
    scope = lm if isinstance(lm, nn.Module) else model
    skip = ("vision", "visual", "projector", "resampler", "perceiver", "connector", "audio", "qformer")
    for name, _ in scope.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if ("cross_attn" in leaf or "cross_attention" in leaf) and not any(w in name.lower() for w in skip):
            return (
                f"its language model cross-attends to the image features ({name}); there are no visual tokens to prune"
            )
    return None


def _no_image_features(model: nn.Module) -> str | None:
    vlm = base_model_of(model)
    if not callable(getattr(vlm, "get_image_features", None)):
        towers = [n for n, _ in model.named_modules() if any(w in n.rsplit(".", 1)[-1] for w in ("vision", "visual"))]
        if not towers:
            return (
                f"{type(vlm).__name__} has no get_image_features method and {type(model).__name__} no vision tower: "
                "it takes no images (transformers maps it as image-text-to-text), so there are no visual tokens"
            )
        return f"{type(vlm).__name__} has no get_image_features method"
    if callable(getattr(vlm, "get_image_tokens", None)):
        return (
            "it embeds discrete image codes (a VQ tokenizer's ids) with the text embedding table; tokenprune prunes "
            "continuous image features"
        )
    return None


def _no_decoder_stack(model: nn.Module) -> str | None:
    vlm = base_model_of(model)
    lm = language_model_of(vlm)
    if not isinstance(lm, nn.Module):
        named = [n for n in ("text_model", "decoder") if isinstance(getattr(vlm, n, None), nn.Module)]
        where = f" (it has `{named[0]}`)" if named else ""
        return f"{type(vlm).__name__} has no `language_model` submodule{where}; it needs a dedicated adapter"
    if not isinstance(getattr(lm, "layers", None), nn.ModuleList):
        return f"its language model {type(lm).__name__} keeps no decoder layers as `.layers`"
    return None


def _language_model(model: nn.Module) -> nn.Module:
    return language_model_of(base_model_of(model))  # type: ignore[return-value]


def _hybrid_layers(model: nn.Module) -> str | None:
    lm = _language_model(model)
    layers = list(lm.layers)
    types = list(getattr(text_config(lm), "layer_types", None) or [])
    served = SOFTMAX_ATTENTION | RECURRENT_LAYERS
    odd = sorted({t for t in types if t not in served})
    if odd:
        where = [i for i, t in enumerate(types) if t in odd]
        why = "; ".join(f"{t}: {REFUSED_LAYERS[t]}" for t in odd if t in REFUSED_LAYERS)
        return (
            f"its language model has layers the engine does not serve ({', '.join(odd)}, at layers {_short(where)})"
            + (f": {why}" if why else ": a layer kind whose cache and inputs the engine does not know how to cut")
        )
    no_mixer = [i for i, layer in enumerate(layers) if not _has_mixer(layer, types[i] if i < len(types) else None)]
    if no_mixer:
        return (
            f"its language model has layers the engine does not serve (no self_attn module, nor the linear_attn or "
            f"conv module its layer type names, at layers {_short(no_mixer)}): state-space and other layers keep "
            "caches or inputs of their own that the engine does not cut"
        )
    return None


def _has_mixer(layer: nn.Module, kind: str | None) -> bool:
    """The layer has the token mixer its kind needs (``self_attn``; ``linear_attn`` or ``conv`` for recurrent kinds)."""
    name = RECURRENT_MODULES.get(kind or "", "self_attn")
    return isinstance(getattr(layer, name, None), nn.Module)


def _layer_contract(model: nn.Module) -> str | None:
    layer = _language_model(model).layers[0]
    params = _call_parameters(layer)
    missing = [n for n in ("hidden_states", "attention_mask", "position_embeddings") if n not in params]
    if missing:
        return (
            f"its decoder layers ({type(layer).__name__}) take no {', '.join(missing)} argument: the engine cuts "
            "tokens through those arguments"
        )
    extra = _extra_arguments(params)
    if extra:
        return (
            f"its decoder layers ({type(layer).__name__}) take {', '.join(extra)}: inputs the engine does not cut "
            "with the tokens (per-layer embeddings, index threading, block states)"
        )
    return None


def _altup(model: nn.Module) -> str | None:
    n = getattr(text_config(_language_model(model)), "altup_num_inputs", None)
    if isinstance(n, int) and n > 1:
        return (
            f"its decoder layers carry AltUp's {n} predictions of every token (hidden states of shape ({n}, B, L, D): "
            "Gemma 3n), which the engine does not cut: it gathers (B, L, D) hidden states, and AltUp's predict and "
            "correct steps would need following"
        )
    return None


def _shared_layers(model: nn.Module) -> str | None:
    cfg = text_config(_language_model(model))
    shared, layers = getattr(cfg, "num_kv_shared_layers", None), getattr(cfg, "num_hidden_layers", None)
    if isinstance(shared, int) and isinstance(layers, int) and 0 < layers <= shared:
        return (
            f"every layer of its language model reuses keys and values (num_kv_shared_layers={shared} of "
            f"{layers} layers): they come from another model (a Gemma 4 assistant drafting for its target), which "
            "the engine does not cut"
        )
    for key in ("hc_mult", "hc_count", "num_hyper_connections"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 1:
            return f"its language model uses hyper-connections ({key}={value}); the engine cannot cut tokens there"
    return None


#: The language-model arguments of Qwen3-VL's DeepStack: ``deepstack_visual_embeds[j]`` is added at the
#: ``visual_pos_masks`` positions after decoder layer ``j`` by the language model's ``_deepstack_process``.
DEEPSTACK_ARGUMENTS = frozenset({"visual_pos_masks", "deepstack_visual_embeds"})


def takes_deepstack(language_model: nn.Module) -> bool:
    """The language model takes exactly Qwen3-VL's DeepStack arguments and has its ``_deepstack_process``."""
    params = _call_parameters(language_model)
    visual = {n for n in params if any(w in n for w in ("deepstack", "visual", "vision", "per_layer"))}
    return visual == DEEPSTACK_ARGUMENTS and callable(getattr(language_model, "_deepstack_process", None))


def _visual_residuals(model: nn.Module) -> str | None:
    lm = _language_model(model)
    params = _call_parameters(lm)
    words = ("deepstack", "visual", "vision", "per_layer")
    visual = [n for n in params if any(w in n for w in words) and n not in LM_PER_TOKEN_INPUTS]
    if visual and not takes_deepstack(lm):
        return (
            f"its language model takes {', '.join(visual)}: features added inside the decoder stack "
            "(DeepStack-like residuals or per-layer embeddings) need a dedicated adapter"
        )
    return None


def _no_rotary(model: nn.Module) -> str | None:
    lm = _language_model(model)
    if not isinstance(getattr(lm, "rotary_emb", None), nn.Module):
        return f"its language model {type(lm).__name__} has no rotary embedding module `rotary_emb`"
    return None


CHECKS: tuple[Callable[[nn.Module], str | None], ...] = (
    _encoder_decoder,
    _no_base_model,
    _cross_attention,
    _no_image_features,
    _no_decoder_stack,
    _hybrid_layers,
    _altup,
    _shared_layers,
    _layer_contract,
    _visual_residuals,
    _no_rotary,
)
"""The checks of :func:`refusal`, in order: each returns a reason or ``None``."""


def refusal(model: nn.Module) -> str | None:
    """Why the generic adapter cannot serve ``model`` (the first failed check of :data:`CHECKS`), or ``None``."""
    for check in CHECKS:
        reason = check(model)
        if reason is not None:
            return reason
    return None


def _short(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:8]))
    return shown + (", ..." if len(indices) > 8 else "")
