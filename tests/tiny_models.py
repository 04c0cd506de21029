"""Tiny random VLMs built from configs, with offline processors, for the engine and adapter tests.

Every builder returns a :class:`Tiny`: the model (eval mode, sdpa attention, fixed seed) and a
``make_inputs(specs)`` function that builds a left-padded batch the way the model's processor
would. ``make_inputs(specs, start=i)`` numbers the samples from ``i``,
so a sample rebuilt alone gets the same text and image as in the batch. A spec is ``None`` for a text-only sample or ``(height, width)`` for one image of that size
(``[(h, w), (h, w)]`` for several images). Text hidden 64, 4 layers; vision hidden 32, 2 layers;
image 56, patch 14 (see the research notes, section 1).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tokenprune.engine import compat

VOCAB = 256
IMAGE_TOKEN = 4  # shared id of the image placeholder in every tiny model
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=56,
    patch_size=14,
    projection_dim=32,
)
SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=56,
    patch_size=14,
)

Spec = None | tuple[int, int] | list[tuple[int, int]]


@dataclass
class Tiny:
    """A tiny model and its input builder."""

    name: str
    model: torch.nn.Module
    make_inputs: Callable[..., dict[str, Any]]
    processor: Any = None


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    """A deterministic random RGB image of ``h x w`` pixels."""
    rng = np.random.default_rng(seed + 7 * h + w)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _text_ids(i: int, n: int) -> list[int]:
    """``n`` deterministic ordinary token ids (>= 10) for sample ``i``."""
    return [10 + (7 * i + 3 * j) % (VOCAB - 20) for j in range(n)]


def _images_of(spec: Spec) -> list[tuple[int, int]]:
    if spec is None:
        return []
    if isinstance(spec, list):
        return spec
    return [spec]


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(input_ids, attention_mask)``."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = torch.tensor(r)
        mask[i, n - len(r) :] = 1
    return ids, mask


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval()


def _sample_ids(i: int, counts: list[int], prefix: int = 3, suffix: int = 4) -> list[int]:
    """bos, prefix text, then for each image its placeholder run followed by a text token, then text."""
    ids = [1, *_text_ids(i, prefix)]
    for c in counts:
        ids += [IMAGE_TOKEN] * c + [_text_ids(i + 50, 1)[0]]
    return ids + _text_ids(i + 100, suffix + i % 2)


# --- LLaVA-NeXT (full offline processor: anyres tiles, unpadding, image_newline) ----------------


def llava_next(seed: int = 0) -> Tiny:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    cfg = LlavaNextConfig(
        text_config=dict(model_type="llama", **TEXT),
        vision_config=CLIP,
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
        vision_feature_layer=-1,
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(LlavaNextForConditionalGeneration(cfg))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": IMAGE_TOKEN}
    vocab.update({f"w{i}": i for i in range(10, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    hf_tok.padding_side = "left"
    ip = compat.image_processor_class("LlavaNext")(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_grid_pinpoints=cfg.image_grid_pinpoints
    )
    proc = LlavaNextProcessor(
        image_processor=ip,
        tokenizer=hf_tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )

    def make_inputs(specs: Sequence[Spec], start: int = 0) -> dict[str, Any]:
        texts, images = [], []
        for i, spec in enumerate(specs, start):
            ims = _images_of(spec)
            words = " ".join(f"w{t}" for t in _text_ids(i, 3))
            body = " ".join("<image> w60" for _ in ims)
            tail = " ".join(f"w{t}" for t in _text_ids(i + 100, 4 + i % 2))
            texts.append(f"<s> {words} {body} {tail}")
            images += [image(h, w, seed=i * 10 + j) for j, (h, w) in enumerate(ims)]
        if not images:
            out = hf_tok(texts, return_tensors="pt", padding=True)
            return dict(out)
        out = proc(images=images, text=texts, return_tensors="pt", padding=True)
        return dict(out)

    return Tiny("llava_next", model, make_inputs, proc)


# --- LLaVA-1.5 --------------------------------------------------------------------------------


def llava(seed: int = 0) -> Tiny:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        text_config=dict(model_type="llama", **TEXT),
        vision_config=CLIP,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(LlavaForConditionalGeneration(cfg))
    per_image = (56 // 14) ** 2

    def make_inputs(specs: Sequence[Spec], start: int = 0) -> dict[str, Any]:
        rows, pixels = [], []
        for i, spec in enumerate(specs, start):
            ims = _images_of(spec)
            rows.append(_sample_ids(i, [per_image] * len(ims)))
            for j, _ in enumerate(ims):
                g = torch.Generator().manual_seed(100 * i + j)
                pixels.append(torch.randn(3, 56, 56, generator=g))
        ids, mask = left_pad(rows)
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out

    return Tiny("llava", model, make_inputs)


# --- Qwen2-VL / Qwen2.5-VL (M-RoPE) -----------------------------------------------------------


def _qwen(kind: str, seed: int = 0) -> Tiny:
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=56,
            fullatt_block_indexes=[1],
        )
    torch.manual_seed(seed)
    text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    cfg = Config(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=5,
        vision_start_token_id=6,
        vision_end_token_id=7,
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(Model(cfg))
    ip = compat.image_processor_class("Qwen2VL")(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    return Tiny(kind, model, _qwen_inputs(ip))


def qwen2_vl(seed: int = 0) -> Tiny:
    return _qwen("qwen2_vl", seed)


def qwen2_5_vl(seed: int = 0) -> Tiny:
    return _qwen("qwen2_5_vl", seed)


BUILDERS: dict[str, Callable[[], Tiny]] = {
    "llava_next": llava_next,
    "llava": llava,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
}


# --- LLaVA-OneVision (anyres, siglip, "full" features) ------------------------------------------


def llava_onevision(seed: int = 0) -> Tiny:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **TEXT),
        vision_config=SIGLIP,
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(LlavaOnevisionForConditionalGeneration(cfg))
    ip = compat.image_processor_class("LlavaOnevision")(
        size={"height": 56, "width": 56},
        crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=cfg.image_grid_pinpoints,
    )
    return _features_counted("llava_onevision", model, ip, with_sizes=True)


def _features_counted(name: str, model: torch.nn.Module, ip: Any, with_sizes: bool) -> Tiny:
    """Inputs whose placeholder counts come from the model's own ``get_image_features`` / ``get_video_features``.

    A :class:`Video` spec gets random frames of its size (no torchvision video processor); all the
    videos of a batch must have the same number of frames and size.
    """

    # Video-LLaVA before 5.21 takes its images as pixel_values_images (forward and get_image_features)
    params = inspect.signature(model.model.get_image_features).parameters
    pixels = "pixel_values" if "pixel_values" in params else "pixel_values_images"

    def make_inputs(specs: Sequence[Spec], start: int = 0) -> dict[str, Any]:
        images = [image(h, w, seed=i * 10 + j) for i, spec in enumerate(specs, start) for j, (h, w) in _stills(spec)]
        videos = [(i, j, v) for i, spec in enumerate(specs, start) for j, v in _videos(spec)]
        out: dict[str, Any] = {}
        counts: list[int] = []
        if images:
            pv = ip(images=images, return_tensors="pt")
            out[pixels] = pv["pixel_values"]
            kw = {pixels: pv["pixel_values"]}
            if with_sizes:
                out["image_sizes"] = kw["image_sizes"] = pv["image_sizes"]
            with torch.no_grad():
                feats = model.model.get_image_features(**kw).pooler_output
            counts = [int(f.reshape(-1, f.shape[-1]).shape[0]) for f in feats]
        video_counts: list[int] = []
        if videos:
            frames = [_video_frames(v, 100 * i + j) for i, j, v in videos]
            out["pixel_values_videos"] = torch.stack(frames)
            with torch.no_grad():
                feats = model.model.get_video_features(pixel_values_videos=out["pixel_values_videos"]).pooler_output
            # a (videos, N, D) tensor, or (5.18, 5.19's LLaVA-NeXT-Video) a tuple of (frames, n, D) per video, or
            # (Video-LLaVA) a (videos * frames, n, D) tensor
            if isinstance(feats, torch.Tensor) and feats.shape[0] != len(videos):
                feats = feats.reshape(len(videos), -1, feats.shape[-1])
            video_counts = [int(f.reshape(-1, f.shape[-1]).shape[0]) for f in feats]
        rows, k, kv = [], 0, 0
        for i, spec in enumerate(specs, start):
            ids = [1, *_text_ids(i, 3)]
            for item in _items_of(spec):
                if isinstance(item, Video):
                    ids += [VIDEO_TOKEN] * video_counts[kv] + [_text_ids(i + 50, 1)[0]]
                    kv += 1
                else:
                    ids += [IMAGE_TOKEN] * counts[k] + [_text_ids(i + 50, 1)[0]]
                    k += 1
            rows.append(ids + _text_ids(i + 100, 4 + i % 2))
        ids, mask = left_pad(rows)
        out.update(input_ids=ids, attention_mask=mask)
        return out

    return Tiny(name, model, make_inputs)


def _video_frames(video: Video, seed: int) -> torch.Tensor:
    """``(frames, 3, h, w)`` random normalised frames."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(video.frames, 3, video.height, video.width, generator=g)


def llava_next_video(seed: int = 0) -> Tiny:
    """Tiny LLaVA-NeXT-Video: LLaVA-NeXT's anyres images; videos of 56 px frames pooled to 2 x 2 tokens."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextVideoConfig(
        text_config=dict(model_type="llama", **TEXT),
        vision_config=CLIP,
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=2,
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(LlavaNextVideoForConditionalGeneration(cfg))
    ip = compat.image_processor_class("LlavaNext")(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_grid_pinpoints=cfg.image_grid_pinpoints
    )
    return _features_counted("llava_next_video", model, ip, with_sizes=True)


# --- Idefics3 / SmolVLM (crops + global image, pixel shuffle) -----------------------------------


def _idefics(kind: str, seed: int = 0) -> Tiny:
    if kind == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
    else:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
    torch.manual_seed(seed)
    vision = {k: v for k, v in SIGLIP.items() if k != "model_type"}
    cfg = Config(
        text_config=dict(model_type="llama", **TEXT), vision_config=vision, scale_factor=2, image_token_id=IMAGE_TOKEN
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(Model(cfg))
    per_crop = (56 // 14) ** 2 // 4

    def crops_of(h: int, w: int) -> int:
        return 1 if (h, w) == (56, 56) else (h // 56) * (w // 56) + 1

    def make_inputs(specs: Sequence[Spec], start: int = 0) -> dict[str, Any]:
        rows, pixels = [], []
        for i, spec in enumerate(specs, start):
            ims = _images_of(spec)
            ids = [1, *_text_ids(i, 3)]
            crops = []
            for j, (h, w) in enumerate(ims):
                n = crops_of(h, w)
                g = torch.Generator().manual_seed(100 * i + j)
                crops += [torch.randn(3, 56, 56, generator=g) for _ in range(n)]
                for _ in range(n):
                    ids += [8] + [IMAGE_TOKEN] * per_crop
                ids += [8]
            pixels.append(crops)
            rows.append(ids + _text_ids(i + 100, 4 + i % 2))
        ids, mask = left_pad(rows)
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        most = max(len(c) for c in pixels)
        if most:
            pv = torch.zeros(len(pixels), most, 3, 56, 56)
            for i, crops in enumerate(pixels):
                for j, c in enumerate(crops):
                    pv[i, j] = c
            out["pixel_values"] = pv
        return out

    return Tiny(kind, model, make_inputs)


def idefics3(seed: int = 0) -> Tiny:
    return _idefics("idefics3", seed)


def smolvlm(seed: int = 0) -> Tiny:
    return _idefics("smolvlm", seed)


# --- PaliGemma (image first, prefix-LM) and Gemma3 (sliding layers, bidirectional image) ---------


def paligemma(seed: int = 0) -> Tiny:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = PaliGemmaConfig(
        text_config=dict(model_type="gemma", **TEXT, head_dim=16),
        vision_config=dict(SIGLIP, projection_dim=64),
        image_token_index=IMAGE_TOKEN,
        projection_dim=64,
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(PaliGemmaForConditionalGeneration(cfg))
    per_image = (56 // 14) ** 2

    def make_inputs(specs: Sequence[Spec], start: int = 0) -> dict[str, Any]:
        rows, pixels = [], []
        for i, spec in enumerate(specs, start):
            ims = _images_of(spec)
            ids = [IMAGE_TOKEN] * (per_image * len(ims)) + [1, *_text_ids(i, 3 + i % 2)]
            for j, _ in enumerate(ims):
                g = torch.Generator().manual_seed(100 * i + j)
                pixels.append(torch.randn(3, 56, 56, generator=g))
            rows.append(ids)
        ids, mask = left_pad(rows)
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out

    return Tiny("paligemma", model, make_inputs)


def gemma3(seed: int = 0, sliding_window: int = 512) -> Tiny:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(
        TEXT,
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    cfg = Gemma3Config(
        text_config=text,
        vision_config=SIGLIP,
        mm_tokens_per_image=4,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=8,
        eoi_token_index=9,
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(Gemma3ForConditionalGeneration(cfg))
    with torch.no_grad():  # transformers initialises the projection to zeros: images would carry nothing
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)

    def make_inputs(specs: Sequence[Spec], start: int = 0) -> dict[str, Any]:
        rows, pixels = [], []
        for i, spec in enumerate(specs, start):
            ims = _images_of(spec)
            ids = [1, *_text_ids(i, 3)]
            for j, _ in enumerate(ims):
                ids += [8] + [IMAGE_TOKEN] * 4 + [9]
                g = torch.Generator().manual_seed(100 * i + j)
                pixels.append(torch.randn(3, 56, 56, generator=g))
            rows.append(ids + _text_ids(i + 100, 4 + i % 2))
        ids, mask = left_pad(rows)
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == IMAGE_TOKEN).long()}
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out

    return Tiny("gemma3", model, make_inputs)


BUILDERS.update(
    llava_onevision=llava_onevision,
    idefics3=idefics3,
    smolvlm=smolvlm,
    paligemma=paligemma,
    gemma3=gemma3,
)


# --- Qwen3-VL / Qwen3-VL-MoE (DeepStack, interleaved M-RoPE) ------------------------------------

QWEN3_DEEPSTACK = [0, 1, 2]
"""Vision layers whose features DeepStack adds after decoder layers 0, 1 and 2 (so ``layer: 2`` still gets one)."""


def _qwen3(kind: str, seed: int = 0) -> Tiny:
    """Tiny Qwen3-VL (dense or MoE): 3 vision layers, all DeepStack taps, head_dim 16, interleaved M-RoPE."""
    if kind == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        extra: dict[str, Any] = {}
    else:
        from transformers import Qwen3VLMoeConfig as Config
        from transformers import Qwen3VLMoeForConditionalGeneration as Model

        extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 10000.0}
    text = dict(TEXT, head_dim=16, rope_parameters=rope, **extra)
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=64,
        deepstack_visual_indexes=QWEN3_DEEPSTACK,
    )
    cfg = Config(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=5,
        vision_start_token_id=6,
        vision_end_token_id=7,
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(Model(cfg))
    ip = compat.image_processor_class("Qwen2VL")(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    return Tiny(kind, model, _qwen_inputs(ip, frames_apart=True))


def _qwen_inputs(ip: Any, frames_apart: bool = False) -> Callable[..., dict[str, Any]]:
    """Qwen-style inputs: ``<|vision_start|>``, one placeholder per merged patch, ``<|vision_end|>``.

    An image spec is ``(h, w)``; a :class:`Video` gets random patches (no torchvision video processor)
    and video placeholders (id 5), as one run (Qwen2-VL) or, with ``frames_apart`` (Qwen3-VL), one run
    per temporal patch after a timestamp token.
    """

    def make_inputs(specs: Sequence[Spec], start: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {}
        images = [image(h, w, seed=i * 10 + j) for i, spec in enumerate(specs, start) for j, (h, w) in _stills(spec)]
        grids: list[list[int]] = []
        if images:
            pv = ip(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = pv["pixel_values"], pv["image_grid_thw"]
            grids = pv["image_grid_thw"].tolist()
        videos = [(i, j, v) for i, spec in enumerate(specs, start) for j, v in _videos(spec)]
        if videos:
            out["pixel_values_videos"] = torch.cat([_video_patches(v, 100 * i + j) for i, j, v in videos])
            out["video_grid_thw"] = torch.tensor([v.grid for _, _, v in videos])
        rows, k = [], 0
        for i, spec in enumerate(specs, start):
            ids = [1, *_text_ids(i, 3)]
            for item in _items_of(spec):
                if isinstance(item, Video):
                    ids += item.placeholders(frames_apart)
                    continue
                t, h, w = grids[k]
                ids += [6] + [IMAGE_TOKEN] * (t * h * w // 4) + [7]
                k += 1
            rows.append(ids + _text_ids(i + 100, 4 + i % 2))
        ids, mask = left_pad(rows)
        types = (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()
        out.update(input_ids=ids, attention_mask=mask, mm_token_type_ids=types)
        return out

    return make_inputs


VIDEO_TOKEN = 5  # the Qwen tiny models' video placeholder


@dataclass(frozen=True)
class Video:
    """A video spec: ``frames`` input frames (two per temporal patch) of ``height x width`` pixels."""

    frames: int
    height: int
    width: int

    @property
    def grid(self) -> list[int]:
        """``[t, h, w]`` in patches of 14 px, two frames per temporal patch."""
        return [self.frames // 2, self.height // 14, self.width // 14]

    def placeholders(self, frames_apart: bool) -> list[int]:
        t, h, w = self.grid
        per_frame = [VIDEO_TOKEN] * (h * w // 4)
        if frames_apart:  # Qwen3-VL: "<t seconds>" text before each frame's own vision_start / vision_end
            return [tok for f in range(t) for tok in (20 + f, 6, *per_frame, 7)]
        return [6] + per_frame * t + [7]


def _items_of(spec: Any) -> list[Any]:
    if spec is None:
        return []
    return list(spec) if isinstance(spec, list) else [spec]


def _stills(spec: Any) -> list[tuple[int, tuple[int, int]]]:
    stills = [x for x in _items_of(spec) if not isinstance(x, Video)]
    return list(enumerate(stills))


def _videos(spec: Any) -> list[tuple[int, Video]]:
    return list(enumerate(x for x in _items_of(spec) if isinstance(x, Video)))


def _video_patches(video: Video, seed: int) -> torch.Tensor:
    """``(t * h * w, 3 * 2 * 14 * 14)`` random flattened patches, as Qwen's video processor lays them out."""
    t, h, w = video.grid
    return torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))


def qwen3_vl(seed: int = 0) -> Tiny:
    return _qwen3("qwen3_vl", seed)


def qwen3_vl_moe(seed: int = 0) -> Tiny:
    return _qwen3("qwen3_vl_moe", seed)


BUILDERS.update(qwen3_vl=qwen3_vl, qwen3_vl_moe=qwen3_vl_moe)


# --- InternVL (tiles + thumbnail, CLS dropped, pixel shuffle) -----------------------------------

INTERNVL_TILE_TOKENS = 4  # 56 px tiles, 14 px patches: 4 x 4 patches, pixel-shuffled (0.5) to 2 x 2


def internvl(seed: int = 0) -> Tiny:
    """Tiny InternVL: 56 px tiles (up to 4 crops plus a thumbnail), 4 tokens per tile, Qwen2 LM."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=[56, 56],
        patch_size=[14, 14],
    )
    cfg = InternVLConfig(
        text_config=dict(model_type="qwen2", **TEXT),
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        image_seq_length=INTERNVL_TILE_TOKENS,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(InternVLForConditionalGeneration(cfg))
    ip = compat.image_processor_class("GotOcr2")(
        size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1, max_patches=4
    )

    def make_inputs(specs: Sequence[Spec], start: int = 0) -> dict[str, Any]:
        images = [
            image(h, w, seed=i * 10 + j)
            for i, spec in enumerate(specs, start)
            for j, (h, w) in enumerate(_images_of(spec))
        ]
        out: dict[str, Any] = {}
        tiles: list[int] = []
        if images:
            pv = ip(images=images, return_tensors="pt")
            out["pixel_values"] = pv["pixel_values"]
            tiles = [int(n) for n in pv["num_patches"]]
        rows, k = [], 0
        for i, spec in enumerate(specs, start):
            ids = [1, *_text_ids(i, 3)]
            for _ in _images_of(spec):  # <img> (8), the tiles' context tokens, </img> (9)
                ids += [8] + [IMAGE_TOKEN] * (INTERNVL_TILE_TOKENS * tiles[k]) + [9]
                k += 1
            rows.append(ids + _text_ids(i + 100, 4 + i % 2))
        ids, mask = left_pad(rows)
        out.update(input_ids=ids, attention_mask=mask)
        return out

    return Tiny("internvl", model, make_inputs)


BUILDERS.update(internvl=internvl, llava_next_video=llava_next_video)


# --- Video-LLaVA (an image tower and a video tower; each frame keeps its [CLS] token) ----------


def video_llava(seed: int = 0) -> Tiny:
    """Tiny Video-LLaVA: 56 px images as 4 x 4 grids (CLS dropped); videos of 56 px frames, 1 + 16 tokens each.
    Its images come as ``pixel_values_images`` before transformers 5.21, as ``pixel_values`` from 5.21."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = VideoLlavaConfig(
        text_config=dict(model_type="llama", **TEXT),
        vision_config=CLIP,
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(VideoLlavaForConditionalGeneration(cfg))
    ip = compat.image_processor_class("CLIP")(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return _features_counted("video_llava", model, ip, with_sizes=False)


BUILDERS.update(video_llava=video_llava)
# --- Llama 4 (no `.model`, complex freqs_cis RoPE, chunked attention + a NoPE full-attention layer, tiles) -------

LLAMA4_TILE = 56  # tile side in pixels: 4 x 4 patches of 14 px, pixel-shuffled (0.5) to 2 x 2 tokens per tile
LLAMA4_TILE_TOKENS = 4
LLAMA4_CHUNK = 64  # attention_chunk_size: longer than every test prompt plus its generated tokens
# <|image_start|>, <|image|> (before the global view), <|image_end|>, <|tile_x_separator|>, <|tile_y_separator|>
LLAMA4_IDS = dict(start=6, image=7, end=8, x_sep=9, y_sep=5)


def llama4(seed: int = 0, chunk: int = LLAMA4_CHUNK) -> Tiny:
    """Tiny Llama 4: 56 px tiles of 2 x 2 tokens plus a global view, 4 decoder layers (3 chunked RoPE, 1 NoPE),
    MoE with 2 experts. A spec ``(h, w)`` in pixels is an image of ``h/56 x w/56`` tiles (one tile: the global
    view only), laid out in the prompt as the Llama 4 processor writes it (tile runs between text separators)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(
        TEXT,
        head_dim=16,
        intermediate_size_mlp=128,
        num_local_experts=2,
        num_experts_per_tok=1,
        attention_chunk_size=chunk,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=128,  # the pixel shuffle's 4 x 32 channels feed the vision adapter's fc1
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=LLAMA4_TILE,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        projector_input_dim=64,
        projector_output_dim=64,
        vision_output_dim=64,
    )
    cfg = Llama4Config(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=LLAMA4_IDS["start"],
        eoi_token_index=LLAMA4_IDS["end"],
    )
    cfg._attn_implementation = "sdpa"
    model = _finish(Llama4ForConditionalGeneration(cfg))

    def make_inputs(specs: Sequence[Spec], start: int = 0) -> dict[str, Any]:
        tiles, rows = [], []
        for i, spec in enumerate(specs, start):
            ids = [1, *_text_ids(i, 3)]
            for j, (h, w) in enumerate(_images_of(spec)):
                ids += _llama4_image_ids(h // LLAMA4_TILE, w // LLAMA4_TILE)
                count = (h // LLAMA4_TILE) * (w // LLAMA4_TILE)
                count += 1 if count > 1 else 0  # the local tiles, then the global view
                gen = torch.Generator().manual_seed(1000 * i + 10 * j + h + w)
                tiles.append(torch.randn(count, 3, LLAMA4_TILE, LLAMA4_TILE, generator=gen))
            rows.append(ids + _text_ids(i + 100, 4 + i % 2))
        ids, mask = left_pad(rows)
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if tiles:
            out["pixel_values"] = torch.cat(tiles)
        return out

    tiny = Tiny("llama4", model, make_inputs)
    _skip_if_the_stock_llama4_fails(tiny)
    return tiny


def _skip_if_the_stock_llama4_fails(tiny: Tiny) -> None:
    """transformers 5.24.0's ``Llama4ForConditionalGeneration.forward`` fails on its own (it reads ``image_outputs``
    from its language model's output, which has none): nothing of tokenprune's can be checked there."""
    try:
        with torch.no_grad():
            tiny.model(**tiny.make_inputs([(56, 56)]))
    except AttributeError as exc:
        if "image_outputs" not in str(exc):
            raise
        pytest.skip(f"transformers {compat.transformers_version()}'s stock Llama 4 forward fails: {exc}")


def _llama4_image_ids(ratio_h: int, ratio_w: int) -> list[int]:
    """An image's ids as the Llama 4 processor writes them (``Llama4Processor._prompt_split_image``)."""
    ids, patch = [LLAMA4_IDS["start"]], [IMAGE_TOKEN] * LLAMA4_TILE_TOKENS
    if ratio_h * ratio_w > 1:
        for _ in range(ratio_h):
            for x in range(ratio_w):
                ids += patch + ([LLAMA4_IDS["x_sep"]] if x < ratio_w - 1 else [])
            ids.append(LLAMA4_IDS["y_sep"])
    return [*ids, LLAMA4_IDS["image"], *patch, LLAMA4_IDS["end"]]


BUILDERS.update(llama4=llama4)
