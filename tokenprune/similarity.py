"""Cosine similarities between token features, for reducers that compare every token with every other.

DivPrune and CDPruner (and any similarity-based method) need the ``n x n`` cosine matrix of a set of
tokens, its largest cost. :func:`cosine_similarity` (and :func:`cosine_distance`, ``1 - cos``) computes
it in float32 in row panels, each panel only against itself and the tokens after it, and mirrors the
rest: half the multiply-accumulates of ``u @ u.T`` for large ``n``, and an exactly symmetric result.
:func:`cosine_similarity_macs` is its exact cost, for :meth:`tokenprune.TokenReducer.overhead_macs`.
"""

from __future__ import annotations

import torch
from torch import Tensor

PANEL = 256
"""Rows per panel of :func:`cosine_similarity`. Timed at 2928 x 1024 on one CPU core: 192 and 256 about
equal and the fastest of 128-512 (512: about 1.3x slower)."""


def unit_rows(x: Tensor) -> Tensor:
    """``(n, D)`` rows scaled to unit L2 norm, in float32.

    Zero rows stay zero (their similarity to everything is 0); rows are first divided by their largest
    entry, so the squares of huge features (bfloat16 near 1e38) do not overflow.
    """
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nn.functional.normalize(x / scale, dim=-1)


def cosine_similarity(x: Tensor, *, panel: int = PANEL) -> Tensor:
    """``(n, n)`` float32 cosine similarities of the rows of ``x`` (``(n, D)``, any float dtype).

    Exactly symmetric; the diagonal is 1 up to rounding (0 for zero rows). Computed from
    :func:`unit_rows` in panels of ``panel`` rows.
    """
    return symmetric_products(unit_rows(x), panel, distance=False)


def cosine_distance(x: Tensor, *, panel: int = PANEL) -> Tensor:
    """``(n, n)`` float32 ``1 - cos`` of the rows of ``x``: the same values as ``1 - cosine_similarity(x)``.

    Cheaper than that: the subtraction is done on each panel while it is in cache, and on half the
    matrix (the mirrored half is copied).
    """
    return symmetric_products(unit_rows(x), panel, distance=True)


def symmetric_products(unit: Tensor, panel: int = PANEL, *, distance: bool = False) -> Tensor:
    """``unit @ unit.T`` (or ``1 -`` it) in float32, panel by panel: the upper half computed, the lower half
    mirrored. For a caller that already has the unit rows (:func:`unit_rows`)."""
    n = unit.shape[0]
    out = torch.empty(n, n, dtype=torch.float32, device=unit.device)
    for start in range(0, n, panel):
        end = min(start + panel, n)
        block = unit[start:end] @ unit[start:].T
        out[start:end, start:] = block.neg_().add_(1.0) if distance else block
        out[end:, start:end] = out[start:end, end:].T
    return out


def cosine_similarity_macs(n: int, dim: int, *, panel: int = PANEL) -> int:
    """Multiply-accumulates of :func:`cosine_similarity` on ``n`` rows of ``dim`` features."""
    return dim * sum(min(panel, n - start) * (n - start) for start in range(0, n, panel))


def density_peak_scores(dist: Tensor, k: int) -> Tensor:
    """DPC-KNN scores of ``(B, n)`` tokens from their ``(B, n, n)`` distances: ``density * parent``.

    Density ``exp(-mean of the k nearest squared distances)`` (a token among its own neighbours), ``parent`` the
    distance to the nearest denser token (the row's largest distance for the densest). The official codes add
    ``1e-6`` uniform noise to the densities so that none tie; here of two equal densities the lower index counts
    as the denser. HoliTom's ``cluster_dpc_knn`` and FastVID's density tokens score this way.
    """
    nearest = dist.topk(k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    index = torch.arange(dist.shape[-1], device=dist.device)
    tied = (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None])[None]
    denser = (density[:, None, :] > density[:, :, None]) | tied  # [b, i, j]: j is denser than i
    dist_max = dist.flatten(1).max(-1).values[:, None, None]
    return torch.where(denser, dist, dist_max).min(-1).values * density
