"""Qwen2-VL and Qwen2.5-VL: dynamic resolution and 3-D M-RoPE positions.

Each image is a ``(h / m) x (w / m)`` grid of merged patches (``m`` = ``spatial_merge_size``),
between ``<|vision_start|>`` and ``<|vision_end|>`` tokens. Positions are ``(3, B, L)`` (temporal,
height, width) and ``generate`` passes a fourth, text-only row first. The model computes them with
``get_rope_index`` on the *unpruned* ``input_ids``; the engine receives them at the language-model
input and slices them, so kept visual tokens keep their 3-D positions (``original``) or a
compressed grid (``compact``, see :mod:`tokenprune.engine.positions`). ``get_rope_index`` cannot be run on
pruned ids (it expects ``t*h*w/m^2`` tokens per image).

``pre_projector`` and ``vision_layer`` stages reduce whole ``m x m`` merge units of the packed tower
(:mod:`tokenprune.adapters.packed`): the merger still reads each remaining unit's ``m * m`` patches, the removed
units' tokens leave at the language model's input and the M-RoPE positions of the kept ones are sliced as above.

Vision attention (:class:`Qwen2VLTower`) is served on images and videos: ``get_video_features`` runs the same tower,
one sequence per temporal patch of ``video_grid_thw`` (Qwen2.5-VL's in window order per frame), and
``map_vision_video_patches`` maps them to the video tokens as ``map_vision_patches`` maps the images'.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter, VisionTower
from tokenprune.adapters.packed import PackedTower
from tokenprune.adapters.vision import group_mean, merged_unit_means
from tokenprune.layout import TokenLayout


class Qwen2VLTower:
    """Qwen2-VL's / Qwen2.5-VL's packed tower (``visual``), for the adapter of a model that has one: the blocks the
    vision probe reads, the patch-to-token map (Qwen2.5-VL's window order included) and the merge units that
    ``pre_projector`` and ``vision_layer`` stages reduce. Mixed into :class:`Qwen2VLAdapter` and the Qwen2.5-Omni
    thinker's adapter, before :class:`~tokenprune.adapters.base.ModelAdapter` (whose ``vlm()`` it reads)."""

    def projector(self) -> nn.Module | None:
        """The tower's PatchMerger: ``pre_projector`` stages reduce whole 2x2 merge units before it
        (:meth:`packed_tower`), each unit one language-model token."""
        return self.vlm().visual.merger

    def packed_tower(self) -> PackedTower | None:
        """The packed tower: merge units of ``spatial_merge_size``, Qwen2.5-VL's windows (in units) and its
        full-attention blocks."""
        visual = self.vlm().visual
        cfg = visual.config
        full = getattr(cfg, "fullatt_block_indexes", None)
        window = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size if full else None
        return PackedTower(visual, int(cfg.spatial_merge_size), window, frozenset(full or ()))

    def vision_tower(self) -> VisionTower | None:
        """The vision transformer's blocks; features from the last block (through the 2x2 merger).

        Qwen2.5-VL's blocks use window attention except ``fullatt_block_indexes``; the probe's default is the
        last full-attention block (the last block in the released checkpoints), where every patch of an
        image attends to every other. Videos too (``VisionTower.videos``): ``get_video_features`` runs the same
        tower on every temporal patch of ``video_grid_thw`` as a frame of its own (:meth:`map_vision_video_patches`).
        """
        visual = self.vlm().visual
        blocks = tuple(visual.blocks)
        full = getattr(visual.config, "fullatt_block_indexes", None)
        layer, notes = (int(full[-1]) % len(blocks), "last full-attention block") if full else (len(blocks) - 1, "")
        return VisionTower(type(visual).__name__, blocks, layer, False, notes, videos=True)

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per frame; each merged token is the mean of ``m x m`` consecutive patches (the
        processor orders the patches so), or, under Qwen2.5-VL's window order, of the patches of the unit that
        ``get_window_index`` moved to its place."""
        return self._map_units(call.arg("image_grid_thw", 1), values)

    def map_vision_video_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """:meth:`map_vision_patches` for the video call: one tower sequence per temporal patch of ``video_grid_thw``
        (``(videos, 3)``, the call's second argument; Qwen3-VL's ``get_video_features`` passes it on to
        ``get_image_features``), so each video token is the mean of its unit's ``m * m`` patches in its frame (under
        Qwen2.5-VL's window order, read where ``get_window_index`` moved the unit in that frame), ``(t * h * w / m^2,
        C)`` per video, frames one after the other as :meth:`~Qwen2VLAdapter.video_layouts` orders them."""
        return self._map_units(call.arg("video_grid_thw", 1), values)

    def _map_units(self, grid: Tensor | None, values: list[Tensor]) -> list[Tensor] | None:
        """Per image (video) of ``grid`` (``(n, 3)``), its tokens' means of their units' patches (window order
        undone); ``values``: the probed block's sequences, per frame or (a windowed block) per window."""
        if grid is None:
            return None
        visual = self.vlm().visual
        group = visual.config.spatial_merge_size**2
        full = getattr(visual.config, "fullatt_block_indexes", None)
        if full:
            return self._map_windowed(grid, values, group)
        return merged_unit_means(grid, values, group)

    def _map_windowed(self, grid: Tensor, values: list[Tensor], group: int) -> list[Tensor]:
        """Qwen2.5-VL: every block sees each frame's merge units in window order (``get_window_index``: the windows
        of each temporal patch, frame after frame), the full-attention blocks one sequence per frame, the windowed
        ones one per window; both hold whole units, so the units' means in call order are in window order."""
        from tokenprune.engine import compat

        window_index = compat.vision_window_index(self.vlm().visual, grid)
        counts = [int(t * h * w) // group for t, h, w in grid.tolist()]
        units = torch.cat([group_mean(v, group) for v in values])  # (units, C) in window order
        restored = torch.zeros_like(units)
        restored[window_index.to(units.device)] = units
        return list(restored.split(counts))


class Qwen2VLAdapter(Qwen2VLTower, ModelAdapter):
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
