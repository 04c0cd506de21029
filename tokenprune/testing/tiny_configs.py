"""Tiny random models of any image-text-to-text model type, from its config class (for the model census).

:func:`tiny_config` shrinks the type's default config (every text and vision sub-config, at any depth: text
hidden 64, 4 layers; vision hidden 32, 2 layers, images of :data:`PATCHES_PER_SIDE` patches a side; a
512-token vocabulary with the special ids moved inside it; per-layer lists, ``per_layer_config`` and
``mrope_section`` fitted to the new sizes); :func:`build_tiny` builds it, first on the meta device so that a
config the shrinking does not reach is never allocated.
"""

from __future__ import annotations

import contextlib
import inspect
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
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "sliding_window": 1024,
    "out_hidden_size": 64,
    "hidden_size_per_layer_input": 16,  # Gemma 4's per-layer embeddings
    "vocab_size_per_layer_input": 512,
}
#: Sizes every tiny vision config gets.
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "depth": 2,
    "embed_dim": 32,
    "num_heads": 4,
    "head_dim": 8,
    "out_hidden_size": 64,
}
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
    for key, value in sizes.items():
        if key in d and isinstance(d[key], int) and not isinstance(d[key], bool):
            d[key] = value
    n = d.get("num_hidden_layers")
    hybrid = _hybrid_layer_types(d, n) if isinstance(n, int) and sizes is TEXT else None
    if hybrid is not None:
        d["layer_types"] = hybrid
        if "full_attn_idxs" in d:
            d["full_attn_idxs"] = [i for i, t in enumerate(hybrid) if t == "full_attention"]
    if isinstance(old_depth, int) and isinstance(n, int) and old_depth > n:
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == old_depth:
                d[key] = value[:n]
            elif key == "per_layer_config" and isinstance(value, dict):
                d[key] = {k: v for k, v in value.items() if str(k).isdigit() and int(k) < n}
    if d.get("sliding_window", 0) is None and "sliding_attention" in (d.get("layer_types") or []):
        d["sliding_window"] = TEXT["sliding_window"]
    if "text_hidden_size" in d:
        d["text_hidden_size"] = TEXT["hidden_size"]
    _rescale_mrope(d)


def _rescale_mrope(d: dict[str, Any]) -> None:
    rope = d.get("rope_parameters")
    if not (isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list)):
        return
    if isinstance(d.get("qk_rope_head_dim"), int):
        half = d["qk_rope_head_dim"] // 2
    elif isinstance(d.get("head_dim"), int) or isinstance(d.get("num_attention_heads"), int):
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        factor = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0)
        half = int(head_dim * factor) // 2
    else:
        return
    section = rope["mrope_section"]
    scaled = [max(1, round(half * x / sum(section))) for x in section]
    scaled[0] += half - sum(scaled)
    d["rope_parameters"] = {**rope, "mrope_section": scaled}


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
    if isinstance(patch, int) and isinstance(vision.get("image_size"), int):
        sizes["image_size"] = patch * PATCHES_PER_SIDE
    return sizes


def _move_special_ids(d: dict[str, Any], moved: dict[int, int]) -> None:
    """Special token ids of ``d`` at or above :data:`VOCAB` moved to ``10 + k`` (the same old id, the same new one)."""
    for key, value in d.items():
        if key.endswith(("token_id", "token_index")) and isinstance(value, int) and value >= VOCAB:
            d[key] = moved.setdefault(value, 10 + len(moved))
        elif key.endswith("token_id") and isinstance(value, list):
            d[key] = [moved.setdefault(v, 10 + len(moved)) if isinstance(v, int) and v >= VOCAB else v for v in value]
    if "vocab_size" in d:
        d["vocab_size"] = VOCAB


def _shrink_tree(top: dict[str, Any], d: dict[str, Any], moved: dict[int, int], vision: bool) -> None:
    """Shrink every sub-config below ``d`` (a dict with a ``model_type``): vision sizes under a key that names
    vision, text sizes elsewhere."""
    for key, value in list(d.items()):
        if isinstance(value, dict) and "model_type" in value:
            sub_vision = vision or "vision" in key or "visual" in key
            _shrink(value, _vision_sizes(top, value) if sub_vision else TEXT)
            if not sub_vision:
                _move_special_ids(value, moved)
            _shrink_tree(top, value, moved, sub_vision)


def _mentions_mrope(cls: type) -> bool:
    """The config's module names ``mrope_section`` (a default the modeling code fills in when a config has none)."""
    module = sys.modules.get(cls.__module__)
    try:
        return module is not None and "mrope_section" in inspect.getsource(module)
    except (OSError, TypeError):
        return False


def _needs_mrope_section(cls: type, text: dict[str, Any]) -> bool:
    """The text config has no ``mrope_section`` of its own, but its or the top config's module names one."""
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and ("mrope_section" in rope or any(isinstance(v, dict) for v in rope.values())):
        return False
    classes = [cls]
    if isinstance(text.get("model_type"), str):
        with contextlib.suppress(KeyError):
            classes.append(compat.config_class(text["model_type"]))
    return any(_mentions_mrope(c) for c in classes)


def tiny_config(model_type: str) -> Any:
    """The type's default config with every text and vision sub-config shrunk."""
    cls = compat.config_class(model_type)
    d = cls().to_dict()
    text = d.get("text_config")
    if isinstance(text, dict) and _needs_mrope_section(cls, text):  # explicit, so that it is rescaled below
        rope = text.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0}
        text["rope_parameters"] = {"mrope_section": [8, 12, 12], **rope}
    if isinstance(d.get("mm_tokens_per_image"), int):  # a pooled grid must fit the tiny tower's patches
        d["mm_tokens_per_image"] = (PATCHES_PER_SIDE // 2) ** 2
    moved: dict[int, int] = {}
    _move_special_ids(d, moved)
    _shrink_tree(d, d, moved, False)
    _shrink(d, TEXT if "text_config" not in d else {})
    return cls.from_dict(d)


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


def _from_config(cfg: Any) -> nn.Module:
    try:
        return compat.model_from_config(cfg)
    except ValueError as exc:  # a top-level class that declares no sdpa: built on eager, its language model
        if "attention implementation" not in str(exc):  # then switched to sdpa (transformers 5's decoders have it)
            raise
        model = compat.model_from_config(cfg, "eager")
        compat.swap_attention_implementation(model.config.get_text_config(), "sdpa")
        return model
