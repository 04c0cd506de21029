"""FastVID: the reducer against a re-reading of the official code, batches, the contract, the preset, the engine.

The reference follows https://github.com/LunarShen/FastVID at commit a40a109cb8df20e8c2c17c6850f8269717369990,
``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`` (``Qwen2Model.forward``, the
block between the ``FastVID`` markers: DySeg, the anchor distribution, ATS, the parallel density scores, DTM for
single-frame and for multi-frame segments), written here loop for loop on one video's ``(F, T, D)`` tokens. Its
inputs that tokenprune has no counterpart for are given as the plugin reads them: the frames' global features are
the mean of their tokens (the official Qwen2.5-VL file's ``video_embeds...mean(1)``; LLaVA-OneVision's SigLIP head
there), the attention is the same ``(F, T)`` scores.
"""

from __future__ import annotations

import dataclasses

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from engine_fixtures import forward
from pydantic import ValidationError
from tokenprune_fastvid import FastVID
from tokenprune_fastvid.algorithm import anchor_counts, segment_lengths

import tokenprune as tp
from tokenprune.layout import TokenLayout
from tokenprune.testing import check_reducer, make_reduce_inputs

# --- the official code, re-read ------------------------------------------------------------------------------


def _segments(video, c, tau):
    frame_num = video.shape[0]
    frame_global_features = video.mean(1)
    frame_global_features = frame_global_features / frame_global_features.norm(dim=1, keepdim=True)
    similarity_matrix = (frame_global_features[:-1] * frame_global_features[1:]).sum(dim=1)
    cut_indices_topk = torch.topk(similarity_matrix, c - 1, largest=False).indices
    cut_indices_cos = torch.nonzero(similarity_matrix < tau, as_tuple=False).squeeze(1)
    cut_indices = torch.unique(torch.cat([cut_indices_topk, cut_indices_cos])).sort().values
    padded = F.pad(cut_indices, (1, 1), value=-1)
    padded[-1] = frame_num - 1
    return padded.diff().tolist()


def _density_score(tmp):
    n, dim = tmp.shape[1], tmp.shape[2]
    dist_matrix = torch.cdist(tmp.float(), tmp.float()) / (dim**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=4, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    # The official `density + torch.rand(density.shape) * 1e-6` breaks ties at random; a random draw cannot be
    # compared, so here a tiny offset decreasing with the index (ties to the lower index, as the plugin).
    density = density.double() - torch.arange(n, dtype=torch.float64) * 1e-12
    density_mask = (density[:, None, :] > density[:, :, None]).type(tmp.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist_0, _ = (dist_matrix * density_mask + dist_max * (1 - density_mask)).min(dim=-1)
    return dist_0 * density


def _dtm(targets, pool, beta):
    """The official merge: ``targets`` ``(A, k, D)`` into which every token of ``pool`` ``(A, m, D)`` is averaged."""
    to_be_merge_tokens = pool / pool.norm(dim=-1, keepdim=True)
    merge_target_tokens = targets / targets.norm(dim=-1, keepdim=True)
    similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(pool.shape[0], pool.shape[1], targets.shape[1], dtype=pool.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=beta)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), pool) / counts
    return avg_weights * targets + (1 - avg_weights) * aggregated_hidden


def official_fastvid(video, attn, retain=0.1, c=8, tau=0.9, d=0.4, p=4, beta=0.6):
    """The official block on one video: ``(tokens, kept)``, the output tokens in sequence order and their flat
    indices into the ``F * T`` grid (no text around the video)."""
    frame_num, frame_token_len, dim = video.shape
    batchframe_indices = torch.arange(frame_num).unsqueeze(1)
    alltoken_indices = torch.arange(frame_num * frame_token_len).view(frame_num, frame_token_len)
    segment_sizes = _segments(video, c, tau)
    final_tokens, keep_indexs = [], []
    frame_retain_num = int(frame_token_len * retain)
    frame_salient_num = frame_retain_num - int(frame_retain_num * d)
    frm_context_num_list = torch.zeros(frame_num, dtype=torch.int)
    frame_context_num = frame_retain_num - frame_salient_num
    offset = 0
    for seg_i_len in segment_sizes:
        temp_num = (seg_i_len + p - 1) // p
        cur_frm_context_num = frame_context_num * seg_i_len // temp_num
        end = offset + seg_i_len
        mask = torch.arange(seg_i_len - 1, -1, -1) % p == 0
        frm_context_num_list[offset:end][mask] = cur_frm_context_num
        offset = end
    # ATS
    salient_indexes = torch.topk(attn, frame_salient_num, dim=1).indices
    batch_indices = batchframe_indices.expand(-1, frame_salient_num)
    final_tokens.append(video[batch_indices, salient_indexes].view(-1, dim))
    keep_indexs.append(alltoken_indices[batch_indices, salient_indexes].view(-1))
    # density scores of the other tokens
    rest = frame_token_len - frame_salient_num
    all_indices = torch.arange(frame_token_len).unsqueeze(0).expand(frame_num, -1)
    all_indices_mask = torch.ones_like(all_indices, dtype=torch.bool)
    all_indices_mask.scatter_(1, salient_indexes, False)
    filtered_indices = all_indices[all_indices_mask].view(frame_num, rest)
    batch_indices = batchframe_indices.expand(-1, rest)
    token_filtered = video[batch_indices, filtered_indices]
    alltoken_filtered_indices = alltoken_indices[batch_indices, filtered_indices]
    density_score = _density_score(token_filtered)
    # DTM for single-frame segments
    sampled_indexs = torch.topk(density_score, k=frame_context_num, dim=-1).indices
    batch_indices = batchframe_indices.expand(-1, frame_context_num)
    frm_context_tokens = _dtm(token_filtered[batch_indices, sampled_indexs], token_filtered, beta)
    frm_context_global_indexes = alltoken_filtered_indices[batch_indices, sampled_indexs]
    single = frm_context_num_list == frame_context_num
    final_tokens.append(frm_context_tokens[single].view(-1, dim))
    keep_indexs.append(frm_context_global_indexes[single].view(-1))
    # DTM for multi-frame segments
    idx_seg_start = 0
    for seg_i_len in segment_sizes:
        if seg_i_len > 1:
            seg = slice(idx_seg_start, idx_seg_start + seg_i_len)
            cur_list = frm_context_num_list[seg]
            cur_seg_context_num = int(cur_list[-1])
            target_mask = cur_list > frame_context_num
            target_num = int(target_mask.sum())
            cur_score = density_score[seg][target_mask]
            cur_target = token_filtered[seg][target_mask]
            pool = token_filtered[seg].reshape(1, -1, dim).expand(target_num, -1, -1)
            cur_indices = alltoken_filtered_indices[seg][target_mask]
            sampled = torch.topk(cur_score, k=cur_seg_context_num, dim=-1).indices
            batch_indices = batchframe_indices[:target_num].expand(-1, cur_seg_context_num)
            cur_context = _dtm(cur_target[batch_indices, sampled], pool, beta)
            final_tokens.append(cur_context.view(-1, dim))
            keep_indexs.append(cur_indices[batch_indices, sampled].view(-1))
        idx_seg_start += seg_i_len
    hidden = torch.cat(final_tokens, dim=0)
    kept = torch.cat(keep_indexs, dim=0)
    order = torch.argsort(kept)
    return hidden[order], kept[order]


# --- inputs ---------------------------------------------------------------------------------------------------


def _video(scenes, per_frame=36, dim=24, seed=0, noise=0.4):
    """A video of scenes (``scenes``: frames per scene): a scene's frames share a base picture, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for length in scenes:
        base = torch.randn(per_frame, dim, generator=gen) + torch.randn(1, dim, generator=gen) * 2
        frames += [base + noise * torch.randn(per_frame, dim, generator=gen) for _ in range(length)]
    return torch.stack(frames), torch.rand(sum(scenes), per_frame, generator=gen)


def _ctx(videos, keep, pad=0):
    """One video per sample (``videos[b]``: ``(x, attn)``) as a post-projector batch, a text-free layout."""
    per_frame, dim = videos[0][0].shape[1:]
    side = int(per_frame**0.5)
    grids = [(x.shape[0] * side, side) for x, _ in videos]
    tokens, ctx = make_reduce_inputs(grids=grids, newlines=False, keep=keep, dim=dim)
    attention = torch.full(ctx.valid.shape, float("-inf"))
    layouts = []
    for b, (x, attn) in enumerate(videos):
        n = x.shape[0] * per_frame
        tokens[b, :n] = x.reshape(n, dim)
        attention[b, :n] = attn.reshape(n)
        lay = TokenLayout.cat([TokenLayout.grid(side, side, frame=f, video=True) for f in range(x.shape[0])])
        if tokens.shape[1] > n:
            lay = TokenLayout.cat([lay, TokenLayout.grid(1, tokens.shape[1] - n)])
        layouts.append(lay)
    layout = TokenLayout(**{f.name: torch.cat([getattr(x, f.name) for x in layouts]) for f in dataclasses.fields(lay)})
    budget = FastVID().stage_budget(keep, ctx.valid, ctx.protected, layout)
    return tokens, dataclasses.replace(
        ctx, layout=layout, keep=keep, budget=budget, vision_attention=attention, vision_valid=ctx.valid.clone()
    )


def _run(params, videos, keep):
    tokens, ctx = _ctx(videos, keep)
    merge = FastVID(params).reduce(tokens, ctx)
    merged, sizes, selection = merge.apply(tokens, ctx.sizes, ctx.valid)
    return merge, merged, sizes, selection, ctx


# --- against the official code --------------------------------------------------------------------------------

OFFICIAL = {"c": 8, "tau": 0.9, "d": 0.4, "p": 4, "beta": 0.6}


@pytest.mark.parametrize(
    ("scenes", "keep", "params"),
    [
        ([1] * 8, 0.1, {}),  # the defaults: c = 8 cuts 8 frames into single-frame segments
        ([3, 2, 1, 4, 2], 0.25, {"c": 3}),  # segments of 1 to 4 frames, one anchor each
        ([4, 4, 4], 0.25, {"c": 2, "tau": 0.5}),  # tau cuts the scenes apart
        ([2, 3, 1], 0.5, {"c": 2, "beta": 0.3}),
        ([2, 2, 2, 2], 0.3, {"c": 1, "d": 0.6, "p": 2}),
    ],
)
def test_it_equals_the_official_code(scenes, keep, params):
    x, attn = _video(scenes, seed=len(scenes))
    _, merged, _, selection, _ = _run(params, [(x, attn)], keep)
    expected, kept = official_fastvid(x, attn, keep, **{**OFFICIAL, **params})
    assert selection.indices[0].tolist() == kept.tolist()
    torch.testing.assert_close(merged[0], expected, rtol=0, atol=1e-5)
    cfg = {**OFFICIAL, **params}
    assert segment_lengths(x, cfg["c"], cfg["tau"]) == _segments(x, cfg["c"], cfg["tau"])


def test_the_segments_follow_the_scenes():
    x, _ = _video([3, 5, 2, 6])
    assert segment_lengths(x, 1, 0.5) == [3, 5, 2, 6]  # the threshold alone
    one_cut = segment_lengths(x, 2, -1.0)  # the lowest similarity alone, at a scene's end
    assert len(one_cut) == 2 and one_cut[0] in (3, 8, 10)
    assert segment_lengths(x, 8, 0.5) == _segments(x, 8, 0.5)
    assert len(segment_lengths(x[:3], 8, 0.9)) == 3  # fewer frames than c: every frame its own segment


def test_anchor_frames_are_every_p_th_from_a_segments_end():
    counts, whole = anchor_counts([1, 6, 3], contextual=2, p=4, limit=100)
    # a 6-frame segment: anchors at its frames 5 and 1 (from the end), 2 * 6 // 2 = 6 each, over the segment
    assert counts.tolist() == [2, 0, 6, 0, 0, 0, 6, 0, 0, 6]
    assert whole.tolist() == [False, False, True, False, False, False, True, False, False, True]
    assert anchor_counts([4], contextual=5, p=4, limit=7)[0].tolist() == [0, 0, 0, 7]  # capped at the rest


def test_a_segment_with_several_anchors_merges_each_token_once():
    """A segment longer than ``p`` frames (two anchors here): the kept tokens are the official ones; each other
    token joins one density peak of the segment (the official adds it to one peak of every anchor), so the
    merged tokens of that segment differ and everything else is equal."""
    x, attn = _video([6, 1, 1], seed=5)
    params = {"c": 3, "tau": 0.5}
    merge, merged, sizes, selection, _ = _run(params, [(x, attn)], 0.25)
    expected, kept = official_fastvid(x, attn, 0.25, **{**OFFICIAL, **params})
    assert selection.indices[0].tolist() == kept.tolist()
    outside = kept >= 6 * 36
    torch.testing.assert_close(merged[0][outside], expected[outside], rtol=0, atol=1e-5)
    assert not torch.allclose(merged[0][~outside], expected[~outside], atol=1e-3)
    assert float(sizes[0].sum()) <= 8 * 36  # every token counted once at most
    joined = merge.destination[0] >= 0
    weights = torch.zeros(8 * 36).scatter_add_(0, merge.destination[0][joined], merge.weights[0][joined])
    assert torch.allclose(weights[kept], torch.ones(len(kept)))  # each group's weights sum to one


# --- batches, counts, errors -------------------------------------------------------------------------------------


def test_a_batch_equals_one_by_one():
    videos = [_video([2, 3], seed=1), _video([4], seed=2), _video([1, 1, 2, 1], seed=3)]
    _, merged, _, selection, ctx = _run({"c": 2}, videos, 0.3)
    for b, video in enumerate(videos):
        _, alone, _, alone_sel, _ = _run({"c": 2}, [video], 0.3)
        n = int(alone_sel.counts[0])
        assert selection.indices[b, :n].tolist() == alone_sel.indices[0].tolist()
        torch.testing.assert_close(merged[b, :n], alone[0], rtol=0, atol=0)
        assert int(selection.counts[b]) <= int(ctx.budget[b])


def test_the_budget_is_every_frames_share_and_an_integer_keep_a_share_of_the_tokens():
    x, attn = _video([8])
    _, ctx = _ctx([(x, attn)], 0.1)
    assert int(ctx.budget[0]) == 8 * int(36 * 0.1)  # F R
    _, ctx = _ctx([(x, attn)], 72)  # 72 of 288 tokens: a ratio of 0.25
    assert int(ctx.budget[0]) == 8 * 9
    _, ctx = _ctx([(x, attn)], 0.01)
    assert int(ctx.budget[0]) == 8  # at least one token per frame


def test_bad_params_and_inputs_are_refused():
    for bad in ({"c": 0}, {"p": 0}, {"d": 1.0}, {"d": -0.1}, {"beta": 1.5}, {"tau": 1.5}, {"cuts": 3}):
        with pytest.raises(ValidationError):
            FastVID(bad)
    x, attn = _video([2, 2])
    tokens, ctx = _ctx([(x, attn)], 0.5)
    with pytest.raises(tp.ReducerInputError, match="vision tower's attention"):
        FastVID().reduce(tokens, dataclasses.replace(ctx, vision_attention=None))
    bad = tokens.clone()
    bad[0, 3, 0] = float("nan")
    with pytest.raises(tp.ReducerInputError, match="NaN or infinite"):
        FastVID().reduce(bad, ctx)
    frame = ctx.layout.frame.clone()
    frame[0, 40] = 0
    with pytest.raises(tp.ReducerInputError, match="every frame must hold as many"):
        FastVID().stage_budget(0.5, ctx.valid, ctx.protected, dataclasses.replace(ctx.layout, frame=frame))


def test_image_tokens_are_kept():
    tokens, ctx = make_reduce_inputs(
        grids=[(4, 4)], keep=0.25, reducer=FastVID(), vision=FastVID().needs().vision_attention
    )
    merge = FastVID().reduce(tokens, ctx)
    assert bool(merge.roots[ctx.valid].all())


def test_the_contract():
    check_reducer(FastVID)


def test_the_preset_is_the_papers_main_setting():
    preset = tp.load_pipeline({"preset": "fastvid-10"})
    [stage] = preset.stages
    assert (str(stage.point), stage.reducer, stage.keep, stage.tokens) == ("post_projector", "fastvid", 0.1, "video")


# --- the engine ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "newlines"), [("llava_next_video", 0), ("llava_onevision", 1)])
def test_it_runs_in_a_llava_video_model(family, newlines):
    """The tiny LLaVA-NeXT-Video and LLaVA-OneVision (their towers serve video attention), 8 frames of 2 x 2
    tokens, ``c = 1`` and no threshold: one segment of 8 frames. keep 0.75: R = 3 tokens a frame, 2 by attention
    and 1 density token, so 8 density tokens go to the anchors every ``p = 3`` frames from the end (frames 7, 4,
    1): ``8 // 3 = 2`` each, the other frames' 2 non-salient tokens merged into them (OneVision's newline kept)."""
    t = tm.BUILDERS[family]()
    inputs = t.make_inputs([[tm.Video(8, 56, 56)]])
    stage = {"at": "post_projector", "tokens": "video", "reducer": "fastvid", "keep": 0.75}
    stage["params"] = {"c": 1, "tau": -1.0, "p": 3}
    with tp.apply(t.model, {"stages": [stage]}) as run:
        out = forward(t.model, inputs, t.name).logits
        [stats] = run.stats.last_prefill.stages
    assert torch.isfinite(out).all()
    assert stats.entering == [8 * 4 + newlines]
    assert stats.leaving == [8 * 2 + 3 * 2 + newlines]
    frames = [k // 4 for k in stats.kept[0] if k < 8 * 4]
    assert [frames.count(f) for f in range(8)] == [2, 4, 2, 2, 4, 2, 2, 4]


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_the_qwen_towers_serve_fastvid_their_video_attention(name):
    """The Qwen towers' video attention (once refused by name: now served, tests/test_tower_qwen_videos.py): FastVID
    runs on 4 frames of 2 x 2 tokens and keeps a quarter of them."""
    t = tm.BUILDERS[name]()
    inputs = t.make_inputs([[tm.Video(8, 56, 56)]])
    stage = {"at": "post_projector", "tokens": "video", "reducer": "fastvid", "keep": 0.25}
    with tp.apply(t.model, {"stages": [stage]}) as run:
        out = forward(t.model, inputs, t.name).logits
        [stats] = run.stats.last_prefill.stages
    assert torch.isfinite(out).all()
    assert stats.entering == [16] and stats.leaving == [4]
