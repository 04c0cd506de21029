"""HoliTom's pre-LLM steps on one video's ``(F, T, D)`` frame grid, as merge destinations and weights.

Follows ``holitom/llava_arch.py`` of https://github.com/cokeshao/HoliTom (commit
``e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0``): ``select_static_windows`` (the dynamic program over frame
segments), ``get_static_dynamic_features``, ``cluster_dpc_knn``, ``merge_tokens_by_attention_density``,
``merge_tokens_by_density`` and ``merge_tokens_by_clustering``. Each result is expressed on the video's
``F x T`` tokens: a destination (the root whose token the group becomes, ``-1``: dropped) and a weight (the token's
share in its group's weighted mean), so that :class:`tokenprune.Merge` computes the official tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from tokenprune.reducer import ReducerParams
from tokenprune.similarity import density_peak_scores


class HoliTomParams(ReducerParams):
    """The official hyper-parameters (environment variables there), their defaults the official code's."""

    tau: float = Field(default=0.8, gt=-1, lt=1, description="Static-token similarity threshold (official T).")
    beta: float = Field(default=0.6, ge=0, le=1, description="A cluster center's share in its token (BETA).")
    contextual: float = Field(
        default=0.0, ge=0, le=1, description="Share of a frame's dynamic budget given to clustered tokens (D)."
    )
    k: int = Field(default=7, ge=1, description="Neighbours of DPC-KNN's density (official K).")
    max_window: int = Field(default=1024, ge=1, description="Longest segment, in frames (MAX_WINDOW_SIZE).")


def frame_similarity(x: Tensor) -> Tensor:
    """``(F - 1, T)``: the cosine similarity of each token to the token at its place in the next frame."""
    normed = F.normalize(x.float(), p=2, dim=-1)
    return F.cosine_similarity(normed[:-1], normed[1:], dim=-1)


def static_windows(similarity: Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], float]:
    """HoliTom's segmentation: the frame segments ``[(start, end)]`` that maximise the static tokens saved.

    A token is static in a segment when its similarity exceeds ``tau`` between every two consecutive frames of
    it; a segment of ``w`` frames with ``s`` static tokens saves ``s (w - 1)`` tokens. The dynamic program and its
    tie-breaking (a longer window only when strictly better; the shortest such) are the official ones.

    Returns:
        The segments in order, and the tokens saved in all.
    """
    frames = similarity.shape[0] + 1
    high = (similarity > tau).cpu()
    saved = torch.zeros(frames, frames, dtype=torch.float64)
    for start in range(frames - 1):
        run = torch.cumprod(high[start:].long(), dim=0).sum(-1).double()  # static tokens of [start, start + 1 + i]
        saved[start, start + 1 :] = run * torch.arange(1, frames - start, dtype=torch.float64)
    best = [0.0] * frames
    prev = [0] * frames
    for i in range(frames):
        value, first = (best[i - 1] if i > 0 else 0.0), i
        for width in range(2, min(i + 1, max_window) + 1):
            j = i - width
            candidate = (best[j] if j >= 0 else 0.0) + float(saved[j + 1, i])
            if candidate > value:
                value, first = candidate, j + 1
        best[i], prev[i] = value, first
    segments, i = [], frames - 1
    while i >= 0:
        segments.append((prev[i], i))
        i = prev[i] - 1
    return segments[::-1], best[-1]


def dpc_knn(x: Tensor, clusters: int, k: int) -> tuple[Tensor, Tensor]:
    """DPC-KNN cluster centers of ``(B, n, D)`` tokens: ``(B, clusters)`` indices (sorted) and the distances.

    Density ``exp(-mean of the k nearest squared distances)``, distance to the nearest denser token (the largest
    distance for the densest), score ``density * distance`` (:func:`tokenprune.similarity.density_peak_scores`;
    of two equal densities the lower index counts as the denser: two mutual nearest neighbours tie whenever
    ``k = 2``); the ``clusters`` best scores are the centers.
    """
    dim = x.shape[-1]
    dist = torch.cdist(x.float(), x.float()) / dim**0.5
    score = density_peak_scores(dist, k)
    centers = score.topk(clusters, dim=-1).indices
    return centers.sort(-1).values, dist


def cluster_weights(dist: Tensor, centers: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``merge_tokens_by_clustering`` of one row: each of the ``n`` tokens' center and weight.

    Args:
        dist: ``(n, n)`` distances; ``centers``: ``(c,)`` indices.

    Returns:
        ``(center, weight)``, ``(n,)`` each: the index of the token's center (a center its own), and its weight
        in the center's token ``beta * center + (1 - beta) * mean(members)`` (a center without members: itself).
    """
    n = dist.shape[0]
    is_center = torch.zeros(n, dtype=torch.bool, device=dist.device)
    is_center[centers] = True
    nearest = centers[dist[:, centers].argmin(-1)]
    center = torch.where(is_center, torch.arange(n, device=dist.device), nearest)
    members = torch.zeros(n, device=dist.device).scatter_add_(0, center, (~is_center).float())
    own = torch.where(members > 0, torch.full_like(members, beta), torch.ones_like(members))
    weight = torch.where(is_center, own, (1 - beta) / members[center].clamp(min=1))
    return center, weight


def video_merge(x: Tensor, attention: Tensor, retain: float, params: HoliTomParams) -> tuple[Tensor, Tensor]:
    """HoliTom's pre-LLM reduction of one video: ``(F, T)`` destinations (flat indices into the ``F * T`` grid,
    ``-1`` dropped) and weights.

    Args:
        x: ``(F, T, D)`` float32 projected (and pooled) frame tokens.
        attention: ``(F, T)`` the vision tower's attention each token receives (mean over heads and queries).
        retain: ``RETAIN_RATIO``, the share of the video's tokens kept.
        params: The other hyper-parameters.
    """
    frames, per_frame, _ = x.shape
    similarity = frame_similarity(x)
    segments, saved = static_windows(similarity, params.tau, params.max_window)
    total = frames * per_frame
    retain = min(retain / ((total - saved) / total), 1.0)
    grid = torch.arange(total, device=x.device).view(frames, per_frame)
    dest = torch.full((frames, per_frame), -1, dtype=torch.long, device=x.device)
    weight = torch.ones(frames, per_frame, device=x.device)
    for start, end in segments:
        static = torch.zeros(per_frame, dtype=torch.bool, device=x.device)
        if end > start:
            static = (similarity[start:end] > params.tau).all(0)
        _static_tokens(x, grid, dest, weight, start, end, static, retain, params)
        for f in range(start, end + 1):
            _dynamic_tokens(x[f], attention[f], grid[f], dest[f], weight[f], ~static, retain, params)
    return dest, weight


def _static_tokens(
    x: Tensor,
    grid: Tensor,
    dest: Tensor,
    weight: Tensor,
    start: int,
    end: int,
    static: Tensor,
    retain: float,
    params: HoliTomParams,
) -> None:
    """A segment's static places: their frames' mean (roots in the first frame), clustered by density."""
    places = static.nonzero()[:, 0]
    width = end - start + 1
    clusters = round(int(places.numel()) * retain)
    if clusters <= 0:
        return
    mean = x[start : end + 1, places].float().mean(0)
    centers, dist = dpc_knn(mean[None], clusters, min(params.k, clusters))
    center, w = cluster_weights(dist[0], centers[0], params.beta)
    roots = grid[start, places[center]]
    dest[start : end + 1, places] = roots.expand(width, -1)
    weight[start : end + 1, places] = (w / width).expand(width, -1)


def _dynamic_tokens(
    x: Tensor,
    attention: Tensor,
    grid: Tensor,
    dest: Tensor,
    weight: Tensor,
    dynamic: Tensor,
    retain: float,
    params: HoliTomParams,
) -> None:
    """One frame's dynamic tokens: the top by attention kept (dominant), the rest clustered (contextual)."""
    places = dynamic.nonzero()[:, 0]
    n = int(places.numel())
    wanted = math.ceil(n * retain)
    dominant = round(wanted * (1 - params.contextual))
    contextual = wanted - dominant
    kept = torch.zeros(n, dtype=torch.bool, device=x.device)
    if dominant > 0:
        kept[attention[places].topk(dominant).indices] = True
        dest[places[kept]] = grid[places[kept]]
    rest = places[~kept]
    if contextual > 0:
        centers, dist = dpc_knn(x[rest].float()[None], contextual, min(params.k, contextual))
        center, w = cluster_weights(dist[0], centers[0], params.beta)
        dest[rest] = grid[rest[center]]
        weight[rest] = w
