"""FastVID's steps on one video's ``(F, T, D)`` frame grid, as merge destinations and weights.

Follows the parallel implementation of https://github.com/LunarShen/FastVID (commit
``a40a109cb8df20e8c2c17c6850f8269717369990``), ``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/
modeling_qwen2.py`` (``Qwen2Model.forward``, the block between ``FastVID`` markers): DySeg (segments cut where
adjacent frames' global features differ), then STPrune per frame: ATS (the tokens of highest attention kept),
density-peak scores of the others, anchor frames every ``p`` frames from a segment's end, and DTM (each anchor's
density peaks merged with the tokens most similar to them). Each result is expressed on the video's ``F x T``
tokens: a destination (the root whose token the group becomes, ``-1``: dropped) and a weight (the token's share in
its group's weighted mean), so that :class:`tokenprune.Merge` computes the official tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from tokenprune.reducer import ReducerParams
from tokenprune.similarity import density_peak_scores

NEIGHBOURS = 4
"""Neighbours of the density-peak local density (the official ``topk(dist_matrix, k=4)``, the token itself one)."""


class FastVIDParams(ReducerParams):
    """The official hyper-parameters (``fastvid_*`` model arguments there), their defaults the official
    scripts/eval.sh's: the ``fastvid`` reducer's params."""

    c: int = Field(default=8, ge=1, description="DySeg: the c - 1 lowest frame similarities cut (fastvid_DySeg_c).")
    tau: float = Field(default=0.9, ge=-1, le=1, description="DySeg: frame similarities below it cut (DySeg_tau).")
    d: float = Field(default=0.4, ge=0, lt=1, description="A frame's budget share for density tokens (STPrune_d).")
    p: int = Field(default=4, ge=1, description="Anchor-frame step within a segment (fastvid_DTM_p).")
    beta: float = Field(default=0.6, ge=0, le=1, description="Least weight of a peak in its merged token (beta).")


def frame_budget(tokens_per_frame: int, retain: float, d: float) -> tuple[int, int]:
    """``(salient, contextual)`` tokens per frame: ``R = max(1, int(T retain))``, ``R - int(R d)`` and ``int(R d)``."""
    kept = max(1, int(tokens_per_frame * retain))
    contextual = int(kept * d)
    return kept - contextual, contextual


def segment_lengths(x: Tensor, c: int, tau: float) -> list[int]:
    """DySeg: the lengths of the video's temporal segments, in frame order.

    The global feature of a frame is the mean of its tokens (``x``: ``(F, T, D)``); a cut falls after frame ``f``
    where the cosine similarity of frames ``f`` and ``f + 1`` is among the ``c - 1`` lowest (ties to the lower
    frame) or below ``tau``.
    """
    frames = x.shape[0]
    if frames == 1:
        return [1]
    glob = F.normalize(x.float().mean(1), dim=-1)
    similarity = (glob[:-1] * glob[1:]).sum(-1)
    cut = similarity < tau
    lowest = min(c - 1, frames - 1)
    if lowest > 0:
        cut[similarity.argsort(stable=True)[:lowest]] = True
    ends = torch.cat([cut.nonzero()[:, 0], torch.tensor([frames - 1], device=x.device)])
    return torch.diff(ends, prepend=torch.tensor([-1], device=x.device)).tolist()


def anchor_counts(lengths: list[int], contextual: int, p: int, limit: int) -> tuple[Tensor, Tensor]:
    """``(F,)`` density tokens each frame keeps and ``(F,)`` bool: whether they merge their whole segment.

    A segment of ``L`` frames shares ``contextual L`` tokens among its anchor frames (its last frame and every
    ``p``-th frame before it): ``contextual L // ceil(L / p)`` each, at most ``limit`` (a frame's non-salient
    tokens). An anchor whose count exceeds ``contextual`` merges the tokens of its whole segment; one whose count
    equals it (a single-frame segment) merges its own frame's (the official ``frm_context_num_list ==
    frame_context_num``).
    """
    counts, whole = [], []
    for length in lengths:
        each = contextual * length // (-(-length // p))
        for f in range(length):
            anchor = (length - 1 - f) % p == 0
            counts.append(min(each, limit) if anchor else 0)
            whole.append(anchor and each > contextual)
    return torch.tensor(counts, dtype=torch.long), torch.tensor(whole, dtype=torch.bool)


def density_scores(x: Tensor) -> Tensor:
    """Density-peak scores of ``(F, n, D)`` tokens, per frame: ``(F, n)``.

    Local density ``exp(-mean of the squared distances to the k nearest tokens)`` (the token itself among them;
    distances ``|x_i - x_j| / sqrt(D)``), distance to the nearest denser token (the frame's largest distance for
    the densest), score ``density * distance`` (:func:`tokenprune.similarity.density_peak_scores`: of two equal
    densities the lower index counts as the denser, where the official code adds noise).
    """
    n, dim = x.shape[1], x.shape[2]
    dist = torch.cdist(x, x) / dim**0.5
    return density_peak_scores(dist, min(NEIGHBOURS, n))


def top_mask(score: Tensor, counts: Tensor) -> Tensor:
    """``(F, n)`` bool: each row's ``counts[f]`` highest scores (ties to the lower index)."""
    order = score.argsort(dim=-1, descending=True, stable=True)
    places = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, places)
    return rank < counts.to(score.device)[:, None]


def video_merge(x: Tensor, attention: Tensor, retain: float, params: FastVIDParams) -> tuple[Tensor, Tensor]:
    """FastVID's reduction of one video: ``(F, T)`` destinations (flat indices into the ``F * T`` grid, ``-1``
    dropped) and weights.

    Args:
        x: ``(F, T, D)`` float32 projected (and pooled) frame tokens.
        attention: ``(F, T)`` the attention each token receives (ATS ranks by it).
        retain: ``fastvid_retention_ratio``, the share of each frame's tokens kept.
        params: The other hyper-parameters.
    """
    frames, per_frame, dim = x.shape
    salient_count, contextual = frame_budget(per_frame, retain, params.d)
    rest = per_frame - salient_count
    grid = torch.arange(frames * per_frame, device=x.device).view(frames, per_frame)
    salient = top_mask(attention.float(), torch.full((frames,), salient_count))
    dest = torch.where(salient, grid, torch.full_like(grid, -1)).reshape(-1)
    weight = torch.ones(frames * per_frame, device=x.device)
    lengths = segment_lengths(x, params.c, params.tau)
    counts, whole = anchor_counts(lengths, contextual, params.p, rest)
    if rest == 0 or int(counts.sum()) == 0:
        return dest.view(frames, per_frame), weight.view(frames, per_frame)
    places = grid[~salient].view(frames, rest)  # the non-salient tokens, in index order
    feats = x.reshape(-1, dim)[places]
    targets = top_mask(density_scores(feats), counts)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    group = torch.where(whole | (counts == 0), segment + frames, torch.arange(frames)).to(x.device)
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        _merge_group(feats[part], places[part], targets[part], group[part], params.beta, dest, weight)
        start += length
    return dest.view(frames, per_frame), weight.view(frames, per_frame)


def _merge_group(
    feats: Tensor, places: Tensor, targets: Tensor, group: Tensor, beta: float, dest: Tensor, weight: Tensor
) -> None:
    """DTM on one segment's non-salient tokens (``(L, n, D)`` features, ``(L, n)`` flat places, ``(L, n)`` bool
    density peaks, ``(L,)`` merge group of each frame): each token joins its most cosine-similar peak of its group;
    a peak with ``m`` members (itself one) becomes ``w peak + (1 - w) mean(members)``, ``w = max(1/(m+1), beta)``.
    Writes ``dest`` and ``weight`` (flat, ``(F T,)``) in place."""
    x = feats.reshape(-1, feats.shape[-1])
    place = places.reshape(-1)
    is_peak = targets.reshape(-1)
    member_group = group.repeat_interleave(feats.shape[1])
    peaks = is_peak.nonzero()[:, 0]
    if peaks.numel() == 0:
        return
    normed = F.normalize(x, dim=-1)
    same = member_group[:, None] == member_group[peaks][None, :]
    similarity = (normed @ normed[peaks].T).masked_fill(~same, float("-inf"))
    owner = peaks[similarity.argmax(-1)]
    owner = torch.where(is_peak, torch.arange(x.shape[0], device=x.device), owner)  # a peak is its own root
    joined = same.any(-1)
    owner = torch.where(joined, owner, torch.zeros_like(owner))
    members = torch.zeros(x.shape[0], device=x.device).scatter_add_(0, owner, joined.float())
    own = (1 / (members + 1)).clamp(min=beta)
    share = (1 - own[owner]) / members[owner].clamp(min=1)
    dest[place] = torch.where(joined, place[owner], torch.full_like(place, -1))
    weight[place] = torch.where(is_peak, own + share, share)
