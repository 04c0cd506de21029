"""Helpers the built-in adapters share to describe their vision tower and map its patches to tokens.

See :meth:`tokenprune.adapters.base.ModelAdapter.vision_tower` and
:meth:`~tokenprune.adapters.base.ModelAdapter.map_vision_patches`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import VisionTower


def layer_of_hidden_state(index: int | Sequence[int], num_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[index]`` of a transformers vision tower.

    ``hidden_states`` holds the embeddings and then every layer's output, so ``hidden_states[-2]`` is the
    output of layer ``num_layers - 2`` and ``hidden_states[f]`` (``f >= 1``) that of layer ``f - 1``. For a
    list of layers (features concatenated from several), the deepest one.
    """
    indices = [index] if isinstance(index, int) else list(index)
    layers = [(i + num_layers if i < 0 else i - 1) for i in indices]
    return max(0, max(layers))


def encoder_tower(module: nn.Module, feature_index: int | Sequence[int], notes: str = "") -> VisionTower:
    """A CLIP- or SigLIP-like tower (``vision_model.encoder.layers``), features ``hidden_states[feature_index]``."""
    inner = getattr(module, "vision_model", module)
    layers = tuple(inner.encoder.layers)
    embeddings = getattr(inner, "embeddings", None)
    return VisionTower(
        name=type(module).__name__,
        layers=layers,
        feature_layer=layer_of_hidden_state(feature_index, len(layers)),
        has_cls=isinstance(getattr(embeddings, "class_embedding", None), Tensor),
        notes=notes,
    )


def drop_cls(values: Tensor, strategy: str | None) -> Tensor:
    """``(..., S, C)`` values without position 0 when the model's ``vision_feature_select_strategy`` is ``default``."""
    return values[..., 1:, :] if strategy == "default" else values


def square_patches(values: Tensor, strategy: str | None) -> Tensor | None:
    """``(S, C)`` values (without position 0 under :func:`drop_cls`) as a ``(side, side, C)`` grid of patches.

    ``None`` when the patches do not form a square.
    """
    patches = drop_cls(values, strategy)
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0]:
        return None
    return patches.reshape(side, side, patches.shape[-1])


def block_means(grid: Tensor, rows: int, cols: int | None = None) -> Tensor:
    """``(H, W, C)`` values as ``(H / rows * W / cols, C)``: the mean of each ``rows x cols`` block of positions
    (``cols`` defaults to ``rows``), blocks in raster order: how a pixel shuffle or a 2x2 merger groups a patch grid."""
    cols = rows if cols is None else cols
    h, w, c = grid.shape
    return grid.reshape(h // rows, rows, w // cols, cols, c).mean((1, 3)).reshape(-1, c)


def group_mean(values: Tensor, group: int) -> Tensor:
    """``(S, C)`` values averaged over consecutive groups of ``group`` positions: ``(S / group, C)``."""
    return values.reshape(values.shape[0] // group, group, values.shape[-1]).mean(1)


def merged_unit_means(grid_thw: Tensor, values: list[Tensor], group: int) -> list[Tensor]:
    """A packed tower's per-frame values mapped to its merged tokens, one ``(t * h * w / group, C)`` per image.

    ``grid_thw`` is ``(images, 3)`` in patches; ``values`` holds one ``(h * w, C)`` tensor per frame (the tower's
    attention runs one sequence per frame, ``cu_seqlens`` chunks), frames in order. Each merged token is the mean of
    its ``group`` consecutive patches: the processor stores each ``m x m`` merge unit's patches together, and the
    merger (Qwen2-VL's MLP, GLM-4V's strided convolution) builds one token from each unit.
    """
    out, start = [], 0
    for t, _, _ in grid_thw.tolist():
        out.append(torch.cat([group_mean(v, group) for v in values[start : start + t]]))
        start += t
    return out


def paired_frame_means(grid_thw: Tensor, values: list[Tensor], group: int, merge: int) -> list[Tensor]:
    """:func:`merged_unit_means` for a tower whose resampler also merges ``merge`` consecutive frames of a video into
    one (ERNIE-4.5-VL's ``temporal_merge_size``): one ``(t // merge * h * w / group, C)`` per video, its token ``(k,
    u)`` the mean of unit ``u``'s ``group`` patches in frames ``merge k .. merge k + merge - 1``, tokens frame group by
    frame group. A video of one frame is its frame (the resampler duplicates it); frames that fill no group are
    dropped, as the resampler's slicing drops them."""
    out, start = [], 0
    for t, _, _ in grid_thw.tolist():
        frames = [group_mean(v, group) for v in values[start : start + t]]
        span = merge if t > 1 else 1
        out.append(torch.cat([torch.stack(frames[k : k + span]).mean(0) for k in range(0, t - span + 1, span)]))
        start += t
    return out


def raster_unit_means(grid_thw: Tensor, values: list[Tensor], merge: int) -> list[Tensor]:
    """:func:`merged_unit_means` for a tower whose frames hold their patches in raster order (PaddleOCR-VL: the
    projector regroups each ``m x m`` unit from the rows): a frame's token ``(r, c)`` is the mean of patches
    ``(m r + i, m c + j)``, tokens in raster order, frames one after the other."""
    out, start = [], 0
    for t, h, w in grid_thw.tolist():
        frames = [block_means(v.reshape(h, w, v.shape[-1]), merge) for v in values[start : start + t]]
        out.append(torch.cat(frames))
        start += t
    return out
