"""VidCom2: the contract, independent ports of the official ``vidcom2_compression`` and vLLM's mask, the engine."""

from __future__ import annotations

import dataclasses

import pytest
import tiny_models as tm
import torch
from engine_fixtures import pipe
from tokenprune_vidcom2 import VidCom2, retained_count

import tokenprune as tp
from tokenprune.layout import TokenLayout
from tokenprune.testing import check_reducer, make_reduce_inputs

ALPHAS = [2**k for k in range(-3, 2)]


def _gauss(frames: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    d = ((frames - center) ** 2).sum(-1)
    return sum(torch.exp(-d / (2 * a)) for a in ALPHAS)


def official_vidcom2(flat: torch.Tensor, tpf: int, base_scale: float) -> list[int]:
    """The rows of one video (``(F * T, D)``) that xuyang-liu16/VidCom2 keeps, as a sorted list.

    A re-reading of ``token_compressor/vidcom2/vidcom2.py`` at commit 944a17d (``vidcom2_compression``
    with the ``linear`` mapper, as for Qwen2-VL and LLaVA-OneVision): lowest-variance half of the channels,
    Gaussian scores to the video and frame centres, softmax frame scales, per-frame ``topk(largest=False)``.
    """
    variances = flat.var(dim=0, unbiased=False)
    _, low = torch.topk(variances, k=int(flat.shape[-1] * 0.5), largest=False)
    frames = torch.nn.functional.normalize(flat[:, low].view(-1, tpf, len(low)), dim=-1)
    vid = _gauss(frames, frames.mean(dim=(0, 1), keepdim=True))
    frm = _gauss(frames, frames.mean(dim=1, keepdim=True))
    scores = -vid.mean(dim=-1)
    probs = torch.nn.functional.softmax((scores - scores.max()) / 0.01, dim=0)
    scales = (base_scale * (1 + probs - probs.mean())).clamp(max=1.0)
    ks = (scales * tpf).round().long().clamp(min=1).tolist()
    kept: list[int] = []
    for i, k in enumerate(ks):
        idx = torch.topk((vid + frm)[i], k=k, largest=False, sorted=False).indices.sort().values
        kept += (idx + i * tpf).tolist()
    return kept


def vllm_mask(embeds: torch.Tensor, frames: int, tpf: int, q: float) -> list[int]:
    """The rows vLLM's ``compute_retention_mask`` keeps (``vllm/multimodal/video_prune/vidcom2.py`` at 0f17ee0).

    The official scores and per-frame counts, then the count reconciled to ``int(F T (1 - q))`` (at least
    ``F``) by dropping the highest or adding the lowest similarities.
    """
    total = frames * tpf
    target = max(frames, min(int(total * (1.0 - q)), total))
    variances = embeds.var(dim=0, unbiased=False)
    _, low = torch.topk(variances, k=max(1, int(embeds.size(-1) * 0.5)), largest=False)
    sel = torch.nn.functional.normalize(embeds.index_select(-1, low).view(frames, tpf, -1), dim=-1)
    v = _gauss(sel, sel.mean(dim=(0, 1), keepdim=True))
    sim = v + _gauss(sel, sel.mean(dim=1, keepdim=True))
    probs = torch.nn.functional.softmax((-v.mean(-1) - (-v.mean(-1)).max()) / 0.01, dim=0)
    scales = ((1.0 - q) * (1.0 + probs - probs.mean())).clamp(max=1.0)
    ks = (scales * tpf).round().long().clamp(min=1, max=tpf)
    mask = torch.zeros(frames, tpf, dtype=torch.bool)
    for i in range(frames):
        mask[i, torch.topk(sim[i], k=int(ks[i]), largest=False).indices] = True
    flat, flat_sim = mask.view(-1), sim.view(-1)
    current = int(flat.sum())
    if current > target:
        kept = flat.nonzero().squeeze(-1)
        flat[kept[torch.topk(flat_sim[kept], k=current - target).indices]] = False
    elif current < target:
        free = (~flat).nonzero().squeeze(-1)
        flat[free[torch.topk(flat_sim[free], k=target - current, largest=False).indices]] = True
    return flat.nonzero().squeeze(-1).tolist()


def _video_ctx(frames: list[int], per_frame: tuple[int, int], keep: float | int, seed: int = 0):
    """One video per sample (``frames[b]`` frames of rows x cols), frames shifted apart so their uniqueness differs."""
    r, c = per_frame
    tokens, ctx = make_reduce_inputs(grids=[(f * r, c) for f in frames], newlines=False, keep=keep, seed=seed, dim=24)
    gen = torch.Generator().manual_seed(seed + 1)
    width = tokens.shape[1]
    layouts = []
    for b, f in enumerate(frames):
        shift = torch.randn(f, 1, tokens.shape[2], generator=gen) * torch.rand(f, 1, 1, generator=gen) * 3
        tokens[b, : f * r * c] += shift.expand(f, r * c, -1).reshape(f * r * c, -1)
        lay = TokenLayout.cat([TokenLayout.grid(r, c, frame=i, video=True) for i in range(f)])
        if width > lay.shape[1]:
            lay = TokenLayout.cat([lay, TokenLayout.grid(1, width - lay.shape[1])])
        layouts.append(lay)
    layout = TokenLayout(**{f.name: torch.cat([getattr(x, f.name) for x in layouts]) for f in dataclasses.fields(lay)})
    budget = VidCom2().stage_budget(keep, ctx.valid, ctx.protected, layout)
    return tokens, dataclasses.replace(ctx, layout=layout, budget=budget, keep=keep)


def test_the_contract():
    check_reducer(VidCom2)


@pytest.mark.parametrize("frames", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("keep", [0.25, 0.15, 0.5])
def test_it_keeps_what_vllm_keeps_and_the_official_per_frame_choice(frames, keep):
    tokens, ctx = _video_ctx([frames], (3, 4), keep, seed=frames)
    kept = VidCom2().reduce(tokens, ctx).tolist()[0]
    n = frames * 12
    assert kept == vllm_mask(tokens[0, :n], frames, 12, 1.0 - keep)
    assert len(kept) == int(ctx.budget[0]) == retained_count(12, frames, keep)
    official = set(official_vidcom2(tokens[0, :n], 12, keep))
    # The official count is the sum of per-frame rounded quotas; the exact count adds or drops the difference.
    assert len(official.symmetric_difference(kept)) == abs(len(official) - len(kept))


def test_frames_get_budgets_by_uniqueness():
    """A frame far from the video's mean keeps more tokens than the others (the official frame scales)."""
    tokens, ctx = _video_ctx([4], (3, 4), 0.25)
    gen = torch.Generator().manual_seed(3)
    tokens[0] = 1.0 + 0.1 * torch.randn(tokens.shape[1:], generator=gen)  # every channel alike, frames alike...
    tokens[0, 24:36] -= 2.0  # ...but frame 2, which points the other way
    kept = torch.tensor(VidCom2().reduce(tokens, ctx).tolist()[0])
    per_frame = torch.bincount(kept // 12, minlength=4).tolist()
    assert per_frame[2] == max(per_frame) > min(per_frame)
    assert sum(per_frame) == 12


def test_an_integer_keep_is_the_count_per_video():
    tokens, ctx = _video_ctx([5], (3, 4), 17)
    assert int(ctx.budget[0]) == 17
    assert int(VidCom2().reduce(tokens, ctx).counts[0]) == 17
    _, small = _video_ctx([5], (3, 4), 2)
    assert int(small.budget[0]) == 5  # at least one per frame, as vLLM's floor


def test_batch_of_videos_of_different_lengths_matches_one_by_one():
    tokens, ctx = _video_ctx([4, 7, 2], (2, 3), 0.3)
    batch = VidCom2().reduce(tokens, ctx).tolist()
    for b, f in enumerate([4, 7, 2]):
        assert batch[b] == vllm_mask(tokens[b, : f * 6], f, 6, 0.7)


def test_frames_of_different_sizes_and_nan_are_refused():
    tokens, ctx = _video_ctx([2], (2, 5), 0.5)
    frame = ctx.layout.frame.clone()
    frame[0, 9] = 1
    with pytest.raises(tp.ReducerInputError, match="every frame must hold as many"):
        VidCom2().stage_budget(0.5, ctx.valid, ctx.protected, dataclasses.replace(ctx.layout, frame=frame))
    tokens[0, 3, 0] = float("nan")
    with pytest.raises(tp.ReducerInputError, match="NaN or infinite"):
        VidCom2().reduce(tokens, ctx)


class _Plugin:
    @staticmethod
    @tp.hookimpl
    def tokenprune_register_reducers(registry):
        registry.add(VidCom2)


@pytest.mark.parametrize(
    ("family", "video", "expected"),
    [
        ("llava_onevision", tm.Video(4, 56, 56), 4 + 1),  # 4 frames of 2 x 2 keep int(0.25 * 16), then the newline
        ("qwen2_vl", tm.Video(8, 56, 56), 4),  # 4 temporal patches of 2 x 2
    ],
)
def test_in_the_engine_only_the_video_is_pruned(family, video, expected):
    """With an image in the prompt, `tokens: video` prunes the video to its exact count and leaves the image."""
    tiny = tm.BUILDERS[family]()
    stage = pipe(("post_projector", "vidcom2", 0.25))
    stage["stages"][0]["tokens"] = "video"
    inputs = tiny.make_inputs([[(56, 56), video]])
    with tp.apply(tiny.model, stage, plugins=tp.get_plugin_manager(plugins=[_Plugin()])) as run, torch.no_grad():
        tiny.model(**inputs)
    stats = run.stats.forwards[0].stages[0]
    assert stats.leaving == [expected]
    assert bool(stats.layout.video.all())
