"""Qwen2-VL and Qwen2.5-VL: dynamic resolution and 3-D M-RoPE positions.

Each image is a ``(h / m) x (w / m)`` grid of merged patches (``m`` = ``spatial_merge_size``),
between ``<|vision_start|>`` and ``<|vision_end|>`` tokens. Positions are ``(3, B, L)`` (temporal,
height, width) and ``generate`` passes a fourth, text-only row first. The model computes them with
``get_rope_index`` on the *unpruned* ``input_ids``; the engine receives them at the language-model
input and slices them, so kept visual tokens keep their 3-D positions (``original``) or a
compressed grid (``compact``, see :mod:`tokenprune.engine.positions`). ``get_rope_index`` cannot be run on
pruned ids (it expects ``t*h*w/m^2`` tokens per image).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokenprune.adapters.base import ImageCall, ModelAdapter
from tokenprune.layout import TokenLayout


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL / Qwen2.5-VL: one merged-patch grid per image, M-RoPE positions."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    position_scheme = "mrope"
    notes = "M-RoPE positions from get_rope_index on the unpruned ids, then sliced"

    def image_layouts(self, call: ImageCall) -> list[TokenLayout]:
        grid = call.arg("image_grid_thw", 1)
        if grid is None:
            return super().image_layouts(call)
        merge = self.vlm().config.vision_config.spatial_merge_size
        layouts = []
        for i, (t, h, w) in enumerate(grid.tolist()):
            one = TokenLayout.grid(h // merge, w // merge, image=i)
            layouts.append(TokenLayout.cat([one] * t) if t > 1 else one)
        return layouts

    def video_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """Per video, ``t`` merged-patch grids, frame ``0 .. t - 1`` (one temporal patch: two input frames)."""
        grid = call.arg("video_grid_thw", 1)
        if grid is None:
            return super().video_layouts(call)
        merge = self.vlm().config.vision_config.spatial_merge_size
        return [
            TokenLayout.cat([TokenLayout.grid(h // merge, w // merge, image=i, frame=f, video=True) for f in range(t)])
            for i, (t, h, w) in enumerate(grid.tolist())
        ]

    def rotary(self, hidden: Tensor, positions: Tensor, layer_index: int) -> tuple[Tensor, Tensor]:
        rows = positions[-3:] if positions.shape[0] >= 3 else positions.expand(3, -1, -1)
        return self.language_model().rotary_emb(hidden, rows)

    def decode_positions(self, kwargs: dict[str, Any], virtual_past: int, query_length: int) -> Tensor:
        mask = kwargs.get("attention_mask")
        deltas = getattr(self.vlm(), "rope_deltas", None)
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        batch, device = int(ref.shape[0]), ref.device
        if isinstance(mask, Tensor) and mask.dim() == 2:
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -query_length:]
        else:
            pos = torch.arange(virtual_past, virtual_past + query_length, device=device).expand(batch, -1)
        pos = pos.unsqueeze(0).expand(3, -1, -1)
        if deltas is not None:
            pos = pos + deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)
        return pos
