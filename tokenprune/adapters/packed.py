"""Packed towers (Qwen2-VL, Qwen2.5-VL; Qwen3.5, GLM-4.xV, ERNIE-4.5-VL): the tower's patches as per-frame rows of whole
merge units.

Qwen2-VL's tower runs every image's patches as one packed sequence ``(N, Dv)``, ``cu_seqlens`` separating the
frames, and its PatchMerger turns each run of ``G = m * m`` consecutive patches (one ``m x m`` merge unit, which the
processor stores together) into one language-model token. A ``pre_projector`` or ``vision_layer`` stage on such a
tower reduces whole units, so every remaining unit still feeds the merger its ``G`` patches: the reducer's batch is
the frames, a frame's tokens are its units in raster order (``(M, W, G * Dv)``, each unit its ``G`` patch features
side by side, as the merger's MLP reads them; rows padded to the longest frame). Qwen2.5-VL's tower holds the units
in window order (``get_window_index``); :class:`PackedUnits` puts them in raster order for the reducer and back.
PaddleOCR-VL's tower holds each frame's *patches* in raster order and its projector regroups every unit from them
(``PackedTower.raster``): :class:`PackedUnits` then gathers each unit's ``G`` patches from their raster places for the
reducer (in the projector's order within the unit) and puts them back, so the tower and the projector see their own
order, less the removed units' patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenprune.layout import TokenLayout


@dataclass(frozen=True)
class PackedTower:
    """What the engine needs to know about a packed tower.

    Attributes:
        module: The tower, called as ``module(pixel_values, grid_thw)`` once per image call.
        merge: ``m``, the merge unit's side in patches (``G = m * m``).
        window: Qwen2.5-VL's window side in merge units (``None``: no window attention).
        full_blocks: The blocks that attend over a whole frame; the others attend within windows.
        raster: The tower holds each frame's patches in raster order and its projector regroups every ``m x m`` unit
            from them (PaddleOCR-VL); ``False``: a unit's patches are consecutive (the processor's order).
    """

    module: nn.Module
    merge: int
    window: int | None = None
    full_blocks: frozenset[int] = frozenset()
    raster: bool = False

    def units(self, grid_thw: Tensor) -> PackedUnits:
        """The unit bookkeeping of one tower call on ``grid_thw`` (``(images, 3)``, in patches)."""
        from tokenprune.engine import compat

        grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        device = grid_thw.device
        if self.window is not None:
            window_index = compat.vision_window_index(self.module, grid_thw).to(device)
        else:
            window_index = torch.arange(sum(t * h * w for t, h, w in grid) // self.merge**2, device=device)
        frames, windows, grids = [], [], []
        for t, h, w in grid:
            hu, wu = h // self.merge, w // self.merge
            side = self.window or max(hu, wu)
            r = torch.arange(hu, device=device).repeat_interleave(wu)
            c = torch.arange(wu, device=device).repeat(hu)
            local = (r // side) * (-(-wu // side)) + c // side
            for _ in range(t):
                frames.append(torch.full_like(r, len(grids)))
                windows.append(local + (int(windows[-1].max()) + 1 if windows else 0))
                grids.append((hu, wu))
        return PackedUnits(
            group=self.merge**2,
            window_index=window_index,
            frame=torch.cat(frames)[window_index],
            window=torch.cat(windows)[window_index],
            grids=grids,
            patch_index=_raster_patches(grid, self.merge, device) if self.raster else None,
        )


def _raster_patches(grid: list[tuple[int, int, int]], merge: int, device: torch.device) -> Tensor:
    """``(N,)`` long: for each patch in unit order (frames in order, units in raster order, a unit's ``m * m``
    patches row by row), its place in a tower that holds every frame's patches in raster order."""
    out, start = [], 0
    for t, h, w in grid:
        rows = torch.arange(h, device=device).reshape(h // merge, 1, merge, 1)
        cols = torch.arange(w, device=device).reshape(1, w // merge, 1, merge)
        frame = (rows * w + cols).reshape(-1)  # (units, m, m) flattened: unit-major, the unit's rows, its columns
        for _ in range(t):
            out.append(frame + start)
            start += h * w
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=device)


@dataclass
class PackedUnits:
    """One tower call's merge units, in the tower's (window) order.

    Attributes:
        group: ``G``, patches per unit.
        window_index: ``(U,)`` long, the raster unit at each window-order place (the identity without windows).
        frame: ``(U,)`` long, each window-order unit's frame (the reducer's row).
        window: ``(U,)`` long, each window-order unit's attention window (its frame without windows).
        grids: Per frame, its ``(rows, cols)`` of units.
        patch_index: ``(N,)`` long, the tower's place of each patch in unit order (unit ``u``'s ``G`` patches at
            ``u * G .. u * G + G - 1``, in the projector's order); ``None``: the tower holds each unit's patches
            consecutively, in that order.
    """

    group: int
    window_index: Tensor
    frame: Tensor
    window: Tensor
    grids: list[tuple[int, int]]
    patch_index: Tensor | None = None

    @property
    def rows(self) -> Tensor:
        """``(M, W)`` long, the raster unit at each row place (frames in order, raster within), ``-1`` padding."""
        sizes = [h * w for h, w in self.grids]
        width, device = max(sizes), self.window_index.device
        out = torch.full((len(sizes), width), -1, dtype=torch.long, device=device)
        start = 0
        for i, n in enumerate(sizes):
            out[i, :n] = torch.arange(start, start + n, device=device)
            start += n
        return out

    def layout(self, rows: Tensor) -> TokenLayout:
        """The ``(M, W)`` grid layout of the rows (padding places at row and column 0)."""
        width = rows.shape[1]
        parts = []
        for h, w in self.grids:
            one = TokenLayout.grid(h, w)
            pad = width - h * w
            if pad:
                one = TokenLayout.cat([one, TokenLayout.grid(1, pad)])
            parts.append(one)
        merged = {f: torch.cat([getattr(p, f) for p in parts]) for f in ("image", "view", "row", "col", "newline")}
        return TokenLayout(**merged).to(rows.device)

    def to_rows(self, x: Tensor, alive: Tensor) -> tuple[Tensor, Tensor]:
        """The tower's ``(N', Dv)`` patches of the ``alive`` units (``(U,)`` bool, window order) as rows.

        Returns:
            ``(rows, valid)``: ``(M, W, G * Dv)`` features (zeros where no unit remains) and ``(M, W)`` bool.
        """
        dim = x.shape[-1] * self.group
        if self.patch_index is None:
            units = x.new_zeros(alive.shape[0], dim)
            units[alive] = x.reshape(-1, dim)
        else:
            patches = x.new_zeros(self.patch_index.shape[0], x.shape[-1])
            patches[self.patch_mask(alive)] = x
            units = patches[self.patch_index].reshape(-1, dim)
        raster = units.new_zeros(units.shape).index_copy(0, self.window_index, units)
        raster_alive = torch.zeros_like(alive).index_copy(0, self.window_index, alive)
        index = self.rows
        safe = index.clamp(min=0)
        valid = (index >= 0) & raster_alive[safe]
        return raster[safe] * valid.unsqueeze(-1), valid

    def from_rows(self, rows: Tensor) -> Tensor:
        """``(M, W, G * Dv)`` rows back to the tower's ``(N, Dv)`` patches, every unit, in window order."""
        index = self.rows
        raster = rows.new_zeros(self.window_index.shape[0], rows.shape[-1])
        raster[index[index >= 0]] = rows[index >= 0]
        patches = raster[self.window_index].reshape(-1, rows.shape[-1] // self.group)
        if self.patch_index is None:
            return patches
        return torch.empty_like(patches).index_copy(0, self.patch_index, patches)

    def patch_mask(self, alive: Tensor) -> Tensor:
        """``(N,)`` bool over the tower's patches, in its order: the patches of the ``alive`` units (``(U,)`` bool,
        window order)."""
        mask = alive.repeat_interleave(self.group)
        if self.patch_index is None:
            return mask
        return torch.zeros_like(mask).index_copy(0, self.patch_index, mask)

    def alive_of(self, keep: Tensor) -> Tensor:
        """``(U,)`` bool in window order from a ``(M, W)`` bool mask over the rows."""
        index = self.rows
        raster = torch.zeros(self.window_index.shape[0], dtype=torch.bool, device=keep.device)
        raster[index[index >= 0]] = keep[index >= 0]
        return raster[self.window_index]

    def seqlens(self, alive: Tensor, windows: bool) -> tuple[Tensor, int]:
        """``cu_seqlens`` (int32, in patches) and the longest segment for the ``alive`` units, one segment per frame
        (``windows``: per attention window); segments left empty are dropped."""
        ids = (self.window if windows else self.frame)[alive]
        _, counts = torch.unique_consecutive(ids, return_counts=True)
        counts = counts * self.group
        cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        return cu, int(counts.max()) if counts.numel() else 0
