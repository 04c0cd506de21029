"""Tiny random models of any image-text-to-text model type, from its config class (for the model census).

:func:`tiny_config` shrinks the type's default config (every text and vision sub-config, at any depth: text
hidden 64, 4 layers; vision hidden 32, 2 layers, images of :data:`PATCHES_PER_SIDE` patches a side; a
512-token vocabulary with the special ids moved inside it; per-layer lists, ``per_layer_config`` and
``mrope_section`` fitted to the new sizes); :func:`build_tiny` builds it, first on the meta device so that a
config the shrinking does not reach is never allocated.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sys
from typing import Any

import torch
from torch import nn

from tokenprune.engine import compat

#: Sizes every tiny text config gets (keys the config does not have are skipped).
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_num_experts": 4,
    "moe_k": 2,
    "moe_num_shared_experts": 1,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_group": 1,
    "topk_group": 1,
    "sliding_window": 1024,
    "out_hidden_size": 64,
    "hidden_size_per_layer_input": 16,  # Gemma 4's per-layer embeddings
    "vocab_size_per_layer_input": 512,
}
#: A tiny sparse-attention indexer, where a text config leaves every one of these keys ``None`` (Qwen4-Exp).
INDEXER = {
    "indexer_n_heads": 4,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
    "indexer_budget": 64,
    "indexer_compress_ratio": 4,
}
#: Tiny experts, where a text config leaves every one of these keys ``None`` (DiffusionGemma).
MOE = {"num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}
#: Sizes every tiny vision config gets.
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "depth": 2,
    "embed_dim": 32,
    "num_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "out_hidden_size": 64,
    "vocab_size": 256,
    "projection_dim": 64,
    "output_channels": 32,
    "downsample_channels": 32,
    "mlp_dim": 64,
    "adapter_in_dim": 32,
    "adapter_out_dim": 64,
    "adapter_input_size": 32,
    "mm_embed_dim": 32,  # Gemma 4 Unified's encoder-free patch embedder and its projection's input
    "output_proj_dims": 32,
}
#: Sizes every tiny audio config gets (omni models' audio towers; ``output_dim`` is the text width).
AUDIO = {
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "d_model": 32,
    "downsample_hidden_size": 32,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "output_dim": 64,
    "adapter_out_dim": 64,
    "adapter_input_size": 32,
    "out_hidden_size": 64,
}
#: Sizes every tiny VQ image tokenizer config gets (Janus's and Chameleon's image generators).
VQ = {
    "base_channels": 32,
    "latent_channels": 32,
    "embed_dim": 8,
    "num_embeddings": 64,
    "num_res_blocks": 1,
    "projection_dim": 64,
    "image_token_embed_dim": 64,
    "num_hidden_layers": 1,
}
#: Top-level sizes of a config with a text sub-config: the widths around the projector (Ovis2's visual
#: embedding table, MUSE's adapter) that must be the tiny text width.
TOP = {"hidden_size": 64, "projector_hidden_size": 64}
#: Patches per side of a tiny fixed-size tower's image (divisible by the usual 2x2 and 4x4 merges).
PATCHES_PER_SIDE = 8
#: Tiny models above this many parameters are not built (see :func:`build_tiny`).
MAX_PARAMETERS = 20_000_000
#: The tiny vocabulary; special token ids outside it are moved to 10..99.
VOCAB = 512
#: Layer kinds of a hybrid language model that the tiny models keep, at least one layer each.
RECURRENT_KINDS = ("linear_attention", "conv")
#: Text model types whose default config is all attention although the family's checkpoints are hybrid, with
#: the layer kind those checkpoints add (LFM2's default ``full_attn_idxs`` names every layer).
HYBRID_FAMILIES = {"lfm2": "conv"}
#: How the names of special token ids end (Molmo2's placeholder is ``image_patch_id``).
SPECIAL_ID_KEYS = ("token_id", "token_index", "patch_id")


def _hybrid_layer_types(d: dict[str, Any], n: int) -> list[str] | None:
    """``n`` layer types for a hybrid text config: its softmax and recurrent kinds alternating, a softmax layer
    first (so that a stage at ``layer: 1`` can read layer 0's attention), every kind at least once where ``n``
    allows; ``None`` for a model without recurrent layers."""
    types = [t for t in d.get("layer_types") or [] if isinstance(t, str)]
    recurrent = list(dict.fromkeys(t for t in types if t in RECURRENT_KINDS))
    family = HYBRID_FAMILIES.get(str(d.get("model_type")))
    if family is not None and family not in recurrent:
        recurrent.append(family)
    if not recurrent:
        return None
    attention = [
        "full_attention",
        *dict.fromkeys(t for t in types if t not in RECURRENT_KINDS and t != "full_attention"),
    ]
    return [
        attention[(i // 2) % len(attention)] if i % 2 == 0 else recurrent[(i // 2) % len(recurrent)] for i in range(n)
    ]


def _shrink(d: dict[str, Any], sizes: dict[str, Any]) -> None:
    """``sizes`` into ``d`` where it has the key; per-layer lists and ``per_layer_config`` cut to the new depth,
    an ``mrope_section`` rescaled to the new rotary width."""
    old_depth = d.get("num_hidden_layers")
    rope_head = d.get("head_dim") is not None and d.get("head_dim") == d.get("qk_rope_head_dim")
    for key, value in sizes.items():
        if key in d and isinstance(d[key], int) and not isinstance(d[key], bool):
            d[key] = value if d[key] != 0 else 0  # a zero turns a feature off (GLM-5-Next's NoPE: qk_rope_head_dim)
        elif key in d and isinstance(d[key], list) and d[key] and all(type(v) is int for v in d[key]):
            d[key] = [value] * len(d[key])  # per-modality sizes (ERNIE-4.5-VL's moe_intermediate_size)
    if "head_dim" in d and d["head_dim"] is None and "head_dim" in sizes:  # HunYuan-VL's layers read it as given
        d["head_dim"] = sizes["head_dim"]
    for group in (INDEXER, MOE):  # left to the checkpoint (Qwen4-Exp's QSA indexer, DiffusionGemma's experts)
        if all(d.get(k, 0) is None for k in group):
            d.update(group)
    if rope_head:  # DeepSeek-V3's head_dim is the rotary width (its rotary module reads it)
        d["head_dim"] = d["qk_rope_head_dim"]
    n = d.get("num_hidden_layers")
    hybrid = _hybrid_layer_types(d, n) if isinstance(n, int) and sizes is TEXT else None
    if hybrid is not None:
        d["layer_types"] = hybrid
        if "full_attn_idxs" in d:
            d["full_attn_idxs"] = [i for i, t in enumerate(hybrid) if t == "full_attention"]
    if (
        "mlp_layer_types" in d and d["mlp_layer_types"] is None and isinstance(n, int)
    ):  # DeepSeek-OCR2: the checkpoint's
        dense = d.get("first_k_dense_replace") if isinstance(d.get("first_k_dense_replace"), int) else n
        d["mlp_layer_types"] = ["dense"] * min(dense, n) + ["sparse"] * max(0, n - dense)
    if isinstance(old_depth, int) and isinstance(n, int) and old_depth > n:
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == old_depth:
                d[key] = value[:n]
            elif key == "per_layer_config" and isinstance(value, dict):  # by layer index, or by layer type
                d[key] = {k: v for k, v in value.items() if not str(k).isdigit() or int(k) < n}
    for value in (d.get("per_layer_config") or {}).values():
        if isinstance(value, dict):  # a layer's (or layer type's) own sizes: dots.3's 64-head layers
            _shrink(value, sizes)
    if isinstance(n, int) or isinstance(d.get("depth"), int):
        _fit_layer_indexes(d, n if isinstance(n, int) else d["depth"])
    if d.get("sliding_window", 0) is None and _builds_sliding_masks(d):
        d["sliding_window"] = TEXT["sliding_window"]
    if "text_hidden_size" in d:
        d["text_hidden_size"] = TEXT["hidden_size"]
    _rescale_mrope(d)


def _fit_layer_indexes(d: dict[str, Any], depth: int) -> None:
    """Layer-index lists (``global_attn_indexes``, ``deepstack_visual_indexes``, ...) kept inside the new depth:
    indexes past it become the last layer (once), so that a tap or a global-attention layer still exists."""
    for key, value in list(d.items()):
        if key.endswith(("_indexes", "_indices")) and isinstance(value, list) and value:
            if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                d[key] = sorted({min(v, depth - 1) for v in value})


def _builds_sliding_masks(d: dict[str, Any]) -> bool:
    """The config has sliding layers, or other sliding-window keys (Step3.7 builds a sliding mask whatever its
    layer types): a ``sliding_window`` of ``None`` would not build; one longer than any census prompt slides not."""
    others = [k for k in d if "sliding" in k and k != "sliding_window" and not k.startswith("use_")]
    return "sliding_attention" in (d.get("layer_types") or []) or bool(others)


def _rescale_mrope(d: dict[str, Any]) -> None:
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type
        d["rope_parameters"] = {k: _rescaled(d, v) for k, v in rope.items()}
    elif isinstance(rope, dict):
        d["rope_parameters"] = _rescaled(d, rope)


def _rescaled(d: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """``rope`` with its ``mrope_section`` rescaled to the text config ``d``'s rotary half-width."""
    if not isinstance(rope.get("mrope_section"), list):
        return rope
    if isinstance(d.get("qk_rope_head_dim"), int):
        half = d["qk_rope_head_dim"] // 2
    elif isinstance(d.get("head_dim"), int) or isinstance(d.get("num_attention_heads"), int):
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        factor = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0)
        half = int(head_dim * factor) // 2
    else:
        return rope
    section = rope["mrope_section"]
    scaled = [max(1, round(half * x / sum(section))) for x in section]
    scaled[0] += half - sum(scaled)
    return {**rope, "mrope_section": scaled}


def _vision_sizes(d: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    """:data:`VISION`, deep enough for the feature layers the top config reads, images of
    :data:`PATCHES_PER_SIDE` patches a side."""
    sizes = dict(VISION)
    layers: list[Any] = []
    for sub in (d, *[v for v in d.values() if isinstance(v, dict)]):
        found = sub.get("vision_feature_layers") or sub.get("vision_feature_layer")
        layers += found if isinstance(found, list) else [found] if isinstance(found, int) else []
    deepest = max([abs(x) + (x >= 0) for x in layers if isinstance(x, int)], default=0)
    sizes["num_hidden_layers"] = sizes["depth"] = max(2, deepest)
    patch = vision.get("patch_size")
    patch = patch[0] if isinstance(patch, list) and patch else patch
    size = vision.get("image_size")
    if isinstance(patch, int) and isinstance(size, int):
        sizes["image_size"] = patch * PATCHES_PER_SIDE
    elif isinstance(patch, int) and isinstance(size, list) and len(size) == 2:  # a [height, width] pair
        vision["image_size"] = [patch * PATCHES_PER_SIDE] * 2
    if isinstance(vision.get("num_position_embeddings"), int) and isinstance(patch, int):  # derived from the size
        sizes["num_position_embeddings"] = PATCHES_PER_SIDE**2
    return sizes


def _move_special_ids(d: dict[str, Any], moved: dict[int, int]) -> None:
    """Special token ids of ``d`` at or above :data:`VOCAB` moved to ``10 + k`` (the same old id, the same new one)."""
    for key, value in d.items():
        if key.endswith(SPECIAL_ID_KEYS) and isinstance(value, int) and value >= VOCAB:
            d[key] = moved.setdefault(value, 10 + len(moved))
        elif key.endswith(("token_id", "token_ids")) and isinstance(value, list):
            d[key] = [moved.setdefault(v, 10 + len(moved)) if isinstance(v, int) and v >= VOCAB else v for v in value]
    if "vocab_size" in d:
        d["vocab_size"] = VOCAB


def _shrink_tree(top: dict[str, Any], d: dict[str, Any], moved: dict[int, int], vision: bool) -> None:
    """Shrink every sub-config below ``d`` (a dict with a ``model_type``): vision sizes under a key that names
    vision (or an adapter between tower and text), audio sizes under one that names audio, text sizes elsewhere."""
    for key, value in list(d.items()):
        if isinstance(value, dict) and "model_type" in value:
            sub_vision = vision or any(w in key for w in ("vision", "visual", "adapter"))
            if "audio" in key or "vq" in key:
                _shrink(value, AUDIO if "audio" in key else VQ)
                continue
            _shrink(value, _vision_sizes(top, value) if sub_vision else TEXT)
            if not sub_vision:
                _move_special_ids(value, moved)
            _shrink_tree(top, value, moved, sub_vision)


def _mrope_default(cls: type) -> list[int] | None:
    """The ``mrope_section`` the config's module or its modeling module names: the default it writes
    (``get("mrope_section", [22, 22, 20])``, ERNIE-4.5-VL's height/width/time split) or Qwen2-VL's
    ``[16, 24, 24]`` where it only names the key (PaddleOCR-VL's rotary module fills it in); ``None``: neither
    module names one."""
    named = False
    for name in (cls.__module__, cls.__module__.replace(".configuration_", ".modeling_")):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
        try:
            source = inspect.getsource(sys.modules[name])
        except (KeyError, OSError, TypeError):
            continue
        found = re.search(r"mrope_section[\"']?\s*,\s*\[(\d+),\s*(\d+),\s*(\d+)\]", source)
        if found:
            return [int(x) for x in found.groups()]
        named = named or "mrope_section" in source
    return [16, 24, 24] if named else None


def _missing_mrope_section(cls: type, text: dict[str, Any]) -> list[int] | None:
    """The default ``mrope_section`` of a text config that has none of its own but whose (or whose top config's)
    module names one; ``None`` where it has one or needs none."""
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and ("mrope_section" in rope or any(isinstance(v, dict) for v in rope.values())):
        return None
    classes = [cls]
    if isinstance(text.get("model_type"), str):
        with contextlib.suppress(KeyError):
            classes.append(compat.config_class(text["model_type"]))
    return next((found for c in classes if (found := _mrope_default(c)) is not None), None)


def _read_token_ids(cls: type) -> list[str]:
    """The ``config.<name>_token_id`` attributes the modeling module reads (a real checkpoint's config has them
    even where the config class declares none: Qwen3-Omni's thinker reads ``vision_start_token_id``)."""
    name = cls.__module__.replace(".configuration_", ".modeling_")
    with contextlib.suppress(ImportError):
        importlib.import_module(name)
    try:
        source = inspect.getsource(sys.modules[name])
    except (KeyError, OSError, TypeError):
        return []
    return sorted(set(re.findall(r"self\.config\.(\w+_token_id)\b", source)))


def _fit_code_ranges(d: dict[str, Any]) -> None:
    """Apertus 1.5: the image codes (``image_token_offset`` + the vision codebook) and the audio codes after them
    inside :data:`VOCAB`, with 64-code codebooks."""
    start = VOCAB // 2
    d["image_token_offset"] = start
    for n, key in enumerate(("vision_config", "audio_config")):
        sub = d.get(key)
        if isinstance(sub, dict) and isinstance(sub.get("codebook_size"), int):
            sub["codebook_size"] = 64
            if isinstance(sub.get("codebook_dim"), int) and isinstance(sub.get("hidden_size"), int):
                sub["codebook_dim"] = VISION["hidden_size"] if "vision" in key else AUDIO["hidden_size"]
        if n == 0 and isinstance(d.get("audio_token_offset"), int):
            d["audio_token_offset"] = start + 64


#: Granite 4 Vision's layer-injection settings, which its default config leaves to the checkpoint: ``(vision
#: layer, decoder layer)`` pairs in the checkpoints' form (the last vision layers into the first decoder layers;
#: granite-vision-4.0 has ``[[-19, 9], [-13, 6], [-7, 3], [-1, 0]]``) at the tiny depths, its ``"4/8"`` window
#: Q-Former rate, and one decoder layer per spatial offset group.
LAYER_MAP = {"deepstack_layer_map": [[-2, 2], [-1, 0]], "downsample_rate": "4/8", "spatial_target_layers": [0, 1, 2, 3]}


def _fit_layer_map(d: dict[str, Any]) -> None:
    """A config that injects vision layers into decoder layers by a ``deepstack_layer_map`` (Granite 4 Vision):
    the map, the Q-Former rate and the spatial target layers of :data:`LAYER_MAP`, and a vision width of two
    64-wide heads (the config gives its Q-Former ``vision hidden // 64`` heads)."""
    if "deepstack_layer_map" not in d:
        return
    for key, value in LAYER_MAP.items():
        if key in d:
            d[key] = value
    vision = d.get("vision_config")
    if isinstance(vision, dict) and "hidden_size" in vision:
        vision["hidden_size"] = 128


def _add_mrope_section(text: dict[str, Any], section: list[int]) -> None:
    """``section`` into the text config's rope parameters: one set per layer type where the config keeps them
    so (an empty ``rope_parameters`` beside ``layer_types``: Cohere Compass), else one set."""
    default = {"rope_type": "default", "rope_theta": 10000.0}
    rope, types = text.get("rope_parameters"), text.get("layer_types")
    if rope == {} and isinstance(types, list) and types:
        text["rope_parameters"] = {t: {"mrope_section": section, **default} for t in dict.fromkeys(types)}
    else:
        text["rope_parameters"] = {"mrope_section": section, **(rope or default)}


def _add_optional_vision(cls: type, d: dict[str, Any]) -> None:
    """An optional ``vision_config`` the defaults leave ``None`` (Gemma 4: a text-only default) filled with its
    config class's defaults, so that the tiny model has the vision tower its checkpoints have. The class comes
    from ``sub_configs_defaults`` (a spec, 5.21+) or else from ``sub_configs`` (the class itself, 5.18)."""
    spec = (getattr(cls, "sub_configs_defaults", None) or {}).get("vision_config")
    if spec is None:
        spec = (getattr(cls, "sub_configs", None) or {}).get("vision_config")
    vision_class = spec if isinstance(spec, type) else getattr(spec, "config_class", None)
    if d.get("vision_config", 0) is None and isinstance(vision_class, type) and hasattr(vision_class, "to_dict"):
        d["vision_config"] = vision_class(**getattr(spec, "init_kwargs", {})).to_dict()


#: How the names of the ids end that mark where an image (or a slice of it) starts and ends in the prompt
#: (MiniCPM-V 4.7's ``image_start_id``, ``slice_end_id``, ``newline_id``), besides :data:`SPECIAL_ID_KEYS`.
MARKER_ID_KEYS = ("_start_id", "_end_id", "newline_id")


def _add_missing_ids(d: dict[str, Any], moved: dict[int, int]) -> None:
    """Placeholder and marker ids the default top config leaves ``None`` (MiniCPM-V: a checkpoint's config names
    them; without an ``image_token_id`` its forward ignores the pixels) given ids inside :data:`VOCAB`."""
    for k, key in enumerate(sorted(d)):
        named = key.endswith(("token_id", *MARKER_ID_KEYS)) and not key.startswith(("pad", "bos", "eos"))
        if named and d[key] is None:
            d[key] = moved.setdefault(VOCAB + 2000 + k, 10 + len(moved))


def _fit_vision_layer_ids(d: dict[str, Any]) -> None:
    """Vision-layer indexes (``*_layer_id``: MiniCPM-V's ``insert_layer_id``, after which its window merger runs)
    past the tiny tower's depth moved to its last layer but one, so that the layer exists and another follows it
    (as in the checkpoints: layer 6 of 27)."""
    vision = d.get("vision_config")
    depth = vision.get("num_hidden_layers") if isinstance(vision, dict) else None
    if not isinstance(depth, int):
        return
    for sub in (d, vision):
        for key, value in sub.items():
            if key.endswith("_layer_id") and isinstance(value, int) and value >= depth:
                sub[key] = max(0, depth - 2)


def tiny_config(model_type: str) -> Any:
    """The type's default config with every text and vision sub-config shrunk."""
    cls = compat.config_class(model_type)
    d = cls().to_dict()
    _add_optional_vision(cls, d)
    text = d.get("text_config")
    section = _missing_mrope_section(cls, text) if isinstance(text, dict) else None
    if section is not None:  # explicit, so that it is rescaled below
        _add_mrope_section(text, section)
    if isinstance(d.get("mm_tokens_per_image"), int):  # a pooled grid must fit the tiny tower's patches
        d["mm_tokens_per_image"] = (PATCHES_PER_SIDE // 2) ** 2
    if "vocabulary_map" in d and d["vocabulary_map"] is None:  # Chameleon, Emu3: a real checkpoint's BPE map
        d["vocabulary_map"] = {"<image>": 10}
    if isinstance(d.get("image_token_offset"), int):  # discrete image (and audio) codes inside the tiny vocabulary
        _fit_code_ranges(d)
    merge = (d.get("vision_config") or {}).get("merge_size")
    if isinstance(d.get("out_hidden_size"), int) and isinstance(merge, int):  # MUSE: the merged patches' width
        d["out_hidden_size"] = VISION["hidden_size"] * merge**2
    if isinstance(d.get("projection_hidden_size"), int):  # Kimi-K2.5: the projector's input, the tower's width
        d["projection_hidden_size"] = VISION["hidden_size"]
    if isinstance(d.get("projector_patch_to_query_dict"), dict):  # Aria: queries per tiny image's patch count
        d["projector_patch_to_query_dict"] = {PATCHES_PER_SIDE**2: (PATCHES_PER_SIDE // 2) ** 2}
    for k, key in enumerate(key for key in _read_token_ids(cls) if key not in d):
        d[key] = VOCAB + 1000 + k  # moved into the tiny vocabulary below
    moved: dict[int, int] = {}
    _move_special_ids(d, moved)
    _add_missing_ids(d, moved)
    _shrink_tree(d, d, moved, False)
    _fit_vision_layer_ids(d)
    _fit_merger_output(d)
    _shrink(d, TEXT if "text_config" not in d else TOP)
    _fit_layer_map(d)
    vision = d.get("vision_config")
    shuffled = isinstance(vision, dict) and isinstance(vision.get("pixel_shuffle_ratio"), float)
    if shuffled and "projector_input_dim" in vision:
        # Llama 4: the vision adapter's fc1 takes the pixel-shuffled channels, the projector the adapter's output
        vision["intermediate_size"] = int(vision["hidden_size"] / vision["pixel_shuffle_ratio"] ** 2)
        for key in ("projector_input_dim", "projector_output_dim", "vision_output_dim"):
            vision[key] = TOP["hidden_size"]
    return cls.from_dict(d)


def _fit_merger_output(d: dict[str, Any]) -> None:
    """Qwen2-VL: a vision config with both ``embed_dim`` (the tower's width) and ``hidden_size`` names by the latter
    the width of its merger's output, the language model's (the only such config of the census)."""
    vision, text = d.get("vision_config"), d.get("text_config")
    if not (isinstance(vision, dict) and isinstance(text, dict)):
        return
    if vision.get("embed_dim") is not None and vision.get("hidden_size") is not None:
        vision["hidden_size"] = text["hidden_size"]


def build_tiny(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny random model of ``model_type`` from its config class (eval mode, sdpa where the model has it).

    The model is first built on the meta device: one that still has more than :data:`MAX_PARAMETERS`
    parameters (a sub-config the shrinking does not reach) is not built for real.

    Raises:
        ValueError: the shrunk config still describes a large model.
    """
    cfg = tiny_config(model_type)
    if torch.empty(0).device.type != "meta":
        with torch.device("meta"):
            size = sum(p.numel() for p in _from_config(cfg).parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(f"the shrunk config still has {size / 1e6:.0f}M parameters (a sub-config not shrunk)")
    torch.manual_seed(seed)
    return _from_config(cfg).eval()


def _mapped_class(cfg: Any) -> type:
    """The class transformers' image-text-to-text mapping names for ``cfg``'s model type."""
    return compat.image_text_to_text_class(cfg.model_type)


def _from_config(cfg: Any) -> nn.Module:
    try:
        return compat.model_from_config(cfg)
    except ValueError as exc:  # a top-level class that declares no sdpa: built on eager, its language model
        if "Unrecognized configuration class" in str(exc):  # mapped by name, not by config (Evolla)
            return _mapped_class(cfg)._from_config(cfg, attn_implementation="sdpa")
        if "attention implementation" not in str(exc):  # then switched to sdpa (transformers 5's decoders have it)
            raise
        model = compat.model_from_config(cfg, "eager")
        compat.swap_attention_implementation(model.config.get_text_config(), "sdpa")
        return model
