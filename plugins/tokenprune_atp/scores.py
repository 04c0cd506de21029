"""The scores ATP's modules read, shared by the inference reducer (hard masks) and the trainer (soft masks).

No official code of ATP-LLaVA exists; these are this project's reading of the paper (see
``docs/reducers/atp.md``), so both sides compute the same quantities from the same inputs:

* :func:`redundancy_scores`: ``S_red`` in ``[0, 1]`` from the attention a token receives from the
  other visual tokens (``S_self``) and from the text tokens (``S_cross``) at layer ``k - 1``;
* :func:`spatial_scores`: ``S_sp`` from uniform spatial sampling over each view's feature grid
  (Spatial Augmented Pruning);
* :func:`score_statistics`: the per-instance features the heads read;
* :func:`pooled_states`: the pooled hidden-state summary the heads read besides.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

NUM_STATS = 9
"""Length of the statistics vector of :func:`score_statistics`."""


def redundancy_scores(att_visual: Tensor, att_text: Tensor, candidates: Tensor) -> Tensor:
    """``S_red``: per-sample percentile rank of the mean of the self- and cross-modality attention.

    ``S_self(i)`` (``att_visual``) is the attention token ``i`` receives from the visual tokens and
    ``S_cross(i)`` (``att_text``) the attention it receives from the text tokens, averaged over heads
    and query rows at layer ``k - 1`` (the probe's ``visual`` and ``text`` sources). Each is scaled
    by the candidate count (so 1 means "uniform"), they are averaged, and the average is turned into
    its rank among the sample's candidates, ``0`` (lowest) to ``1`` (highest; ties to the lower
    index). The rank makes a threshold mean the same thing for every image size and every layer.

    Args:
        att_visual: ``(B, N)`` float.
        att_text: ``(B, N)`` float.
        candidates: ``(B, N)`` bool, the tokens competing (present, not protected).

    Returns:
        ``(B, N)`` float32 in ``[0, 1]``; ``0`` outside the candidates.
    """
    n = candidates.sum(1, keepdim=True).clamp(min=1).float()
    combined = 0.5 * (att_visual.float() + att_text.float()) * n
    ranked = combined.masked_fill(~candidates, float("-inf"))
    order = ranked.argsort(dim=1, stable=True)  # ascending; non-candidates first
    positions = torch.empty_like(order)
    positions.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    offset = (~candidates).sum(1, keepdim=True)
    rank = (positions - offset).float() / (n - 1).clamp(min=1)
    rank = torch.where(n > 1, rank, torch.ones_like(rank))
    return rank.masked_fill(~candidates, 0.0)


def spatial_scores(row: Tensor, col: Tensor, view: Tensor, image: Tensor, newline: Tensor, lam: float) -> Tensor:
    """``S_sp``: Spatial Augmented Pruning's uniform sampling score.

    A token at ``(row, col)`` of its view's feature grid lies on the uniform sampling grid of
    stride ``s`` when ``row % s == 0`` and ``col % s == 0``; the grid's sampling rate is
    ``R_s = 1 / s^2``. The token's score is ``1 - λ R_s`` for the coarsest stride ``s = 2^j`` it lies
    on (``s`` up to the view's size; clamped at 0), so keeping ``S_sp > θ_s`` keeps exactly the
    tokens of one uniform grid, coarser for higher ``θ_s``. Tokens of unknown position
    (``row < 0``) and newline tokens score 0.

    Args:
        row, col, view, image: ``(B, N)`` long, from the adapter's :class:`~tokenprune.TokenLayout`.
        newline: ``(B, N)`` bool.
        lam: ``λ``.

    Returns:
        ``(B, N)`` float32 in ``[0, 1)``.
    """
    known = (row >= 0) & (col >= 0) & ~newline
    r = row.clamp(min=0)
    c = col.clamp(min=0)
    # The largest stride a view can use: its own extent (max row/col + 1) per (sample, image, view).
    extent = torch.maximum(r, c).masked_fill(~known, 0)
    size = _view_extent(extent, image.long().clamp(min=0) * 4096 + view.long().clamp(min=0), known)
    largest = int(size.max()) if size.numel() else 0  # the one host read: how many strides to try
    score = torch.zeros(row.shape, dtype=torch.float32, device=row.device)
    s = 2
    while s <= largest:
        on = known & (r % s == 0) & (c % s == 0) & (s <= size)
        score = torch.where(on, torch.full_like(score, max(0.0, 1.0 - lam / (s * s))), score)
        s *= 2
    return score


def _view_extent(extent: Tensor, key: Tensor, known: Tensor) -> Tensor:
    """``(B, N)``: for each known token, ``1 +`` the largest ``extent`` among the known tokens of its
    sample with the same ``key`` (its view); ``0`` for the others. Sorted segments on the device, no read."""
    if key.shape[1] == 0:
        return torch.zeros_like(extent)
    sorted_key, order = key.masked_fill(~known, torch.iinfo(torch.long).max).sort(dim=1)
    change = (sorted_key[:, 1:] != sorted_key[:, :-1]).long()
    segment = torch.cat([change.new_zeros(change.shape[0], 1), change], 1).cumsum(1)
    top = torch.zeros_like(extent).scatter_reduce(1, segment, extent.gather(1, order), "amax")
    size = torch.empty_like(extent).scatter_(1, order, top.gather(1, segment) + 1)
    return size.masked_fill(~known, 0)


def score_statistics(att_visual: Tensor, att_text: Tensor, candidates: Tensor) -> Tensor:
    """The per-instance statistics a head reads: ``(B, NUM_STATS)`` float32.

    For each of the two attention sources, over the candidates: the attention mass they receive,
    the normalised entropy of its distribution, ``log(1 + max · n)`` and ``log(1 + std · n)`` of the
    distribution scaled by the candidate count ``n``; then ``log(n) / log(1024)``.
    """
    mask = candidates.float()
    n = mask.sum(1).clamp(min=1)
    feats = []
    for att in (att_visual, att_text):
        a = att.float().clamp(min=0) * mask
        mass = a.sum(1)
        p = a / mass.clamp(min=1e-12).unsqueeze(1)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(1) / n.log().clamp(min=1e-6)
        scaled = p * n.unsqueeze(1)
        mean = (scaled * mask).sum(1) / n
        std = (((scaled - mean.unsqueeze(1)) ** 2 * mask).sum(1) / n).sqrt()
        feats += [mass, entropy, torch.log1p(scaled.amax(1)), torch.log1p(std)]
    feats.append(n.log() / math.log(1024.0))
    return torch.stack(feats, dim=1)


def pooled_states(tokens: Tensor, candidates: Tensor) -> Tensor:
    """``(B, D)`` float32 mean of the layer-normalised ``(B, N, D)`` ``tokens`` over the candidates."""
    x = nn.functional.layer_norm(tokens.float(), (tokens.shape[-1],))
    x = x.masked_fill(~candidates.unsqueeze(-1), 0.0)
    return x.sum(1) / candidates.sum(1, keepdim=True).clamp(min=1).float()
