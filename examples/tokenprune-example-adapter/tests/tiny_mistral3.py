"""A tiny random Mistral3 built from a config, and a batch builder that writes prompts as the
Pixtral processor does (``PixtralProcessor`` itself needs torchvision; its image processor does not)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from tokenprune.engine import compat

IMG, IMG_BREAK, IMG_END = 10, 12, 13  # Mistral's ids
PATCH, MERGE = 14, 2
SPECS = [(56, 56), (56, 112), (112, 84)]  # three images of different sizes: 2x2, 2x4 and 4x3 grids


@dataclass
class Tiny:
    model: Mistral3ForConditionalGeneration
    processor: Any  # PixtralImageProcessorPil

    def image_tokens(self, height: int, width: int) -> list[int]:
        """The prompt tokens of one processed image (as ``PixtralProcessor`` writes them)."""
        rows, cols = height // (PATCH * MERGE), width // (PATCH * MERGE)
        tokens = ([IMG] * cols + [IMG_BREAK]) * rows
        tokens[-1] = IMG_END
        return tokens

    def make_inputs(self, specs: Sequence[Any], start: int = 0) -> dict[str, Any]:
        """A left-padded batch; ``specs[j]`` is ``None`` (text only), ``(h, w)`` or a list of them."""
        rows, images = [], []
        for i, spec in enumerate(specs, start):
            sizes = [] if spec is None else spec if isinstance(spec, list) else [spec]
            rng = np.random.default_rng(i)
            images += [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
            rows.append([1, *_text(i, 3)])
            for h, w in sizes:
                rows[-1] += self.image_tokens(h, w) + _text(i + 50, 1)
            rows[-1] += _text(i + 100, 4 + i % 2)
        out: dict[str, Any] = {}
        if images:
            processed = self.processor(images=images, return_tensors="pt")
            out.update(pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"])
        width = max(len(r) for r in rows)
        out["input_ids"] = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        out["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return out


def _text(i: int, n: int) -> list[int]:
    return [20 + (7 * i + 3 * j) % 230 for j in range(n)]


def build_tiny(seed: int = 0) -> Tiny:
    """Text hidden 64, 4 layers; Pixtral vision hidden 32, 2 layers, patch 14, merge 2."""
    torch.manual_seed(seed)
    cfg = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=256,
            max_position_embeddings=512,
            sliding_window=None,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            head_dim=8,
            image_size=112,
            patch_size=PATCH,
        ),
        image_token_index=IMG,
        spatial_merge_size=MERGE,
        vision_feature_layer=-1,
        attn_implementation="sdpa",
    )
    model = Mistral3ForConditionalGeneration(cfg).eval()
    processor = compat.image_processor_class("Pixtral")(
        size={"longest_edge": 112}, patch_size={"height": PATCH * MERGE, "width": PATCH * MERGE}
    )
    return Tiny(model, processor)
