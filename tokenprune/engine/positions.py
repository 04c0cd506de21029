"""Position ids after tokens are dropped: keep the originals, or renumber them compactly.

The engine holds position ids in one normal form, ``rows``: a ``(R, B, L)`` long tensor.

* 1-D RoPE (LLaVA, Gemma, ...): ``R = 1``, from ``(B, L)`` or ``(1, L)`` position ids.
* M-RoPE (Qwen2-VL): ``R = 3`` (temporal, height, width) or ``R = 4`` (a text row first, as
  ``generate`` passes them).

Rows form *groups* that are renumbered together: a 1-D row alone; the three M-RoPE rows jointly
(a visual token's height and width must stay comparable); a leading text row alone.

``original`` (default): each kept token keeps the position it had in the unpruned sequence, as
FastV's and G-Prune's code do; the gaps stay. Decoding continues at the unpruned length.

``compact``: per sample and group, every position value that only dropped tokens used is freed,
and each remaining value ``v`` becomes ``v - (number of freed values below v)``. For 1-D RoPE this
is plain renumbering (``0, 1, 2, ...`` over the kept tokens). For M-RoPE it keeps each image's
kept tokens on a (compressed) grid and lets the text after the image follow its largest kept
position. Decoding positions shift down by the number of freed values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PositionFormat:
    """How the caller shaped its position ids, to give them back the same way.

    Attributes:
        dims: 2 for ``(B, L)``, 3 for ``(R, B, L)``.
    """

    dims: int


def to_rows(position_ids: Tensor, batch: int) -> tuple[Tensor, PositionFormat]:
    """Normal form ``(R, B, L)`` of ``(B, L)``, ``(1, L)`` or ``(R, B, L)`` position ids."""
    if position_ids.dim() == 2:
        return position_ids.expand(batch, -1).unsqueeze(0), PositionFormat(2)
    if position_ids.dim() == 3:
        return position_ids.expand(-1, batch, -1), PositionFormat(3)
    raise ValueError(f"position_ids must be (B, L) or (R, B, L), got shape {tuple(position_ids.shape)}")


def from_rows(rows: Tensor, fmt: PositionFormat) -> Tensor:
    """Back to the caller's shape."""
    return rows[0] if fmt.dims == 2 else rows


def groups(num_rows: int) -> list[list[int]]:
    """Rows renumbered together: ``[[0]]``, ``[[0, 1, 2]]`` or ``[[0], [1, 2, 3]]``."""
    if num_rows == 1:
        return [[0]]
    if num_rows == 3:
        return [[0, 1, 2]]
    if num_rows == 4:
        return [[0], [1, 2, 3]]
    return [[r] for r in range(num_rows)]


def gather(rows: Tensor, index: Tensor) -> Tensor:
    """Rows of the tokens at ``index`` (``(B, L')``, ``-1`` for engine padding, which gets 0)."""
    r = rows.shape[0]
    out = rows.gather(2, index.clamp(min=0).unsqueeze(0).expand(r, -1, -1))
    return out.masked_fill((index < 0).unsqueeze(0), 0)


def compact(rows: Tensor, index: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """Renumber the kept tokens compactly.

    Args:
        rows: ``(R, B, L)`` positions before the stage.
        index: ``(B, L')`` kept columns of ``rows`` (``-1`` for engine padding).
        real: ``(B, L)`` bool: the columns of ``rows`` that are tokens (not engine padding).

    Returns:
        ``(new_rows, freed)``: ``(R, B, L')`` renumbered positions, and ``(R, B)`` long, the number
        of values freed in each row's group (the shift of later decoding positions).
    """
    kept = gather(rows, index)
    new = kept.clone()
    r, b, _ = rows.shape
    freed = torch.zeros(r, b, dtype=torch.long, device=rows.device)
    for s in range(b):
        before = rows[:, s, real[s]]
        keep_cols = index[s] >= 0
        after = kept[:, s, keep_cols]
        for group in groups(r):
            used_before = torch.unique(before[group])
            used_after = torch.unique(after[group])
            gone = used_before[~torch.isin(used_before, used_after)]
            if gone.numel() == 0:
                continue
            for row in group:
                values = new[row, s, keep_cols]
                new[row, s, keep_cols] = values - torch.searchsorted(gone, values)
                freed[row, s] = gone.numel()
    return new, freed
