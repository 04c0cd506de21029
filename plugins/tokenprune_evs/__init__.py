"""The ``evs`` reducer: NVIDIA's Efficient Video Sampling, as vLLM runs it on the projected video tokens.

EVS (Bagrov et al., *Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM
Inference*, NVIDIA 2025, https://arxiv.org/abs/2510.14624) removes the patches of a video that do not
change from one frame to the next. vLLM's implementation (``vllm/multimodal/evs.py``,
``compute_retention_mask``; also in SGLang and TensorRT-LLM) scores each token of frame ``t >= 1`` by its
cosine dissimilarity to the token at the same position of frame ``t - 1``, keeps the whole first frame,
and keeps the most dissimilar tokens of the video up to ``compute_retained_tokens_count``: a count known
before the model runs. Packaged as a third-party plugin: this module is the entry point ``evs`` of the
``tokenprune`` group.
"""

from __future__ import annotations

import torch
from torch import Tensor

import tokenprune
from tokenprune.video_reducer import FrameGridVideoReducer, video_preset_hook

FIRST_FRAME = 255.0
"""The dissimilarity given to the first frame's tokens (vLLM's sentinel; cosine dissimilarities are at most 2)."""


class EVS(FrameGridVideoReducer):
    """Keep each video's first frame and its tokens that changed most since the frame before.

    Per sample and video, with ``F`` frames of ``T`` tokens (the layout's ``frame``; a Qwen temporal patch
    is one frame) and features ``x`` (float32):

    * ``dis[0, :] = 255`` and ``dis[t, i] = 1 - cos(x[t, i], x[t - 1, i])`` for ``t >= 1``;
    * the ``K = max(T, int(keep * F * T))`` tokens of largest ``dis`` are kept (an integer ``keep`` is ``K``
      before the clamp, at most ``F T``), ties to the lower index, as vLLM's stable descending sort.

    Image tokens, newline tokens and protected tokens are kept. The result is a :class:`Selection` in
    sequence order; the budget is the count above (:meth:`stage_budget`). Cost: ``O(N D)``.
    """

    name = "evs"

    why_equal_frames = "EVS compares each token with the one at the same position of the frame before"

    def video_count(self, tokens_per_frame: int, num_frames: int, keep: float | int) -> int:
        """:func:`retained_count`."""
        return retained_count(tokens_per_frame, num_frames, keep)

    def select_video(self, x: Tensor, target: int, keep: float | int) -> Tensor:
        """:func:`retention_mask`."""
        return retention_mask(x, target)


def retained_count(tokens_per_frame: int, num_frames: int, keep: float | int) -> int:
    """Tokens a video keeps: ``max(T, int(keep * F * T))`` (an integer ``keep`` as is, at most ``F * T``).

    vLLM's ``compute_retained_tokens_count(tokens_per_frame, num_frames, q)`` with ``q = 1 - keep``.
    """
    total = tokens_per_frame * num_frames
    base = min(int(keep), total) if isinstance(keep, int) else int(total * float(keep))
    return max(tokens_per_frame, base)


def retention_mask(x: Tensor, target: int) -> Tensor:
    """``(F, T)`` bool: the ``target`` tokens EVS keeps of one video's float32 features ``x`` (``(F, T, D)``)."""
    dis = 1 - torch.nn.functional.cosine_similarity(x[1:], x[:-1], dim=-1)
    dis = torch.cat([torch.full_like(x[:1, :, 0], FIRST_FRAME), dis])
    order = dis.reshape(-1).argsort(descending=True, stable=True)
    mask = torch.zeros(dis.numel(), dtype=torch.bool, device=x.device)
    mask[order[:target]] = True
    return mask.reshape(dis.shape)


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(EVS)
tokenprune_register_pipelines = video_preset_hook(
    EVS,
    "evs-q75",
    0.25,
    paper="EVS (Bagrov et al., NVIDIA 2025), https://arxiv.org/abs/2510.14624",
    table="the paper's worked setting q = 0.75 ('retains the 25% most dynamic patches'), as vLLM's "
    "--video-pruning-rate 0.75",
    description="EVS: 25% of each video's tokens, the first frame whole, then the most changed",
)
