"""The ``vidcom2`` reducer: VidCom2's frame-uniqueness video token compression.

VidCom2 (Liu et al., *Video Compression Commander*, EMNLP 2025, https://arxiv.org/abs/2505.14454;
official code https://github.com/xuyang-liu16/VidCom2, ``token_compressor/vidcom2/vidcom2.py``) prunes
a video's tokens after the projector, training-free and without a [CLS] token: each token is scored by
its similarity to the video's mean token and to its frame's mean token (a multi-scale Gaussian kernel
over the lowest-variance half of the channels); frames that stand out from the video get a larger share
of the budget; each frame keeps its least similar (most distinctive) tokens. The count follows vLLM's
contract (``vllm/multimodal/video_prune/vidcom2.py``, ``compute_retained_tokens_count``): exactly
``int(keep * F * T)`` tokens per video, at least one per frame's worth, known before the model runs.
Packaged as a third-party plugin: this module is the entry point ``vidcom2`` of the ``tokenprune`` group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import tokenprune
from tokenprune.video_reducer import FrameGridVideoReducer, video_preset_hook

ALPHAS: tuple[float, ...] = tuple(2.0**k for k in range(-3, 2))
"""Bandwidths of the multi-scale Gaussian kernel (the official ``[2**k for k in range(-3, 2)]``)."""

TEMPERATURE = 0.01
"""Softmax temperature of the per-frame budget (the official ``temp=0.01``)."""


class VidCom2(FrameGridVideoReducer):
    """Keep, per video, the tokens least similar to the video's and their frame's mean, frames by uniqueness.

    Per sample and video, with ``F`` frames of ``T`` tokens (the layout's ``frame``; a Qwen temporal patch
    is one frame), features ``x`` (``(F, T, D)``, float32) and the target count
    ``K = max(F, min(F T, int(keep F T)))`` (an integer ``keep`` is ``K`` before the clamp):

    1. keep the ``D // 2`` channels of lowest variance over the video's tokens, L2-normalise each token;
    2. ``v`` and ``f``: the sum over ``a`` in ``ALPHAS`` of ``exp(-|x - c|^2 / 2a)`` with ``c`` the video's
       mean token (``v``) or the token's frame mean (``f``);
    3. frame budget: ``p = softmax(-mean_t v / 0.01)`` over frames, ``s = min(1, r (1 + p - 1/F))`` with
       ``r = keep`` (``K / (F T)`` for an integer ``keep``); frame ``i`` keeps its ``max(1, round(s_i T))``
       tokens of lowest ``v + f``;
    4. reconcile to exactly ``K`` (vLLM's step): drop the kept tokens of highest ``v + f`` or add the
       unkept ones of lowest ``v + f``.

    Ties go to the lower index. Image tokens, newline tokens (LLaVA-OneVision's video newline, LLaVA-Video's
    row ends) and protected tokens are kept. The result is a :class:`Selection` in sequence order; the
    budget is the count above (:meth:`stage_budget`). Cost: ``O(N D)`` per video, no matrix products.
    """

    name = "vidcom2"

    why_equal_frames = "VidCom2 scores each frame against its own mean and shares the budget out per frame"

    def video_count(self, tokens_per_frame: int, num_frames: int, keep: float | int) -> int:
        """:func:`retained_count`."""
        return retained_count(tokens_per_frame, num_frames, keep)

    def select_video(self, x: Tensor, target: int, keep: float | int) -> Tensor:
        """:func:`retention_mask`, the per-frame quotas scaled by ``keep`` (``target / (F T)`` for a count)."""
        ratio = target / x.shape[:2].numel() if isinstance(keep, int) else float(keep)
        return retention_mask(x, target, ratio)


def retained_count(tokens_per_frame: int, num_frames: int, keep: float | int) -> int:
    """Tokens a video keeps: ``int(keep * F * T)`` (an integer ``keep`` as is), clamped to ``[F, F * T]``.

    vLLM's ``compute_retained_tokens_count(tokens_per_frame, num_frames, q)`` with ``q = 1 - keep``.
    """
    total = tokens_per_frame * num_frames
    base = min(int(keep), total) if isinstance(keep, int) else int(total * float(keep))
    return max(num_frames, min(base, total))


def retention_mask(x: Tensor, target: int, ratio: float) -> Tensor:
    """``(F, T)`` bool: the ``target`` tokens VidCom2 keeps of one video's float32 features ``x`` (``(F, T, D)``).

    ``ratio`` is the retention ratio the per-frame quotas scale (VidCom2's ``base_scale``, vLLM's ``1 - q``).
    """
    num_frames, per_frame, dim = x.shape
    flat = x.reshape(num_frames * per_frame, dim)
    channels = flat.var(0, unbiased=False).argsort(stable=True)[: max(1, dim // 2)]
    frames = F.normalize(x[..., channels], dim=-1)
    v = _gaussian(frames, frames.mean((0, 1), keepdim=True))
    f = _gaussian(frames, frames.mean(1, keepdim=True))
    similarity = (v + f).reshape(-1)
    frame_score = -v.mean(-1)
    probs = torch.softmax((frame_score - frame_score.max()) / TEMPERATURE, dim=0)
    scales = (ratio * (1 + probs - probs.mean())).clamp(max=1.0)
    quota = (scales * per_frame).round().long().clamp(min=1, max=per_frame)  # (F,)
    order = (v + f).argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(per_frame, device=x.device).expand_as(order))
    chosen = (rank < quota.unsqueeze(1)).reshape(-1)
    # Reconcile to the exact target: the chosen tokens first, each group by ascending similarity.
    by_similarity = similarity.argsort(stable=True)
    priority = by_similarity[(~chosen[by_similarity]).long().argsort(stable=True)]
    mask = torch.zeros_like(chosen)
    mask[priority[:target]] = True
    return mask.reshape(num_frames, per_frame)


def _gaussian(x: Tensor, center: Tensor) -> Tensor:
    """``(F, T)``: the sum over :data:`ALPHAS` of ``exp(-|x - center|^2 / 2a)``."""
    distance = ((x - center) ** 2).sum(-1)
    return sum(torch.exp(-distance / (2 * a)) for a in ALPHAS)  # type: ignore[return-value]


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(VidCom2)
tokenprune_register_pipelines = video_preset_hook(
    VidCom2,
    "vidcom2-25",
    0.25,
    paper="VidCom2 (Liu et al., EMNLP 2025), https://arxiv.org/abs/2505.14454",
    table=(
        "the official README's lmms-eval commands (R_RATIO=0.25, the default) on LLaVA-OneVision-7B and "
        "LLaVA-Video-7B: 25% of the video tokens kept"
    ),
    description="VidCom2: 25% of each video's tokens, shared out over frames by their uniqueness",
)
