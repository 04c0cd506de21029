"""HoliTom: both stages against a re-reading of the official code, the contract, the preset, the engine.

The reference follows https://github.com/cokeshao/HoliTom at commit e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0:
``holitom/llava_arch.py`` (``select_static_windows``, ``get_static_dynamic_features``, ``cluster_dpc_knn``,
``merge_tokens_by_attention_density``, ``merge_tokens_by_density``, ``merge_tokens_by_clustering`` and ``holitom``
with ``mm_newline_position`` ``one_token``, the video path of ``prepare_inputs_labels_for_multimodal``), and
``holitom/modeling_qwen2.py`` (the in-LLM merge at ``HOLITOM_k``), written here loop for loop.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import tiny_models as tm
import torch
from engine_fixtures import forward, pipe
from tokenprune_holitom import HoliTom, HoliTomMerge

import tokenprune as tp
from tokenprune import InsertionPoint
from tokenprune.layout import TokenLayout
from tokenprune.testing import check_reducer, make_reduce_inputs

# --- the official pre-LLM code, re-read -------------------------------------------------------------


def _dpc_knn(x, cluster_num, k):
    _, n, dim = x.shape
    dist = torch.cdist(x.float(), x.float()) / (dim**0.5)
    nearest, _ = torch.topk(dist, k, dim=-1, largest=False)
    density = (-(nearest**2).mean(dim=-1)).exp()
    # The official `density + torch.rand(density.shape) * 1e-6` breaks ties at random; a random draw cannot be
    # compared, so here the same kind of tiny offset decreasing with the index (ties to the lower index).
    density = density.double() - torch.arange(n, dtype=torch.float64) * 1e-12
    mask = (density[:, None, :] > density[:, :, None]).double()
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent, _ = (dist * mask + dist_max * (1 - mask)).min(dim=-1)
    _, centers = (parent * density).topk(cluster_num, dim=-1)
    return centers, dist


def _select_static_windows(sim, frames, tau, max_window):
    matrix = torch.ones((frames, frames, sim.shape[1]))
    for start in range(frames - 1):
        cum = torch.cumprod(sim[start:] > tau, dim=0)
        matrix[start, start + 1 : start + 1 + len(cum)] = cum
    lengths = (torch.arange(frames).unsqueeze(0) - torch.arange(frames).unsqueeze(1)).clamp(min=0)
    count = (matrix.sum(dim=-1) * lengths).float()
    dp = torch.zeros(frames)
    prev = torch.zeros(frames, dtype=torch.long)
    for i in range(frames):
        best, best_j = (dp[i - 1] if i > 0 else 0), i
        for window in range(2, min(i + 1, max_window) + 1):
            j = i - window
            value = (dp[j] if j >= 0 else 0) + count[j + 1, i]
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    out, i = [], frames - 1
    while i >= 0:
        out.append((prev[i].item(), i))
        i = prev[i].item() - 1
    return out[::-1], dp[-1].item()


def _clustering(feat, targets, dist, cluster_num, beta):
    batch, n, _ = feat.shape
    others = torch.stack([torch.arange(n)[~torch.isin(torch.arange(n), targets[b])] for b in range(batch)])
    other_feat = torch.gather(feat, 1, others.unsqueeze(-1).expand(-1, -1, feat.size(-1)))
    dist = torch.gather(dist, 1, others.unsqueeze(-1).expand(-1, -1, dist.size(-1)))
    dist = torch.gather(dist, 2, targets.unsqueeze(1).expand(-1, dist.size(1), -1))
    cluster = torch.argmin(dist, dim=-1)
    out = []
    for b in range(batch):
        tokens = []
        for i in range(cluster_num):
            mask = cluster[b] == i
            if mask.any():
                tokens.append(beta * feat[b][targets[b][i]] + (1 - beta) * other_feat[b][mask].mean(dim=0))
            else:
                tokens.append(feat[b][targets[b][i]])
        out.append(torch.stack(tokens))
    return torch.stack(out)


def _attention_density(feat, attn, pos, ratio, d, beta, k):
    batch, n, dim = feat.shape
    dominant = round(math.ceil(n * ratio) * (1 - d))
    contextual = math.ceil(n * ratio) - dominant
    mask = torch.ones(batch, n, dtype=torch.bool)
    if dominant > 0:
        mask.scatter_(1, attn.topk(dominant, dim=1).indices, False)
    dom_feat = feat.masked_select(~mask.unsqueeze(-1)).view(batch, dominant, dim)
    dom_pos = pos.masked_select(~mask).view(batch, dominant)
    if contextual > 0:
        filtered = feat.masked_select(mask.unsqueeze(-1)).view(batch, n - dominant, dim)
        ctx_pos = pos.masked_select(mask).view(batch, n - dominant)
        targets, dist = _dpc_knn(filtered, contextual, min(k, contextual))
        targets = torch.sort(targets, dim=-1)[0]
        ctx_pos = torch.stack([ctx_pos[b][targets[b]] for b in range(batch)])
        ctx_feat = _clustering(filtered, targets, dist, contextual, beta)
    else:
        ctx_feat, ctx_pos = feat.new_zeros(batch, 0, dim), pos.new_zeros(batch, 0)
    return torch.cat([dom_feat, ctx_feat], 1), torch.cat([dom_pos, ctx_pos], 1)


def _density(feat, pos, ratio, beta, k):
    n = feat.shape[1]
    clusters = round(n * ratio)
    if clusters <= 0:
        return feat.new_zeros(1, 0, feat.shape[-1]), pos.new_zeros(1, 0)
    targets, dist = _dpc_knn(feat, clusters, min(k, clusters))
    targets = torch.sort(targets, dim=-1)[0]
    return _clustering(feat, targets, dist, clusters, beta), torch.stack([pos[0][targets[0]]])


def official_holitom(x, attn, retain, tau=0.8, beta=0.6, d=0.0, k=7, max_window=1024):
    """The official video path on one video's ``(F, T, D)`` tokens (after the 2-D pool): ``(tokens, places)``,
    each output token with the ``(frame, place)`` it is filed under (a static token: its segment's first frame)."""
    frames, per_frame, _ = x.shape
    normed = torch.nn.functional.normalize(x, p=2, dim=-1)
    sim = torch.nn.functional.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    windows, reduced = _select_static_windows(sim, frames, tau, max_window)
    total = frames * per_frame
    ratio = min(retain / ((total - reduced) / total), 1)
    feats, places = [], []
    for start, end in windows:
        everything = torch.arange(per_frame).unsqueeze(0)
        if start == end:
            static = torch.zeros(per_frame, dtype=torch.bool)
        else:
            static = torch.all(sim[start:end, :] > tau, dim=0)
        dyn, dyn_pos = _attention_density(
            x[start : end + 1, ~static], attn[start : end + 1, ~static],
            everything[:, ~static].expand(end - start + 1, -1), ratio, d, beta, k,
        )  # fmt: skip
        if start != end:
            st, st_pos = _density(
                x[start : end + 1, static].mean(dim=0).unsqueeze(0), everything[:, static], ratio, beta, k
            )
            feats.append(st.flatten(0, 1))
            places += [(start, int(p)) for p in st_pos[0]]
        feats.append(dyn.flatten(0, 1))
        places += [(start + f, int(p)) for f in range(end - start + 1) for p in dyn_pos[f]]
    return torch.cat(feats), places


def _video(frames=8, side=4, dim=24, seed=0, still=(0, 5)):
    """A video whose frames ``still[0] .. still[1]`` share a static left half (small noise), the rest moving."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(side * side, dim, generator=gen)
    x = torch.randn(frames, side * side, dim, generator=gen)
    left = (torch.arange(side * side) % side) < side // 2
    for f in range(*still):
        x[f, left] = base[left] + 0.05 * torch.randn(int(left.sum()), dim, generator=gen)
    attn = torch.rand(frames, side * side, generator=gen)
    return x, attn


def _ctx(x, attn, keep):
    frames, per_frame, dim = x.shape
    side = math.isqrt(per_frame)
    tokens, ctx = make_reduce_inputs(grids=[(frames * side, side)], newlines=False, keep=keep, dim=dim)
    tokens[0] = x.reshape(-1, dim)
    layout = TokenLayout.cat([TokenLayout.grid(side, side, frame=f, video=True) for f in range(frames)])
    return tokens, dataclasses.replace(
        ctx, layout=layout, keep=keep, vision_attention=attn.reshape(1, -1), vision_valid=ctx.valid.clone()
    )


@pytest.mark.parametrize(
    ("retain", "params", "seed"),
    [(0.15, {}, 0), (0.25, {}, 1), (0.3, {"contextual": 0.5}, 2), (0.5, {"tau": 0.6, "beta": 0.3, "k": 3}, 3)],
)
def test_the_pre_llm_stage_equals_the_official_code(retain, params, seed):
    x, attn = _video(seed=seed)
    tokens, ctx = _ctx(x, attn, retain)
    torch.manual_seed(seed)
    expected, places = official_holitom(
        x, attn, retain, **{"d" if k == "contextual" else k: v for k, v in params.items()}
    )
    merge = HoliTom(params).reduce(tokens, ctx)
    merged, sizes, selection = merge.apply(tokens, ctx.sizes, ctx.valid)
    per_frame = x.shape[1]
    ours = [(int(i) // per_frame, int(i) % per_frame) for i in selection.indices[0] if i >= 0]
    order = sorted(range(len(places)), key=lambda i: places[i])
    assert ours == [places[i] for i in order]
    torch.testing.assert_close(merged[0, : len(ours)], expected[order], rtol=0, atol=1e-5)
    static = [p for p in places if p[0] == 0 and sizes[0, ours.index(p)] > 1]
    assert static, "the video's static half was merged over time"
    assert float(sizes[0, : len(ours)].sum()) <= x.shape[0] * per_frame


def test_the_segments_follow_the_static_frames():
    from tokenprune_holitom.algorithm import frame_similarity, static_windows

    x, _ = _video(frames=8, still=(2, 6))
    segments, saved = static_windows(frame_similarity(x), 0.8, 1024)
    assert (2, 5) in segments and saved == 8 * 3
    short, _ = static_windows(frame_similarity(x), 0.8, 2)
    assert all(e - s + 1 <= 2 for s, e in short)


# --- the official in-LLM merge, re-read ----------------------------------------------------------------


def official_inner_merge(hidden, attn, ratio_r):
    """``modeling_qwen2.py``'s block at ``layer_idx == HOLITOM_k`` on ``(1, n, D)`` visual hidden states."""
    n = hidden.shape[1]
    top = attn.topk(round(n * (1 - ratio_r))).indices
    hidden = hidden.clone()
    others = torch.arange(n)[~torch.isin(torch.arange(n), top)]
    a, b = hidden[:, others, :], hidden[:, top, :]
    sim = torch.bmm(a, b.transpose(1, 2)) / (
        a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True).transpose(1, 2)
    )
    _, best = sim.max(dim=-1)
    for i in range(len(others)):
        t = top[best[0, i]]
        hidden[0, t, :] = (hidden[0, t, :] + hidden[0, others[i], :]) / 2
    keep = top.sort().values
    return hidden[0, keep], keep


@pytest.mark.parametrize(("n", "r"), [(24, 0.5), (31, 0.5), (20, 0.75)])
def test_the_in_llm_merge_equals_the_official_loop(n, r):
    tokens, ctx = make_reduce_inputs(
        grids=[(1, n)], newlines=False, keep=1 - r, at=InsertionPoint("layer", 18), dim=16, reducer=HoliTomMerge()
    )
    merge = HoliTomMerge().reduce(tokens, ctx)
    merged, _, selection = merge.apply(tokens, ctx.sizes, ctx.valid)
    expected, keep = official_inner_merge(tokens[:, :n].clone(), ctx.attention["last"][0, :n], r)
    assert selection.indices[0].tolist() == keep.tolist()
    torch.testing.assert_close(merged[0], expected, rtol=0, atol=1e-5)


# --- contract, preset, engine -------------------------------------------------------------------------


def test_the_contract():
    check_reducer(HoliTomMerge)


def test_the_preset_composes_both_stages():
    preset = tp.load_pipeline({"preset": "holitom-15"})
    assert [(str(s.point), s.reducer, s.keep) for s in preset.stages] == [
        ("post_projector", "holitom", 0.15),
        ("layer 18", "holitom_merge", 0.5),
    ]


@pytest.mark.parametrize(("family", "newlines"), [("llava_next_video", 0), ("llava_onevision", 1)])
def test_both_stages_run_in_a_llava_video_model(family, newlines):
    """The tiny LLaVA-NeXT-Video and LLaVA-OneVision (their towers serve video attention), a video of 8 frames of
    2 x 2 tokens whose first four frames are one still picture: the pre-LLM stage merges the still frames' tokens
    over time (a static token stands for 4 frames) and keeps the rest by attention (OneVision's video newline
    kept); the in-LLM stage halves what is left at layer 2."""
    t = tm.BUILDERS[family]()
    inputs = t.make_inputs([[tm.Video(8, 56, 56)]])
    frames = inputs["pixel_values_videos"]
    frames[:, 1:4] = frames[:, :1]
    pipeline = pipe(("post_projector", "holitom", 0.5), ({"layer": 2}, "holitom_merge", 0.5))
    for stage in pipeline["stages"]:
        stage["tokens"] = "video"
    with tp.apply(t.model, pipeline) as run:
        out = forward(t.model, inputs, t.name).logits
        first, second = run.stats.last_prefill.stages
    assert torch.isfinite(out).all()
    # frames 0-3 static (4 places x 3 repeats saved: 12), r' = 0.5 * 32 / 20 = 0.8: round(4 * 0.8) = 3 static
    # clusters filed under frame 0, and each moving frame keeps ceil(4 * 0.8) = 4 tokens
    assert first.entering == [32 + newlines] and first.leaving == [3 + 16 + newlines]
    kept = first.kept[0]
    assert all(k < 4 for k in kept[:3]) and kept[3:] == list(range(16, 32 + newlines))
    assert second.entering == first.leaving
    assert second.leaving[0] == round(second.entering[0] * 0.5)  # the official round(n (1 - r)), newline counted
