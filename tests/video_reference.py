"""What the frame-wise video reducers keep on one video, from their official algorithms, for the family tests.

``tests/test_glm_video.py`` and ``tests/test_family_videos.py`` compare a ``tokens: video`` stage's kept tokens with
these on the model's own per-frame features; the reducers' own tests compare the algorithms with the official code.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def video_stage(reducer: str, keep: float) -> dict[str, Any]:
    """A pipeline of one ``post_projector`` stage of ``reducer`` on the video tokens."""
    return {"stages": [{"at": "post_projector", "tokens": "video", "reducer": reducer, "keep": keep}]}


def run_video_stage(case: Any, reducer: str, keep: float) -> tuple[dict[str, Any], Any]:
    """The check kit's padded batch of ``case`` and the stats of ``reducer``'s video stage on it (one forward)."""
    import tokenprune as tp

    batch = case.padded_batch()
    with tp.apply(case.model, video_stage(reducer, keep)) as run:
        case.forward(batch)
    (stage,) = run.stats.last_prefill.stages
    return batch, stage


def expected_video_keep(reducer: str, x: Tensor, keep: float) -> Tensor:
    """``(F, T)`` bool: what ``reducer`` (``evs`` or ``vidcom2``) keeps of one video's ``(F, T, D)`` features."""
    from tokenprune_evs import retained_count as evs_count
    from tokenprune_evs import retention_mask as evs_mask
    from tokenprune_vidcom2 import retained_count as vidcom2_count
    from tokenprune_vidcom2 import retention_mask as vidcom2_mask

    frames, per_frame = int(x.shape[0]), int(x.shape[1])
    if reducer == "evs":
        return evs_mask(x, evs_count(per_frame, frames, keep))
    if reducer == "vidcom2":
        return vidcom2_mask(x, vidcom2_count(per_frame, frames, keep), keep)
    raise ValueError(f"no reference for {reducer!r}: evs or vidcom2")
