"""SparseVLM: the official v1 algorithm (raters, rank-adaptive count, DPC-KNN recycling) on the same inputs.

The reference below re-implements, for one sample at a time and as plainly as possible, the official
code at Gumpest/SparseVLMs commit 91fb6d9: the raters of ``LlamaDynamicvitModel.forward``
(``softmax(V Tᵀ)`` over the text after the image, mean over the visual tokens, above the mean), the
count of ``score.attn_postprocess_rank`` (``matrix_rank``, ``min(int(rank * scale + bias), n - 1)``)
and the recycling of ``forward`` plus ``utils.cluster_and_merge`` (top 30% + 1 of the dropped tokens,
``int(m / 10) + 1`` DPC-KNN clusters, each replaced by its mean), without the official ``1e-6``
density noise (random inputs have no ties).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import tiny_models as tm
import torch
from engine_fixtures import BATCH_SPECS, forward, pipe
from tokenprune_sparsevlm import SparseVLM, attention_rank, dpc_knn

import tokenprune as tp
from tokenprune import InsertionPoint, Merge, PipelineError, ReducerInputError
from tokenprune.engine import compat
from tokenprune.engine import probe as probe_module
from tokenprune.reducer import InputEmbeddings
from tokenprune.testing import check_reducer, make_reduce_inputs

# --- the reference: the official code, one sample ------------------------------------------------


def official_raters(visual: torch.Tensor, text_after: torch.Tensor) -> list[int]:
    """``t_token_idx``: the text tokens after the image whose mean softmax relevance is above the mean."""
    m = (visual.float() @ text_after.float().T).softmax(1).mean(0)
    return torch.where(m > m.mean())[0].tolist()


def official_cluster(x: torch.Tensor, cluster_num: int) -> tuple[list[int], list[int], torch.Tensor]:
    """``cluster_and_merge`` for one sample: (centers, each token's cluster, merged tokens)."""
    n, c = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / c**0.5
    nearest = dist.topk(cluster_num, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp().double()
    # The official 1e-6 random noise only breaks ties; tokenprune breaks them by order (earlier is denser).
    density = density - torch.arange(n, dtype=torch.float64) * 1e-10
    mask = (density[None, :] > density[:, None]).float()
    dist = dist.double()
    parent = (dist * mask + dist.max() * (1 - mask)).min(-1).values
    centers = (parent * density).topk(cluster_num).indices
    cluster = dist[centers].argmin(0)
    cluster[centers] = torch.arange(cluster_num)
    counts = torch.zeros(cluster_num).index_add_(0, cluster, torch.ones(n)) + 1e-6
    merged = torch.zeros(cluster_num, c).index_add_(0, cluster, x / counts[cluster][:, None])
    return centers.tolist(), cluster.tolist(), merged


def official_stage(att: torch.Tensor, x: torch.Tensor, scale: float, bias: float) -> tuple[list[int], dict]:
    """One official stage on the raters' ``(r, n)`` attention and the ``(n, D)`` tokens.

    Returns the kept indices and ``{center index: (members, merged feature)}``.
    """
    n = x.shape[0]
    rank = int(torch.linalg.matrix_rank(att.float()))
    relation = att.mean(0)
    if n - rank == 0:
        return list(range(n)), {}
    kept = relation.topk(min(int(rank * scale + bias), n - 1)).indices.tolist()
    dropped = [i for i in range(n) if i not in kept]
    top = relation[dropped].topk(int(len(dropped) * 0.3) + 1).indices.tolist()
    chosen = [dropped[i] for i in top]
    centers, cluster, merged = official_cluster(x[chosen].float(), int(len(chosen) / 10) + 1)
    groups = {}
    for j, center in enumerate(centers):
        members = sorted(chosen[i] for i, cl in enumerate(cluster) if cl == j)
        groups[chosen[center]] = (members, merged[j])
    return sorted(kept), groups


def check_against_official(tokens, ctx, result: Merge, scale: float, bias: float) -> None:
    """Every sample's merge equals the official stage on its own inputs."""
    merged, _, selection = result.apply(tokens.float(), ctx.sizes, ctx.valid)
    for b in range(ctx.batch_size):
        n = int(ctx.valid[b].sum())
        emb = ctx.input_embeddings
        after = [t for t in range(emb.text.shape[1]) if ctx.text_valid[b, t]]
        raters = official_raters(emb.visual[b, : int(emb.visual_valid[b].sum())], emb.text[b, after])
        att = ctx.text_attention[b, [after[r] for r in raters], :n]
        kept, groups = official_stage(att, tokens[b, :n], scale, bias)
        dest = result.destination[b, :n].tolist()
        roots = sorted(set(kept) | set(groups))
        assert selection.tolist()[b] == roots
        assert [i for i in range(n) if dest[i] == i and i not in groups] == kept
        for center, (members, feature) in groups.items():
            assert [i for i in range(n) if dest[i] == center] == members
            torch.testing.assert_close(merged[b, roots.index(center)], feature, atol=1e-5, rtol=1e-5)
        recycled = {i for members, _ in groups.values() for i in members}
        assert [i for i in range(n) if dest[i] == -1] == [i for i in range(n) if i not in set(kept) | recycled]


# --- inputs --------------------------------------------------------------------------------------


def low_rank_inputs(grids, ranks, *, seed: int = 0, keep: float | int = 1.0, text: int = 6, dim: int = 8):
    """A ragged layer-stage batch whose raters' attention has rank ``ranks[b]`` (generic otherwise)."""
    signals = ("text_attention", "input_embeddings")
    tokens, ctx = make_reduce_inputs(
        grids=grids, dim=dim, keep=keep, at=InsertionPoint("layer", 3), newlines=False, signals=signals,
        text_tokens=text, seed=seed,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 100)
    att = torch.zeros_like(ctx.text_attention)
    for b, r in enumerate(ranks):
        n = int(ctx.valid[b].sum())
        base = torch.rand(r, n, generator=gen)
        att[b, :, :n] = (torch.rand(text, r, generator=gen) @ base) / (2 * n)
    return tokens, replace(ctx, text_attention=att)


# --- unit tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("scale", "bias"), [(3.0, 1.0), (13.5, 0.0), (9.0, 6.0)])
def test_batch_matches_the_official_stage_on_each_sample(seed, scale, bias):
    tokens, ctx = low_rank_inputs([(6, 8), (5, 7), (7, 7)], [2, 3, 4], seed=seed)
    result = SparseVLM({"scale": scale, "bias": bias}).reduce(tokens, ctx)
    check_against_official(tokens, ctx, result, scale, bias)


def test_full_rank_keeps_everything_and_rank_sets_the_count():
    tokens, ctx = low_rank_inputs([(2, 2), (4, 6)], [4, 2], text=6)  # sample 0: 4 tokens, rank 4 = n
    result = SparseVLM({"scale": 2.0}).reduce(tokens, ctx)
    assert result.destination[0, :4].tolist() == [0, 1, 2, 3]
    roots = int(((result.destination[1] == torch.arange(24)) & ctx.valid[1]).sum())
    assert int((result.destination[1] >= 0).sum()) == 4 + int(20 * 0.3) + 1  # n = 24, kept int(2 * 2.0) = 4
    assert roots == 4 + int(7 / 10) + 1  # 4 kept + 1 merged (7 of the 20 dropped recycled)


def test_rank_is_matrix_rank_whatever_the_padding():
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.rand(3, 2, generator=gen) @ torch.rand(2, 9, generator=gen), torch.rand(5, 4, generator=gen)]
    blocks.append(torch.rand(2, 30, generator=gen) * 1e-3)
    padded = torch.zeros(3, 5, 30)
    for b, m in enumerate(blocks):
        padded[b, : m.shape[0], : m.shape[1]] = m
    rows, cols = torch.tensor([3, 5, 2]), torch.tensor([9, 4, 30])
    assert attention_rank(padded, rows, cols).tolist() == [int(torch.linalg.matrix_rank(m)) for m in blocks]


def test_dpc_knn_batched_equals_official_per_sample():
    gen = torch.Generator().manual_seed(3)
    sizes, clusters = [23, 9, 1], [3, 1, 1]
    x = torch.randn(3, 23, 16, generator=gen)
    valid = torch.arange(23)[None, :] < torch.tensor(sizes)[:, None]
    assign, centers = dpc_knn(x, valid, torch.tensor(clusters))
    for b, (m, c) in enumerate(zip(sizes, clusters, strict=True)):
        ref_centers, ref_cluster, _ = official_cluster(x[b, :m], c)
        assert centers[b, :c].tolist() == ref_centers
        assert assign[b, :m].tolist() == [ref_centers[j] for j in ref_cluster]
        assert (assign[b, m:] == -1).all()


def test_raters_are_chosen_on_the_text_after_the_image():
    gen = torch.Generator().manual_seed(1)
    visual, text = torch.randn(1, 6, 8, generator=gen), torch.randn(1, 7, 8, generator=gen)
    columns = torch.tensor([[0, 1, 2, 9, 10, 11, 12]])  # three system tokens before the image (columns 3..8)
    emb = InputEmbeddings(visual, torch.ones(1, 6, dtype=torch.bool), torch.arange(3, 9)[None], text, columns)
    _, ctx = low_rank_inputs([(2, 3)], [6], text=7)
    att = torch.rand(1, 7, 6, generator=gen) / 12
    ctx = replace(ctx, input_embeddings=emb, text_attention=att)
    from tokenprune_sparsevlm import choose_raters

    raters = choose_raters(emb, ctx.text_valid)[0].nonzero().squeeze(1).tolist()
    assert raters == [3 + r for r in official_raters(visual[0], text[0, 3:])]
    assert raters and min(raters) >= 3


def test_budget_caps_the_roots_and_budget_mode_keeps_it_exactly():
    tokens, ctx = low_rank_inputs([(6, 8), (5, 7)], [5, 5], keep=12)
    for counts in ("rank", "budget"):
        result = SparseVLM({"counts": counts}).reduce(tokens, ctx)
        roots = result.selection(ctx.valid).counts.tolist()
        assert roots == [12, 12]  # rank 5 * 13.5 exceeds 12: the cap binds; 'budget' keeps it exactly
        merged = result.destination >= 0
        assert bool((merged.sum(1) > torch.tensor(roots)).all())  # some dropped tokens were recycled
    no_recycle = SparseVLM({"recycle": False, "scale": 1.0}).reduce(tokens, ctx)
    emb = ctx.input_embeddings
    ranks = [
        int(torch.linalg.matrix_rank(ctx.text_attention[b, official_raters(emb.visual[b, :n], emb.text[b]), :n]))
        for b, n in enumerate(ctx.num_valid.tolist())
    ]
    assert no_recycle.selection(ctx.valid).counts.tolist() == ranks
    assert bool(((no_recycle.destination == -1) | no_recycle.roots).all())


def test_protected_tokens_survive_unmerged():
    tokens, ctx = make_reduce_inputs(
        grids=[(5, 6)], at=InsertionPoint("layer", 3), keep=1.0, signals=("text_attention", "input_embeddings")
    )
    result = SparseVLM({"scale": 0.5}).reduce(tokens, ctx)
    protected = ctx.protected[0] & ctx.valid[0]
    assert bool(result.roots[0][protected].all())
    arrivals = torch.zeros(ctx.valid.shape[1], dtype=torch.long).scatter_add_(
        0, result.destination[0].clamp(min=0), (result.destination[0] >= 0).long()
    )
    assert bool((arrivals[protected] == 1).all())


def test_clear_errors():
    tokens, ctx = low_rank_inputs([(3, 3)], [2])
    with pytest.raises(ReducerInputError, match=r"'sparsevlm' needs ctx.text_attention"):
        SparseVLM().reduce(tokens, replace(ctx, text_attention=None))
    with pytest.raises(ReducerInputError, match=r"'sparsevlm'.*NaN"):
        SparseVLM().reduce(tokens, replace(ctx, text_attention=ctx.text_attention * float("nan")))
    with pytest.raises(ReducerInputError, match=r"'sparsevlm'.*chosen for recycling.*NaN"):
        SparseVLM({"scale": 1.0}).reduce(tokens * float("nan"), ctx)
    with pytest.raises(PipelineError, match=r"sparsevlm"):
        tp.load_pipeline({"stages": [{"at": "post_projector", "reducer": "sparsevlm", "keep": 1.0}]})
    with pytest.raises(PipelineError, match=r"recycle_ratio"):
        tp.load_pipeline(pipe(({"layer": 3}, "sparsevlm", 1.0, {"recycle_ratio": 0})))


@pytest.mark.parametrize("params", [{}, {"counts": "budget"}, {"recycle": False}, {"scale": 0.5, "bias": 2}])
def test_contract(params):
    check_reducer(SparseVLM, params)


# --- end to end on tiny models -------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llava_next", "qwen2_vl"])
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


def lm_inputs(model: torch.nn.Module, batch: dict, name: str, **kw) -> tuple[torch.Tensor, object]:
    """The language model's ``inputs_embeds`` and the model's output of one forward."""
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(e=k["inputs_embeds"]), with_kwargs=True)
    try:
        out = forward(model, batch, name, **kw)
    finally:
        handle.remove()
    return seen["e"], out


@pytest.mark.slow
def test_stage_matches_the_official_stage_on_the_models_eager_attention(tiny):
    """At ``{layer: 2}``: raters on the LM input embeddings, layer 1's eager attention, layer 1's output."""
    batch = tiny.make_inputs(BATCH_SPECS[tiny.name])
    scale = 1.5
    stage_pipe = pipe(({"layer": 2}, "sparsevlm", 1.0, {"scale": scale}), protect_newlines=False)
    with tp.apply(tiny.model, stage_pipe) as run:
        forward(tiny.model, batch, tiny.name)
        stage = run.stats.last_prefill.stages[0]
    eager = copy.deepcopy(tiny.model)
    eager.set_attn_implementation("eager")
    embeds, out = lm_inputs(eager, batch, tiny.name, output_attentions=True, output_hidden_states=True)
    att, hidden = out.attentions[1].float().mean(1), out.hidden_states[2]
    visual = batch["input_ids"] == tiny.model.config.image_token_id
    valid = batch["attention_mask"].bool()
    dropped_any = False
    for b in range(visual.shape[0]):
        vis = visual[b].nonzero().squeeze(1)
        after = (valid[b] & ~visual[b] & (torch.arange(visual.shape[1]) > vis.max())).nonzero().squeeze(1)
        raters = after[official_raters(embeds[b, vis], embeds[b, after])]
        kept, groups = official_stage(att[b][raters][:, vis], hidden[b, vis], scale, 0.0)
        assert stage.kept[b] == sorted(set(kept) | set(groups))
        dropped_any = dropped_any or stage.leaving[b] < stage.entering[b]
    assert dropped_any


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_multi_stage_batched_equals_one_by_one(tiny, positions):
    """Three stages on a padded batch of different image sizes: each sample alone gets the same."""
    specs = BATCH_SPECS[tiny.name]
    batch = tiny.make_inputs(specs)
    stages = pipe(*(({"layer": k}, "sparsevlm", 1.0, {"scale": 2.0}) for k in (1, 2, 3)), positions=positions)
    with tp.apply(tiny.model, stages) as run:
        logits = forward(tiny.model, batch, tiny.name).logits
        batched = run.stats.last_prefill.stages
        assert len(set(batched[0].entering)) > 1
        assert any(s.leaving != s.entering for s in batched)
        for i, spec in enumerate(specs):
            alone_logits = forward(tiny.model, tiny.make_inputs([spec], start=i), tiny.name).logits
            for s_batch, s_alone in zip(batched, run.stats.last_prefill.stages, strict=True):
                assert s_alone.kept[0] == s_batch.kept[i]
            torch.testing.assert_close(alone_logits[0, -1], logits[i, -1], atol=1e-4, rtol=0)
    assert len(probe_module._TARGETS) == 0 and not compat.attention_users()
