"""The offline LLaVA-NeXT processor of the mini VLM and the SynthVQA prompt format.

Images are cut by transformers' own ``LlavaNextImageProcessorPil`` (no torchvision): a 32x32 base
view of the whole image plus 32x32 high-res tiles on the best anyres pinpoint. With patch size 4
each 32x32 view gives 8x8 = 64 visual tokens, and the packed sequence is

    base (64)  +  grid rows x grid cols  +  one ``image_newline`` per grid row

e.g. 64 + 16*16 + 16 = 336 tokens for a 64x64 image (see :func:`num_image_tokens`).
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaNextProcessor

from tokenprune.engine import compat
from tokenprune.synth.tokenizer import IMAGE, build_tokenizer

TILE = 32
PATCH = 4
#: anyres pinpoints as (height, width); the SynthVQA image sizes are exactly these.
GRID_PINPOINTS: list[list[int]] = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def prompt(question: str) -> str:
    """The prompt for one question: the image placeholder, then the question words."""
    return f"{IMAGE} {question}"


def build_image_processor() -> Any:
    """The PIL anyres image processor (``LlavaNextImageProcessorPil``) with 32x32 views and the mini VLM's pinpoints."""
    return compat.image_processor_class("LlavaNext")(
        size={"height": TILE, "width": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=GRID_PINPOINTS,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_center_crop=False,
    )


def build_processor() -> LlavaNextProcessor:
    """The full ``LlavaNextProcessor`` (image processor + word-level tokenizer)."""
    return LlavaNextProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def num_image_tokens(height: int, width: int) -> int:
    """Visual tokens of an image whose size is one of :data:`GRID_PINPOINTS`.

    Equals the processor's count for such sizes (a test checks it); other sizes go through the
    processor, which also handles resizing and padding.
    """
    if [height, width] not in GRID_PINPOINTS:
        raise ValueError(f"{height}x{width} is not a pinpoint {GRID_PINPOINTS}; use the processor for it")
    per_side = TILE // PATCH
    rows, cols = height // PATCH, width // PATCH
    return per_side * per_side + rows * cols + rows
