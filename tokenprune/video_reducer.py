"""A base for video reducers that keep a count per video fixed before the model runs (EVS, VidCom2).

Such a reducer works per sample and per video on the ``(F, T)`` grid of a video's frames (every frame
as many tokens, :func:`tokenprune.layout.reducible_video_frames`): it keeps every non-video token and
``K`` tokens of each video, ``K`` a function of ``F``, ``T`` and the stage's ``keep`` only.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from tokenprune.errors import ReducerInputError
from tokenprune.layout import TokenLayout, reducible_video_frames
from tokenprune.reducer import ReduceContext, Selection, TokenReducer


class FrameGridVideoReducer(TokenReducer):
    """A reducer that keeps :meth:`video_count` tokens of each video, chosen by :meth:`select_video`.

    Subclasses set ``why_equal_frames`` (why the method needs frames of equal size, for the error) and
    implement the two methods; the budget and the loop over samples and videos are shared.
    """

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
                if ctx.keep is None:
                    raise ReducerInputError(
                        f"reducer {self.name!r} needs the stage's keep (ctx.keep) to size each video"
                    )
                x = tokens[b, index].float()
                if not bool(torch.isfinite(x).all()):
                    raise ReducerInputError(
                        f"reducer {self.name!r}: sample {b}, video {video} has NaN or infinite features; check the "
                        "projected video features"
                    )
                target = self.video_count(index.shape[1], index.shape[0], ctx.keep)
                keep[b, index] = self.select_video(x, target, ctx.keep)
        return Selection.from_mask(keep)

    def _videos(self, valid: Tensor, protected: Tensor, layout: TokenLayout | None, b: int) -> list[tuple[int, Tensor]]:
        """Sample ``b``'s videos as ``(video, (F, T) token indices)`` (``layout.reducible_video_frames``)."""
        return reducible_video_frames(layout, valid, protected, b, self.name, self.why_equal_frames)
