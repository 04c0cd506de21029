"""The ``dycoke`` reducer: DyCoke's temporal token merging (TTM) of video tokens.

DyCoke (Tao et al., CVPR 2025, https://arxiv.org/abs/2411.15024; official code
https://github.com/KD-TAO/DyCoke, ``dycole_ttm`` in ``llava/model/llava_arch.py``) removes the
temporal redundancy of a video's frames before the language model: in each pair of frames the
second keeps only the tokens least similar to the same position in the first, and across windows of
four frames the third frame is pruned the same way against the first. Packaged as a third-party
plugin: this module is the entry point ``dycoke`` of the ``tokenprune`` group. DyCoke's second
stage, dynamic pruning of the cached visual tokens during decoding, is the ``dycoke_dp`` reducer of
:mod:`tokenprune_dycoke.decode`, registered by the same hook.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

import tokenprune
from tokenprune import Capabilities, ReduceContext, ReducerParams, Selection, TokenReducer
from tokenprune.errors import ReducerInputError
from tokenprune.layout import TokenLayout, refuse_unknown_frames
from tokenprune_dycoke.decode import DyCokeDecode


class DyCoke(TokenReducer):
    """Prune each video's frames against the frame before them (pairs) and two before (windows of four).

    Per sample and video, with ``F`` frames of ``T`` tokens each (the layout's ``frame``; a Qwen
    temporal patch is one frame) and ``k = int(keep * T)``:

    * frame ``2j + 1`` keeps the ``k`` tokens whose cosine similarity to the token at the same
      position of frame ``2j`` is lowest;
    * frame ``4j + 2`` keeps the ``k`` tokens least similar to frame ``4j``, for ``4j < F - 4``
      (so the last window is only pair-pruned, as in the official loop);
    * every other frame is kept whole, except that with ``F`` odd the last, unpaired frame is
      dropped (the official loop never appends it; ``drop_unpaired_frame: false`` keeps it whole);
      a single-frame video is kept whole.

    Image tokens, newline tokens and protected tokens are kept. Similarities are computed in float32
    on the tokens the stage receives (at ``post_projector``, the projected video features, as the
    official code). The result is a :class:`Selection` in sequence order. The budget is that count
    (:meth:`stage_budget`): a fractional ``keep`` is the share each pruned frame keeps, DyCoke's
    pruning ratio ``K`` being ``1 - keep`` (README default ``K = 0.7``: ``keep: 0.3``); an integer
    ``keep`` is the tokens each pruned frame keeps. Cost: ``O(N D)``.
    """

    name = "dycoke"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector"}), media=frozenset({"video"}))

    class Params(ReducerParams):
        drop_unpaired_frame: bool = Field(
            default=True,
            description=(
                "With an odd number of frames, drop the last frame (True: the official code's loop never keeps it) "
                "or keep it whole (False)."
            ),
        )

    def stage_budget(self, keep: float | int, valid: Tensor, protected: Tensor, layout: TokenLayout | None) -> Tensor:
        """Per sample: every non-video token, plus DyCoke's count for each video (see the class docstring)."""
        plans = [self._plan(keep, valid, protected, layout, b) for b in range(int(valid.shape[0]))]
        return torch.tensor([int(p.sum()) for p in plans], dtype=torch.long, device=valid.device)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        """Select per sample (batch-independent); ``tokens`` is ``(B, N, D)``."""
        keep = torch.zeros(ctx.valid.shape, dtype=torch.bool, device=tokens.device)
        for b in range(ctx.batch_size):
            keep[b] = self._plan(ctx.keep, ctx.valid, ctx.protected, ctx.layout, b, tokens[b])
        return Selection.from_mask(keep)

    def _plan(
        self,
        keep: float | int,
        valid: Tensor,
        protected: Tensor,
        layout: TokenLayout | None,
        b: int,
        tokens: Tensor | None = None,
    ) -> Tensor:
        """``(N,)`` bool kept tokens of sample ``b``; without ``tokens``, any ``k`` per pruned frame (for the count)."""
        out = valid[b].clone()
        if layout is None:
            return out
        frames_of = layout.video[b] & valid[b] & ~layout.newline[b] & ~protected[b]
        refuse_unknown_frames(layout, frames_of, b, self.name)
        for video in layout.image[b][frames_of].unique().tolist():
            members = (frames_of & (layout.image[b] == video)).nonzero().squeeze(1)
            frames = _frames(layout.frame[b, members], members, b, video)
            for idx, ref in _pruned_against(len(frames), self.params.drop_unpaired_frame):
                target = frames[idx]
                out[target] = False
                if ref is None:  # the dropped unpaired frame
                    continue
                k = min(keep, int(target.numel())) if isinstance(keep, int) else int(keep * int(target.numel()))
                if tokens is None:
                    out[target[:k]] = True
                    continue
                sim = torch.nn.functional.cosine_similarity(tokens[target].float(), tokens[frames[ref]].float(), dim=-1)
                order = sorted(range(int(target.numel())), key=lambda i: (float(sim[i]), i))
                out[target[torch.tensor(order[:k], dtype=torch.long, device=target.device)]] = True
        return out


def _frames(frame: Tensor, members: Tensor, b: int, video: int) -> list[Tensor]:
    """The token indices of each frame of one video, frames in order; all frames must hold as many tokens."""
    frames = [members[frame == f] for f in frame.unique().tolist()]
    sizes = {int(f.numel()) for f in frames}
    if len(sizes) > 1:
        raise ReducerInputError(
            f"reducer 'dycoke': sample {b}, video {video}: frames hold {sorted(sizes)} tokens; DyCoke compares "
            "the tokens of frames position by position, so every frame must hold as many (run it before any other "
            "stage reduces the video's tokens)"
        )
    return frames


def _pruned_against(num_frames: int, drop_unpaired: bool) -> list[tuple[int, int | None]]:
    """``(frame, reference frame)`` for every pruned frame (``None``: the dropped unpaired last frame).

    A single-frame video is kept whole (the official loop would have nothing to concatenate).
    """
    if num_frames < 2:
        return []
    pruned: dict[int, int | None] = {i + 1: i for i in range(0, num_frames - 1, 2)}
    pruned.update({i + 2: i for i in range(0, num_frames - 4, 4)})
    if num_frames % 2 == 1 and drop_unpaired:
        pruned[num_frames - 1] = None
    return sorted(pruned.items())


tokenprune_register_reducers = tokenprune.plugins.reducers_hook(DyCoke, DyCokeDecode)


@tokenprune.hookimpl
def tokenprune_register_pipelines(registry: tokenprune.plugins.PipelineRegistry) -> None:
    ttm = {"at": "post_projector", "tokens": "video", "reducer": "dycoke", "keep": 0.3}
    dp = {"at": {"decode": 3}, "tokens": "video", "reducer": "dycoke_dp", "keep": 0.3}
    registry.add(
        "dycoke-llava-ov",
        {"stages": [ttm, dp]},
        paper="DyCoke (Tao et al., CVPR 2025), https://arxiv.org/abs/2411.15024",
        table=(
            "the official README's lmms-eval command on LLaVA-OneVision-7B (dycoke_k=0.7, dycoke_l=3, dycoke_p=0.7): "
            "temporal merging keeping 30% of each pruned frame, then dynamic pruning from decoding layer 3 keeping 30%"
        ),
        description="DyCoke: temporal token merging of the video, then dynamic pruning of its cached tokens",
    )
