"""Every assumption tokenprune makes about transformers' internals, in one place.

The engine hooks stock models instead of forking them, so it depends on a few things that
transformers does not promise to keep: argument names of the models' ``forward``, the cache and
output classes, the attention and mask function registries, where decoder layers keep their
attention module. Each assumption lives here as one small function, detected by feature (a
signature, an attribute) rather than by version number, with the releases it was verified on.
When a transformers release breaks one, this module is the one file to change (the steps are in
``docs/engine.md``, "Compatibility").

Verified on transformers 5.18.0 to 5.25.0 (the declared range, :data:`SUPPORTED`, less :data:`EXCLUDED`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from types import ModuleType
from typing import Any

import transformers
from packaging.version import Version
from torch import Tensor, nn

from tokenprune.errors import TokenpruneError, UnsupportedTransformersError

#: The transformers releases tokenprune is tested on: ``(floor, first untested)``. Keep it equal to
#: the range in ``pyproject.toml`` and to ``scripts/transformers-matrix.txt``'s ends.
SUPPORTED: tuple[str, str] = ("5.18.0", "5.26.0")
#: Minors inside :data:`SUPPORTED` that are refused all the same, with the reason.
EXCLUDED: dict[str, str] = {
    "5.20": "its stock SmolVLM merge reshapes image features by the vision patch size instead of the "
    "image's token count (an unpruned generate fails on the test models)",
}
#: Set to ``1`` to turn the refusal of an unsupported transformers release into a warning.
OVERRIDE_VARIABLE = "TOKENPRUNE_ALLOW_UNSUPPORTED_TRANSFORMERS"


def transformers_version() -> str:
    """The installed transformers release, e.g. ``"5.24.0"``."""
    return str(transformers.__version__)


def supported_range() -> str:
    """The declared range as a requirement specifier, e.g. ``">=5.18.0,!=5.20.*,<5.26.0"``."""
    floor, ceiling = SUPPORTED
    excluded = "".join(f",!={minor}.*" for minor in EXCLUDED)
    return f">={floor}{excluded},<{ceiling}"


def is_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) lies in :data:`SUPPORTED` and not in :data:`EXCLUDED`."""
    v = Version(version or transformers_version())
    floor, ceiling = (Version(s) for s in SUPPORTED)
    return floor <= v < ceiling and f"{v.major}.{v.minor}" not in EXCLUDED


def check_transformers_version() -> None:
    """Refuse an installed transformers outside :data:`SUPPORTED` (a warning with the override set).

    Raises:
        UnsupportedTransformersError: the release is outside the range and
            ``TOKENPRUNE_ALLOW_UNSUPPORTED_TRANSFORMERS`` is not ``1``.
    """
    if is_supported():
        return
    v = Version(transformers_version())
    why = EXCLUDED.get(f"{v.major}.{v.minor}")
    message = (
        f"tokenprune is tested on transformers {supported_range()}, but transformers {transformers_version()} is "
        f"installed{f' ({why})' if why else ''}; install a release in that range "
        f"(pip install 'transformers{supported_range()}'), or set "
        f"{OVERRIDE_VARIABLE}=1 to run anyway (the engine then checks every prefill and decoding step it cannot "
        "recognise, but results on an untested release are not guaranteed)"
    )
    if os.environ.get(OVERRIDE_VARIABLE, "").strip() == "1":
        warnings.warn(message, UserWarning, stacklevel=3)
        return
    raise UnsupportedTransformersError(message)


# --- forward arguments ---------------------------------------------------------------------------

#: Names a model's ``forward`` takes its KV cache under: ``past_key_values`` (5.18 to 5.23), ``cache``
#: (5.24 and 5.25, which still accept the old name with a FutureWarning).
CACHE_ARGUMENTS: tuple[str, ...] = ("cache", "past_key_values")


def cache_argument_name(forward: Callable[..., Any]) -> str:
    """The name under which ``forward`` receives the KV cache, read from its signature.

    Raises:
        TokenpruneError: the signature has none of :data:`CACHE_ARGUMENTS`.
    """
    params = inspect.signature(forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    raise TokenpruneError(
        f"{getattr(forward, '__qualname__', forward)!r} takes no KV cache argument (looked for "
        f"{', '.join(CACHE_ARGUMENTS)}) on transformers {transformers_version()}; tokenprune cannot tell prefill "
        "from decoding on this release (see 'Compatibility' in docs/engine.md)"
    )


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache among a forward call's keyword arguments, under either name (or ``None``)."""
    for name in CACHE_ARGUMENTS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def cache_length(cache: Any) -> int:
    """Tokens already in ``cache``: the first attention layer's length (a layer with ``keys``; layer 0 where
    none is known), ``0`` for ``None``.

    A hybrid model's linear-attention and convolution cache layers (transformers'
    ``LinearAttentionCacheLayerMixin``, 5.22+) count the tokens they consumed as a device tensor; an attention
    layer's length is the length of its keys, as the engine's decoding masks need.

    Raises:
        TokenpruneError: ``cache`` is not a transformers ``Cache`` (no ``get_seq_length``).
    """
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if not callable(length):
        raise TokenpruneError(
            f"unrecognised KV cache of type {type(cache).__name__} on transformers {transformers_version()}: "
            "tokenprune reads transformers Cache objects (DynamicCache, ...) with get_seq_length()"
        )
    layers = getattr(cache, "layers", None)
    first = next((i for i, layer in enumerate(layers or ()) if hasattr(layer, "keys")), 0)
    return int(length(first) if first else length())


def output_cache(output: Any) -> Any:
    """The KV cache a model or ``generate`` output carries (``cache`` from 5.24, ``past_key_values`` before)."""
    for name in CACHE_ARGUMENTS:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def cache_layers(cache: Any) -> list[tuple[Tensor | None, Tensor | None]]:
    """Each layer's cached ``(keys, values)``, ``(B, H_kv, L, hd)`` each (``None`` where a layer holds none).

    Raises:
        TypeError: ``cache`` is not a transformers cache with per-layer storage (``.layers``).
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} is not a transformers cache with .layers")
    out = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        out.append((keys if isinstance(keys, Tensor) else None, values if isinstance(values, Tensor) else None))
    return out


# --- modules --------------------------------------------------------------------------------------


def attention_module(layer: nn.Module) -> nn.Module | None:
    """The attention module of a decoder layer (``self_attn`` in every supported family)."""
    attn = getattr(layer, "self_attn", None)
    return attn if isinstance(attn, nn.Module) else None


def vision_attention_module(layer: nn.Module) -> nn.Module | None:
    """The attention module of a vision-encoder layer (``self_attn`` in CLIP, SigLIP and Idefics3; ``attn`` in
    Qwen2-VL's and Qwen3-VL's blocks; ``attention`` in InternVL's InternViT layers)."""
    for name in ("self_attn", "attn", "attention"):
        attn = getattr(layer, name, None)
        if isinstance(attn, nn.Module):
            return attn
    return None


def vision_window_index(visual: nn.Module, grid_thw: Tensor) -> Tensor:
    """Qwen2.5-VL: the window order of each image's merge units (``get_vision_window_index`` of
    ``transformers.vision_utils`` on 5.18-5.25): unit ``i`` of the window order is unit ``index[i]`` of the
    image order."""
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    return index


def flat_video_frames(positions: Any, frames: Any) -> tuple[Any, Any]:
    """Gemma 4's video arguments in the flat form of transformers 5.21+.

    Args:
        positions: ``video_position_ids``: ``(F_total, P, 2)`` (5.21+) or ``(V, F, P, 2)``, every video of the
            batch stacked with the same frame count (5.18, whose ``get_video_features`` takes no
            ``num_frames_per_video``).
        frames: ``num_frames_per_video`` ``(V,)``, or ``None`` where the call had none.

    Returns:
        ``(positions, frames)``: ``(F_total, P, 2)`` and the per-video frame counts; the stacked form flattened
        with ``F`` frames per video; anything else unchanged.
    """
    if frames is None and isinstance(positions, Tensor) and positions.dim() == 4 and positions.shape[-1] == 2:
        return positions.flatten(0, 1), [int(positions.shape[1])] * int(positions.shape[0])
    return positions, frames


def input_norm(layer: nn.Module) -> nn.Module:
    """The norm a decoder layer applies to its input before attention (``input_layernorm``).

    Raises:
        TokenpruneError: the layer has none (a family this engine does not know).
    """
    return _norm(layer, "input_layernorm", "a stage that reads a layer's own attention")


def final_norm(language_model: nn.Module) -> nn.Module:
    """The language model's final norm, applied after the last decoder layer (``norm``).

    Raises:
        TokenpruneError: the language model has none.
    """
    return _norm(language_model, "norm", "a stage that reads the final norm")


def _norm(module: nn.Module, name: str, needed_by: str) -> nn.Module:
    norm = getattr(module, name, None)
    if not isinstance(norm, nn.Module):
        raise TokenpruneError(
            f"{type(module).__name__} has no {name!r} module; {needed_by} cannot run on this model family"
        )
    return norm


def layer_attention_type(layer: nn.Module) -> str | None:
    """A decoder layer's attention type (``full_attention``, ``sliding_attention``), where the family has one.

    Read from the layer's ``attention_type`` where it has one, else from its attention module: transformers
    sets ``sliding_window`` (or ``is_sliding``) there on the sliding layers only (Gemma3 5.x).
    """
    value = getattr(layer, "attention_type", None)
    if isinstance(value, str):
        return value
    attn = attention_module(layer)
    if attn is None:
        return None
    if getattr(attn, "is_sliding", False) or getattr(attn, "sliding_window", None):
        return "sliding_attention"
    return "full_attention" if hasattr(attn, "sliding_window") or hasattr(attn, "is_sliding") else None


def dry_attention_kwargs(layer_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What a decoder layer passes to its attention module (every keyword argument but its input), without the
    cache: a dry call must neither read nor write it."""
    drop = {"hidden_states", "cache", "past_key_values", "past_key_value"}
    kw = {k: v for k, v in layer_kwargs.items() if k not in drop}
    kw["use_cache"] = False
    return kw


class _RowsOnly(nn.Module):
    """Stands in for a projection during a dry call: computes only the last ``rows`` rows (the others are 0);
    ``rows = 0``: none (a value projection whose output is never used)."""

    def __init__(self, proj: nn.Module, rows: int, width: int) -> None:
        super().__init__()
        self.proj, self.rows, self.width = proj, rows, width

    def forward(self, x: Tensor) -> Tensor:
        if self.rows == 0:
            return x.new_zeros(()).expand(*x.shape[:-1], self.width)
        out = x.new_zeros(*x.shape[:-1], self.width)
        out[..., -self.rows :, :] = self.proj(x[..., -self.rows :, :])
        return out


@contextlib.contextmanager
def lean_projections(attn: nn.Module, query_rows: int | None) -> Iterator[None]:
    """During a dry call of ``attn``: skip its value projection, and compute its query projection only for the
    last ``query_rows`` rows (``None``: all). Families without separate ``q_proj``/``v_proj`` run unchanged."""
    q, v = getattr(attn, "q_proj", None), getattr(attn, "v_proj", None)
    if not isinstance(q, nn.Linear) or not isinstance(v, nn.Linear):
        yield
        return
    attn.v_proj = _RowsOnly(v, 0, v.out_features)
    if query_rows is not None:
        attn.q_proj = _RowsOnly(q, query_rows, q.out_features)
    try:
        yield
    finally:
        attn.q_proj, attn.v_proj = q, v


def rotary_embedding_names(module: nn.Module) -> list[str]:
    """Paths of the rotary-embedding modules under ``module`` (those with an ``inv_freq`` buffer).

    They compute the ``(cos, sin)`` tables once per forward; transformers 5.18 does it with a matmul
    that FLOP counters see, later releases with an elementwise product they do not.
    """
    return [name for name, sub in module.named_modules() if isinstance(getattr(sub, "inv_freq", None), Tensor)]


def image_processor_class(family: str) -> type:
    """The torchvision-free image processor of a family, e.g. ``"LlavaNext"`` -> ``LlavaNextImageProcessorPil``.

    Raises:
        TokenpruneError: this transformers release has no such class.
    """
    name = f"{family}ImageProcessorPil"
    cls = getattr(transformers, name, None)
    if cls is None:
        raise TokenpruneError(f"transformers {transformers_version()} has no {name} (needed without torchvision)")
    return cls


# --- attention implementations ------------------------------------------------------------------


def attention_implementation(config: Any) -> str | None:
    """The attention implementation a (text) config selects: ``"sdpa"``, ``"eager"``, ..."""
    return getattr(config, "_attn_implementation", None)


def swap_attention_implementation(config: Any, name: str) -> Any:
    """Point ``config`` at the registered implementation ``name``; returns the value to restore."""
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = name
    return previous


def restore_attention_implementation(config: Any, previous: Any) -> None:
    """Undo :func:`swap_attention_implementation`."""
    config._attn_implementation_internal = previous


def register_attention(name: str, impl: str, function: Callable[..., Any]) -> None:
    """Register ``function`` as attention implementation ``name``, with ``impl``'s mask function.

    Without a registered mask function transformers builds no mask for an unknown implementation,
    and padding would be silently ignored.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask if impl == "sdpa" else eager_mask)


_ACQUIRED: dict[str, int] = {}


def acquire_attention(name: str, impl: str, function: Callable[..., Any]) -> None:
    """:func:`register_attention` for one more user: registered by the first, kept until the last releases it."""
    if _ACQUIRED.get(name, 0) == 0:
        register_attention(name, impl, function)
    _ACQUIRED[name] = _ACQUIRED.get(name, 0) + 1


def release_probe(
    configs: list[tuple[Any, Any]], targets: MutableMapping[Any, Any], owner: object, name: str | None
) -> None:
    """A probe's teardown: restore the ``configs`` it switched, drop its ``targets`` (``module -> (owner, i)``),
    and release its attention function ``name`` (:func:`release_attention`; ``None``: never acquired)."""
    for cfg, value in configs:
        restore_attention_implementation(cfg, value)
    configs.clear()
    for module in [m for m, (p, _) in list(targets.items()) if p is owner]:
        del targets[module]
    if name is not None:
        release_attention(name)


def release_attention(name: str) -> None:
    """One user of :func:`acquire_attention` is done; the last one unregisters the function."""
    _ACQUIRED[name] -= 1
    if _ACQUIRED[name] == 0:
        del _ACQUIRED[name]
        unregister_attention(name)


def attention_users() -> dict[str, int]:
    """The attention functions tokenprune has registered, with their user counts (empty when none is)."""
    return dict(_ACQUIRED)


def common_implementation(configs: Iterable[Any], supported: tuple[str, ...], who: str) -> tuple[list[Any], str]:
    """The distinct ``configs`` and the one attention implementation they share.

    Raises:
        TokenpruneError: they use several, or one outside ``supported`` (``who`` names what needs it).
    """
    distinct: list[Any] = []
    for cfg in configs:
        if cfg is not None and all(cfg is not c for c in distinct):
            distinct.append(cfg)
    impls = {attention_implementation(c) for c in distinct}
    if len(impls) != 1 or (impl := next(iter(impls))) not in supported:
        raise TokenpruneError(
            f"{who} supports the attention implementations {', '.join(supported)}, but the model uses "
            f"{sorted(map(str, impls))}; load it with attn_implementation='sdpa'"
        )
    return distinct, impl


def unregister_attention(name: str) -> None:
    """Remove what :func:`register_attention` registered (transformers has no public way)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)
    ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


def sdpa_module() -> ModuleType:
    """The module that defines transformers' stock ``sdpa_attention_forward`` (read at every call)."""
    import transformers.integrations.sdpa_attention as module

    return module


def stock_attention(impl: str, module: nn.Module) -> Callable[..., Any]:
    """The function the model would call for ``impl``: transformers' sdpa, or the modeling file's eager one."""
    if impl == "sdpa":
        return sdpa_module().sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise TokenpruneError(
            f"{type(module).__module__} defines no eager_attention_forward on transformers {transformers_version()}"
        )
    return eager


# --- the model census ------------------------------------------------------------------------------


def image_text_to_text_types() -> list[str]:
    """The ``model_type`` values of transformers' image-text-to-text auto mapping, sorted (5.18-5.25)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def image_text_to_text_class(model_type: str) -> type:
    """The model class the image-text-to-text auto mapping names for ``model_type`` (a class some releases map
    by name only, without a config entry: Evolla)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])


def processor_class_name(model_type: str) -> str | None:
    """The processor class name transformers' processor auto mapping gives ``model_type`` (``None``: none)."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES.get(model_type)


def tokenizer_class_name(model_type: str) -> str | None:
    """The tokenizer class name transformers' tokenizer auto mapping gives ``model_type`` (``None``: none)."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    name = TOKENIZER_MAPPING_NAMES.get(model_type)
    if isinstance(name, tuple):  # (slow, fast) in some releases
        name = name[-1] or name[0]
    return name


def config_class(model_type: str) -> type:
    """The config class of ``model_type`` (``CONFIG_MAPPING``)."""
    return transformers.CONFIG_MAPPING[model_type]


def model_from_config(config: Any, attention: str = "sdpa") -> nn.Module:
    """The image-text-to-text model of ``config`` with random weights, on ``attention``."""
    return transformers.AutoModelForImageTextToText.from_config(config, attn_implementation=attention)
