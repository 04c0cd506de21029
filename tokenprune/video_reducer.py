"""Bases for video reducers that work per sample and per video on the ``(F, T)`` grid of a video's frames.

Every frame holds as many tokens (:func:`tokenprune.layout.reducible_video_frames`); non-video tokens are kept.

* :class:`FrameGridVideoReducer` keeps a count per video fixed before the model runs (EVS, VidCom2): ``K``
  tokens of each video, ``K`` a function of ``F``, ``T`` and the stage's ``keep`` only.
* :class:`VideoMergeReducer` merges each video's tokens into a count its content decides, with its own
  weights, from the features and the vision tower's attention (FastVID, HoliTom).

:func:`video_preset_hook` is the ``tokenprune_register_pipelines`` hook of a video plugin whose one preset runs
its reducer alone after the projector on the video tokens (EVS, FastVID, VidCom2).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from tokenprune import hookspecs
from tokenprune.errors import ReducerInputError
from tokenprune.layout import TokenLayout, reducible_video_frames
from tokenprune.reducer import Capabilities, Merge, ReduceContext, Selection, TokenReducer

if TYPE_CHECKING:
    from tokenprune.plugins import PipelineRegistry


class FrameGridVideoReducer(TokenReducer):
    """A reducer that keeps :meth:`video_count` tokens of each video, chosen by :meth:`select_video`.

    Subclasses set ``why_equal_frames`` (why the method needs frames of equal size, for the error) and
    implement the two methods; the budget, the loop over samples and videos and the capabilities (after the
    projector, on video tokens) are shared.
    """

    capabilities = Capabilities(insertion_points=frozenset({"post_projector"}), media=frozenset({"video"}))
    why_equal_frames: ClassVar[str]

    @abstractmethod
    def video_count(self, tokens_per_frame: int, num_frames: int, keep: float | int) -> int:
        """How many tokens a video of ``num_frames`` frames of ``tokens_per_frame`` tokens keeps."""

    @abstractmethod
    def select_video(self, x: Tensor, target: int, keep: float | int) -> Tensor:
        """``(F, T)`` bool: the ``target`` tokens kept of one video's float32 features ``x`` (``(F, T, D)``)."""

    def stage_budget(self, keep: float | int, valid: Tensor, protected: Tensor, layout: TokenLayout | None) -> Tensor:
        """Per sample: every non-video token, plus :meth:`video_count` of each video."""
        counts = []
        for b in range(int(valid.shape[0])):
            total = int(valid[b].sum())
            for _, index in self._videos(valid, protected, layout, b):
                frames, size = index.shape
                total += self.video_count(size, frames, keep) - size * frames
            counts.append(total)
        return torch.tensor(counts, dtype=torch.long, device=valid.device)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample and video (batch-independent); ``tokens`` is ``(B, N, D)``."""
        keep = ctx.valid.clone()
        for b in range(ctx.batch_size):
            for video, index in self._videos(ctx.valid, ctx.protected, ctx.layout, b):  # index: (F, T)
                x = video_features(tokens, ctx, b, video, index, self.name)
                target = self.video_count(index.shape[1], index.shape[0], ctx.keep)
                keep[b, index] = self.select_video(x, target, ctx.keep)
        return Selection.from_mask(keep)

    def _videos(self, valid: Tensor, protected: Tensor, layout: TokenLayout | None, b: int) -> list[tuple[int, Tensor]]:
        """Sample ``b``'s videos as ``(video, (F, T) token indices)`` (``layout.reducible_video_frames``)."""
        return reducible_video_frames(layout, valid, protected, b, self.name, self.why_equal_frames)


class VideoMergeReducer(TokenReducer):
    """A reducer that merges each video's tokens on its own, ranking them by the vision tower's attention.

    Subclasses set ``why_equal_frames`` (why the method needs frames of equal size, for the error) and
    implement :meth:`merge_video`; the loop over samples and videos, the checks and the :class:`Merge`
    are shared. The count depends on the video (``deterministic_count`` is false).
    """

    capabilities = Capabilities(
        insertion_points=frozenset({"post_projector"}),
        media=frozenset({"video"}),
        merges=True,
        deterministic_count=False,
        vision_attention=frozenset({"mean"}),
    )
    why_equal_frames: ClassVar[str]

    @abstractmethod
    def merge_video(self, x: Tensor, attention: Tensor, retain: float) -> tuple[Tensor, Tensor]:
        """One video's merge: ``(F T,)`` destinations (indices into its flattened frames, ``-1``: dropped) and
        ``(F T,)`` weights, from its float32 features ``x`` (``(F, T, D)``), ``(F, T)`` attention and the share
        of tokens to retain (:func:`retain_ratio`)."""

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Merge:
        """``tokens`` ``(B, N, D)``; each video of each sample reduced on its own (batch-independent)."""
        n = tokens.shape[1]
        dest = torch.arange(n, device=tokens.device).expand(ctx.batch_size, n).clone()
        weights = ctx.sizes.float().clone()
        for b in range(ctx.batch_size):
            videos = reducible_video_frames(ctx.layout, ctx.valid, ctx.protected, b, self.name, self.why_equal_frames)
            for video, index in videos:
                if ctx.vision_attention is None:
                    raise ReducerInputError(
                        f"reducer {self.name!r} needs the vision tower's attention (ctx.vision_attention)"
                    )
                x = video_features(tokens, ctx, b, video, index, self.name)
                attention = ctx.vision_attention[b, index].float()
                local, w = self.merge_video(x, attention, retain_ratio(ctx.keep, ctx.valid[b]))  # type: ignore[arg-type]
                flat = index.reshape(-1)
                dest[b, index] = torch.where(local >= 0, flat[local.clamp(min=0)], torch.full_like(local, -1))
                weights[b, index] = w
        return Merge(dest, "mean", weights=weights)


def video_preset_hook(
    reducer: type[TokenReducer], name: str, keep: float, *, paper: str, table: str, description: str
) -> Callable[[PipelineRegistry], None]:
    """A ``tokenprune_register_pipelines`` implementation that registers the preset ``name``: ``reducer`` alone,
    ``at: post_projector`` on the video tokens, keeping ``keep``; ``paper``, ``table`` and ``description`` as
    :meth:`~tokenprune.plugins.PipelineRegistry.add` takes them. Bound to the hook's name in the plugin module::

        tokenprune_register_pipelines = video_preset_hook(EVS, "evs-q75", 0.25, paper=..., table=..., description=...)
    """
    stage = {"at": "post_projector", "tokens": "video", "reducer": reducer.name, "keep": keep}

    @hookspecs.hookimpl
    def tokenprune_register_pipelines(registry: PipelineRegistry) -> None:
        registry.add(name, {"stages": [stage]}, paper=paper, table=table, description=description)

    return tokenprune_register_pipelines


def retain_ratio(keep: float | int, valid: Tensor) -> float:
    """The share of a sample's tokens to retain: a fraction ``keep`` as given; a count ``keep`` as its share of
    the sample's ``valid`` (``(N,)`` bool) tokens, at most 1."""
    if isinstance(keep, float):
        return keep
    return min(1.0, keep / max(1, int(valid.sum())))


def video_features(tokens: Tensor, ctx: ReduceContext, b: int, video: int, index: Tensor, name: str) -> Tensor:
    """Sample ``b``'s video ``video`` as float32 ``(F, T, D)`` features (``index``: its ``(F, T)`` token indices).

    Raises:
        ReducerInputError: the stage's ``keep`` is missing, or the features hold NaN or infinite values.
    """
    if ctx.keep is None:
        raise ReducerInputError(f"reducer {name!r} needs the stage's keep (ctx.keep) to size each video")
    x = tokens[b, index].float()
    if not bool(torch.isfinite(x).all()):
        raise ReducerInputError(
            f"reducer {name!r}: sample {b}, video {video} has NaN or infinite features; check the projected video "
            "features"
        )
    return x
