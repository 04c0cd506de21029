"""The ``downsample`` reducer: keep the visual tokens on a uniform spatial lattice.

Uniform spatial downsampling to a fixed budget is a strong, training-free baseline in recent
visual-token-reduction benchmarks, and the spatial half of ATP-LLaVA's pruning
(https://arxiv.org/abs/2412.00447). Packaged exactly as a third-party plugin: this module is the
entry point ``downsample`` of the ``tokenprune`` group, and registers its reducer through the hook.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerParams, Selection, TokenReducer
from tokenprune.budget import all_spatial_quotas


class Downsample(TokenReducer):
    """Keep, in every feature grid, the tokens nearest to a uniform lattice of the grid's share of the budget.

    Per sample, the unprotected, non-newline tokens are grouped by ``(image, view)`` of the layout
    (LLaVA-NeXT: base view and high-resolution grid; Qwen2-VL: one grid per image). The free budget
    (``budget`` minus protected tokens) is split over the groups in proportion to their sizes
    (largest remainder), so the total is exactly the budget. A group of ``R x C`` tokens with quota
    ``q`` keeps

    * ``h = round(sqrt(q R / C))`` lattice rows (raised until ``ceil(q / h) <= C``), at rows
      ``floor((i + 1/2) R / h)``;
    * ``q`` points over those rows as evenly as possible (earlier rows take the extra ones), row
      ``i`` with ``w_i`` points at columns ``floor((j + 1/2) C / w_i)``.

    ``q = h w`` gives a regular ``h x w`` lattice (``24 x 24 -> 12 x 12`` keeps every other row and
    column, offset by one). A group whose tokens are not a complete ``R x C`` grid (no layout, or an
    earlier stage removed tokens) keeps ``q`` tokens evenly spaced in sequence order,
    ``floor((j + 1/2) n / q)``. If the budget exceeds the grid tokens, unprotected newline tokens
    fill the rest in sequence order.

    The features are not read (NaN features do not matter); the result is a :class:`Selection`,
    so kept tokens are unchanged original tokens. Cost: ``O(N)``.
    """

    name = "downsample"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector", "layer"}))
    Params = ReducerParams

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample; ``tokens`` (``(B, N, D)``) are only used for their shape."""
        keep = torch.zeros(ctx.valid.shape, dtype=torch.bool, device=tokens.device)
        for b, (always, chosen) in enumerate(all_spatial_quotas(ctx)):
            keep[b, always] = True
            for members, quota in chosen:
                grid = None
                if ctx.layout is not None:
                    grid = _grid_positions(ctx.layout.row[b, members], ctx.layout.col[b, members])
                if grid is None:
                    chosen = members[sequence_lattice(int(members.numel()), quota).to(members.device)]
                else:
                    rows, cols, position = grid
                    r, c = lattice(rows, cols, quota)
                    chosen = members[position[r.to(members.device), c.to(members.device)]]
                keep[b, chosen] = True
        return Selection.from_mask(keep)


def lattice(rows: int, cols: int, count: int) -> tuple[Tensor, Tensor]:
    """``count`` distinct ``(row, col)`` points spread uniformly over a ``rows x cols`` grid.

    Returns:
        ``(rows_idx, cols_idx)``, two ``(count,)`` long tensors, in raster order.

    >>> [t.tolist() for t in lattice(4, 4, 4)]
    [[1, 1, 3, 3], [1, 3, 1, 3]]
    """
    if not 0 < count <= rows * cols:
        raise ValueError(f"lattice: need 0 < count <= {rows * cols}, got {count}")
    h = min(rows, max(1, round(math.sqrt(count * rows / cols))))
    while math.ceil(count / h) > cols:
        h += 1
    widths = [count // h + (1 if i < count % h else 0) for i in range(h)]
    r_idx: list[int] = []
    c_idx: list[int] = []
    for i, w in enumerate(widths):
        r = (2 * i + 1) * rows // (2 * h)
        r_idx += [r] * w
        c_idx += [(2 * j + 1) * cols // (2 * w) for j in range(w)]
    return torch.tensor(r_idx, dtype=torch.long), torch.tensor(c_idx, dtype=torch.long)


def sequence_lattice(n: int, count: int) -> Tensor:
    """``count`` of ``n`` positions evenly spaced in sequence order: ``floor((j + 1/2) n / count)``."""
    return (torch.arange(count) * 2 + 1) * n // (2 * count)


def _grid_positions(row: Tensor, col: Tensor) -> tuple[int, int, Tensor] | None:
    """``(R, C, position)`` if ``row``/``col`` cover a complete ``R x C`` grid exactly once, else None.

    ``position[r, c]`` is the index (into ``row``) of the token at ``(r, c)``.
    """
    n = int(row.numel())
    if n == 0 or bool((row < 0).any()) or bool((col < 0).any()):
        return None
    rows, cols = int(row.max()) + 1, int(col.max()) + 1
    if rows * cols != n:
        return None
    position = torch.full((rows, cols), -1, dtype=torch.long, device=row.device)
    position[row, col] = torch.arange(n, device=row.device)
    if bool((position < 0).any()):
        return None
    return rows, cols, position


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(Downsample)
