"""PruMerge(+): the contract, an independent port of the official selection, the budget cap, the engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tiny_models as tm
import torch
from engine_fixtures import pipe
from tokenprune_prumerge import PruMerge

import tokenprune as tp
from tokenprune.testing import check_reducer, make_reduce_inputs


def official_selection(cls_attn: torch.Tensor, plus: bool) -> list[int]:
    """The patches 42Shawn/LLaVA-PruMerge keeps of one image (before its merge), as a sorted list.

    A re-reading of ``llava/model/multimodal_encoder/clip_encoder.py`` at commit 097c041: ``outlier_dectection``
    (numpy percentiles, ``> Q3 + 1.5 IQR``), ``topk(cls_attn, int(N * ratio))``; for PruMerge+
    (``token_prune_merge_advanced_plus``, adaptive) the positions ``arange(0, 575, int(step_length / 3))`` not
    already kept, with ``step_length = int(1 / ratio)`` (575 is ``N - 1`` for LLaVA-1.5's 576 patches).
    """
    attn = cls_attn.to(torch.float32).numpy().flatten()
    q1, q3 = np.percentile(attn, 25), np.percentile(attn, 75)
    ratio = len(np.where(attn > q3 + 1.5 * (q3 - q1))[0]) / len(attn)
    n = cls_attn.shape[0]
    idx = torch.topk(cls_attn.unsqueeze(0), int(n * ratio), dim=1, largest=True)[1]
    if plus:
        step_length = int(1 / ratio)
        sequence = torch.arange(0, n - 1, int(step_length / 3))
        kept = idx.flatten()
        filtered = torch.tensor([x for x in sequence if x not in kept], dtype=torch.long)
        idx = torch.cat((idx, filtered.unsqueeze(0)), dim=1)
    return sorted(idx[0].tolist())


def _cls_attention(n: int, seed: int) -> torch.Tensor:
    """A [CLS] attention row with a heavy tail, as CLIP's: a softmax of Gaussian logits times 3."""
    return (3 * torch.randn(n + 1, generator=torch.Generator().manual_seed(seed))).softmax(0)[1:]


def _ctx(rows: int, cols: int, keep: float | int, params: dict, seed: int = 0):
    reducer = PruMerge(params)
    tokens, ctx = make_reduce_inputs(
        grids=[(rows, cols)], newlines=False, keep=keep, vision=reducer.vision_attention_request(), seed=seed
    )
    scores = _cls_attention(rows * cols, seed)
    return reducer, tokens, dataclasses.replace(ctx, vision_attention=scores[None]), scores


def test_the_contract():
    check_reducer(PruMerge)
    check_reducer(PruMerge, {"plus": True, "attention": "mean", "layer": None})


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("plus", [False, True])
def test_it_selects_what_the_official_code_selects(seed, plus):
    """LLaVA-1.5's 576 patches, uncapped (keep 1.0): the official adaptive count and, for PruMerge+, its sample."""
    reducer, tokens, ctx, scores = _ctx(24, 24, 1.0, {"plus": plus}, seed=seed)
    kept = reducer.reduce(tokens, ctx).tolist()[0]
    assert kept == official_selection(scores, plus)
    assert 0 < len(kept) < 576


def test_the_count_adapts_to_the_image():
    flat = _ctx(24, 24, 1.0, {}, seed=0)
    reducer, tokens, ctx, _ = flat
    peaked = torch.full((576,), 1e-4)
    peaked[[3, 77, 300]] = 0.3
    counts = {
        len(reducer.reduce(tokens, c).tolist()[0])
        for c in (ctx, dataclasses.replace(ctx, vision_attention=peaked[None]))
    }
    assert 3 in counts and len(counts) == 2


def test_the_budget_caps_it_with_the_highest_attention():
    reducer, tokens, ctx, scores = _ctx(24, 24, 10, {"plus": True}, seed=2)
    kept = reducer.reduce(tokens, ctx).tolist()[0]
    official = official_selection(scores, True)
    assert len(official) > 10 and len(kept) == 10
    assert kept == sorted(sorted(official, key=lambda i: -float(scores[i]))[:10])


class _Plugin:
    @staticmethod
    @tp.hookimpl
    def tokenprune_register_reducers(registry):
        registry.add(PruMerge)


@pytest.mark.parametrize(
    ("family", "params"), [("llava", {}), ("llava_next", {"plus": True}), ("qwen2_vl", {"attention": "mean"})]
)
def test_in_the_engine_it_keeps_at_most_the_budget(family, params):
    tiny = tm.BUILDERS[family]()
    stage = pipe(("post_projector", "prumerge", 1.0))
    stage["stages"][0]["params"] = params
    inputs = tiny.make_inputs([[(56, 56)], [(70, 100)]])
    with tp.apply(tiny.model, stage, plugins=tp.get_plugin_manager(plugins=[_Plugin()])) as run, torch.no_grad():
        tiny.model(**inputs)
    stats = run.stats.forwards[0].stages[0]
    assert all(0 < kept < entering for kept, entering in zip(stats.leaving, stats.entering, strict=True))
