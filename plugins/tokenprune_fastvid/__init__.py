"""The ``fastvid`` reducer: FastVID's dynamic density pruning of a video's tokens before the LLM.

FastVID (Shen et al., *FastVID: Dynamic Density Pruning for Fast Video Large Language Models*, NeurIPS 2025,
https://arxiv.org/abs/2503.11187; official code https://github.com/LunarShen/FastVID) cuts a video into temporally
ordered segments where adjacent frames differ (DySeg), then in every frame keeps the tokens the vision tower
attends to most and, on anchor frames of each segment, the density peaks of the other tokens, each merged with the
tokens most similar to it (STPrune: ATS and DTM). Runs ``at: post_projector`` on the video tokens
(:mod:`tokenprune_fastvid.algorithm`). Packaged as a third-party plugin: this module is the entry point ``fastvid``
of the ``tokenprune`` group.
"""

from __future__ import annotations

import torch
from torch import Tensor

import tokenprune
from tokenprune.layout import TokenLayout, reducible_video_frames
from tokenprune.reducer import ReducerParams, Requirements, VisionAttentionRequest
from tokenprune.video_reducer import VideoMergeReducer, retain_ratio, video_preset_hook
from tokenprune_fastvid.algorithm import FastVIDParams, frame_budget, video_merge

PAPER = "FastVID (Shen et al., NeurIPS 2025), https://arxiv.org/abs/2503.11187"


class FastVID(VideoMergeReducer):
    """FastVID: segments of similar frames; per frame the most attended tokens; density peaks merged per segment.

    Per sample and video, with ``F`` frames of ``T`` tokens (the layout's ``frame``), features ``x`` (float32),
    the vision tower's attention each token receives (``mean``: over heads and patch queries, at the features
    layer, mapped through the model's pooling as its tokens are) and ``r = keep``:

    1. DySeg: ``s_f`` the cosine similarity of frames ``f`` and ``f + 1``'s mean tokens; a segment ends after the
       ``c - 1`` lowest ``s_f`` and after every ``s_f < tau``;
    2. each frame keeps ``R = max(1, int(T r))`` tokens' worth: the ``R - int(R d)`` of highest attention (ATS);
    3. the ``int(R d) L`` density tokens of a segment of ``L`` frames go to its anchor frames (its last and every
       ``p``-th before it), ``int(R d) L // ceil(L / p)`` each: the density peaks (DPC-kNN scores, ``4``
       neighbours) of the anchor's non-salient tokens;
    4. DTM: every non-salient token of the segment joins its most cosine-similar peak (a single-frame segment: its
       own frame's); a peak with ``m`` members (itself one) becomes ``w peak + (1 - w) mean(members)``,
       ``w = max(1 / (m + 1), beta)``.

    A :class:`~tokenprune.Merge` with its own weights, so every merged token is the official combination. Image
    tokens, newlines and protected tokens are kept. The count depends on the segments (``deterministic_count`` is
    false); the budget is ``F R`` per video, an upper bound.
    """

    name = "fastvid"
    why_equal_frames = "FastVID keeps the same share of every frame and compares frames by their mean token"

    Params = FastVIDParams

    @classmethod
    def requirements(cls, params: ReducerParams) -> Requirements:
        """The tower's ``mean`` attention at the features layer (ATS ranks by it)."""
        return Requirements(vision_attention=VisionAttentionRequest("mean"))

    def stage_budget(self, keep: float | int, valid: Tensor, protected: Tensor, layout: TokenLayout | None) -> Tensor:
        """Per sample: every non-video token, plus ``F R`` per video (``R`` the per-frame count), an upper bound."""
        counts = []
        for b in range(int(valid.shape[0])):
            ratio = retain_ratio(keep, valid[b])
            total = int(valid[b].sum())
            for _, index in reducible_video_frames(layout, valid, protected, b, self.name, self.why_equal_frames):
                frames, size = index.shape
                total -= frames * (size - sum(frame_budget(size, ratio, self.params.d)))  # type: ignore[attr-defined]
            counts.append(total)
        return torch.tensor(counts, dtype=torch.long, device=valid.device)

    def merge_video(self, x: Tensor, attention: Tensor, retain: float) -> tuple[Tensor, Tensor]:
        """DySeg, ATS, density peaks and DTM on one video (:func:`~tokenprune_fastvid.algorithm.video_merge`);
        ``retain`` is the official ``fastvid_retention_ratio``."""
        return video_merge(x, attention, retain, self.params)  # type: ignore[arg-type]


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(FastVID)
tokenprune_register_pipelines = video_preset_hook(
    FastVID,
    "fastvid-10",
    0.1,
    paper=PAPER,
    table=(
        "the official scripts/eval.sh on LLaVA-OneVision-7B (fastvid_retention_ratio=0.10 DySeg_c=8 DySeg_tau=0.9 "
        "STPrune_d=0.4 DTM_p=4 DTM_beta=0.6), the paper's main setting: 10% of the video tokens kept"
    ),
    description="FastVID: segments of similar frames, 10% of each frame kept by attention and density peaks",
)
