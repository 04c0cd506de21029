"""PyramidDrop: ranks by the stage's own layer's attention; matches the official ranking on tiny VLMs.

The reference for the official ``pdrop_rank_drop`` is the model's own eager attention at layer ``k``
(``output_attentions``) on the unpruned input of layer ``k``: the last instruction token's row,
averaged over heads, over the visual columns; for a second stage, layer ``k``'s eager attention in
a run with the first stage applied.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import tiny_models as tm
import torch
from engine_fixtures import BATCH_SPECS, forward, generate, pipe
from tokenprune_pdrop import PyramidDrop

import tokenprune as tp
from tokenprune import InsertionPoint, PipelineError, ReduceContext, ReducerInputError
from tokenprune.budget import tokens_to_keep
from tokenprune.engine import compat
from tokenprune.engine import probe as probe_module
from tokenprune.testing import check_reducer, dense_context


def context(own: dict[str, torch.Tensor], budget: list[int], protected=None, attention=None) -> ReduceContext:
    n = next(iter(own.values())).shape[1]
    ctx = dense_context(n, budget, at=InsertionPoint("layer", 8), protected=protected, attention=attention)
    return replace(ctx, own_attention=own)


@pytest.mark.parametrize("seed", range(4))
def test_keeps_exactly_the_top_own_attention_tokens(seed):
    gen = torch.Generator().manual_seed(seed)
    own = torch.rand(2, 30, generator=gen).softmax(-1)
    kept = PyramidDrop().reduce(torch.randn(2, 30, 8), context({"last": own}, [7, 12])).tolist()
    for row, k, got in zip(own.tolist(), (7, 12), kept, strict=True):
        assert got == sorted(sorted(range(30), key=lambda i: -row[i])[:k])


def test_reads_the_own_layer_attention_not_the_probe():
    own = torch.tensor([[0.1, 0.5, 0.2, 0.2]])
    previous = torch.tensor([[0.6, 0.1, 0.1, 0.2]])  # layer k - 1's attention (FastV's) must be ignored
    ctx = context({"last": own, "all": torch.tensor([[0.4, 0.1, 0.3, 0.2]])}, [2], attention={"last": previous})
    tokens = torch.randn(1, 4, 3)
    assert PyramidDrop().reduce(tokens, ctx).tolist() == [[1, 2]]
    assert PyramidDrop({"source": "all"}).reduce(tokens, ctx).tolist() == [[0, 2]]
    assert PyramidDrop().own_attention_sources() == {"last"} and PyramidDrop().attention_sources() == set()
    assert PyramidDrop.capabilities.insertion_points == {"layer"}


def test_protected_first_and_clear_errors():
    own = torch.tensor([[0.0, 0.1, 0.6, 0.3]])
    protected = torch.tensor([[True, False, False, False]])
    assert PyramidDrop().reduce(torch.randn(1, 4, 3), context({"last": own}, [2], protected)).tolist() == [[0, 2]]
    with pytest.raises(ReducerInputError, match=r"'pdrop'.*no 'last' attention.*own_attention"):
        PyramidDrop().reduce(torch.randn(1, 4, 3), context({"all": own}, [2]))
    nan = torch.tensor([[0.1, float("nan"), 0.2, 0.3]])
    with pytest.raises(ReducerInputError, match=r"'pdrop'"):
        PyramidDrop().reduce(torch.randn(1, 4, 3), context({"last": nan}, [2]))


def test_pipeline_rejects_post_projector():
    with pytest.raises(PipelineError, match=r"pdrop"):
        tp.load_pipeline({"stages": [{"at": "post_projector", "reducer": "pdrop", "keep": 0.5}]})
    with pytest.raises(PipelineError, match=r"source"):
        tp.load_pipeline({"stages": [{"at": {"layer": 2}, "reducer": "pdrop", "keep": 0.5, "params": {"source": 1}}]})


@pytest.mark.parametrize("params", [{}, {"source": "all"}])
def test_contract(params):
    check_reducer(PyramidDrop, params)


# --- end to end on tiny models -------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llava_next", "qwen2_vl"])
def tiny(request: pytest.FixtureRequest) -> tm.Tiny:
    return tm.BUILDERS[request.param]()


@pytest.fixture(scope="module")
def eager(tiny):
    model = copy.deepcopy(tiny.model)
    model.set_attn_implementation("eager")
    return model


def expected_top(received: list[float], newline: list[bool], keep: float | int) -> list[int]:
    """The official ranking: top ``keep`` by attention; tokenprune keeps protected newlines first."""
    n = len(received)
    protected = [i for i in range(n) if newline[i]]
    k = max(tokens_to_keep(keep, n), len(protected))
    top = sorted((i for i in range(n) if not newline[i]), key=lambda i: -received[i])[: k - len(protected)]
    return sorted(top + protected)


def newlines_of(stage, b: int, n: int) -> list[bool]:
    return stage.layout.newline[b, :n].tolist() if stage.layout is not None else [False] * n


@pytest.mark.slow
@pytest.mark.parametrize("source", ["last", "all"])
def test_first_stage_keeps_the_top_of_layer_k_own_eager_attention(tiny, eager, source):
    """Under sdpa, a stage at layer 2 keeps exactly the top of layer 2's eager attention on its input."""
    batch = tiny.make_inputs(BATCH_SPECS[tiny.name])
    with tp.apply(tiny.model, pipe(({"layer": 2}, "pdrop", 0.4, {"source": source}))) as run:
        forward(tiny.model, batch, tiny.name)
        stage = run.stats.last_prefill.stages[0]
    att = forward(eager, batch, tiny.name, output_attentions=True).attentions[2].float().mean(1)
    visual = batch["input_ids"] == tiny.model.config.image_token_id
    valid = batch["attention_mask"].bool()
    fastv_like = forward(eager, batch, tiny.name, output_attentions=True).attentions[1].float().mean(1)
    differs = False
    for b in range(visual.shape[0]):
        cols = visual[b].nonzero().squeeze(1)
        rows = [att.shape[1] - 1] if source == "last" else valid[b].nonzero().squeeze(1).tolist()
        received = att[b][rows][:, cols].mean(0).tolist()
        newline = newlines_of(stage, b, len(cols))
        assert stage.kept[b] == expected_top(received, newline, 0.4)
        previous = fastv_like[b][rows][:, cols].mean(0).tolist()
        differs = differs or expected_top(previous, newline, 0.4) != stage.kept[b]
    if source == "last":
        assert differs  # layer k's own ranking, not layer k - 1's (FastV's)


def layer_visual_columns(batch, tiny, kept: list[list[int]]) -> tuple[list[list[int]], int]:
    """Per sample, the columns of the surviving visual tokens in the right-aligned sequence after a stage."""
    visual = batch["input_ids"] == tiny.model.config.image_token_id
    real = batch["attention_mask"].bool()
    survivors = []
    for b in range(visual.shape[0]):
        cols, vi = [], 0
        for c in real[b].nonzero().squeeze(1).tolist():
            if visual[b, c]:
                cols.append(("v", vi in set(kept[b])))
                vi += 1
            else:
                cols.append(("t", True))
        survivors.append([kind for kind, keep in cols if keep])
    width = max(len(s) for s in survivors)
    out = []
    for s in survivors:
        offset = width - len(s)
        out.append([offset + j for j, kind in enumerate(s) if kind == "v"])
    return out, width


@pytest.mark.slow
def test_second_stage_keeps_the_top_of_its_layers_eager_attention_after_the_first(tiny, eager):
    """Stage 2 (layer 3) ranks by layer 3's attention over what stage 1 (layer 2) kept."""
    batch = tiny.make_inputs(BATCH_SPECS[tiny.name])
    two = pipe(({"layer": 2}, "pdrop", 0.5), ({"layer": 3}, "pdrop", 0.5))
    with tp.apply(tiny.model, two) as run:
        forward(tiny.model, batch, tiny.name)
        first, second = run.stats.last_prefill.stages
    with tp.apply(eager, pipe(({"layer": 2}, "pdrop", 0.5))) as run:
        att = forward(eager, batch, tiny.name, output_attentions=True).attentions[3].float().mean(1)
        assert run.stats.last_prefill.stages[0].kept == first.kept
    columns, width = layer_visual_columns(batch, tiny, first.kept)
    assert att.shape[-1] == width
    for b, cols in enumerate(columns):
        received = att[b, -1, cols].tolist()
        assert second.kept[b] == expected_top(received, newlines_of(second, b, len(cols)), 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_pyramid_batched_equals_one_by_one(tiny, positions):
    """The paper's schedule shape (three stages, half each) on a padded batch of different image sizes."""
    specs = BATCH_SPECS[tiny.name]
    batch = tiny.make_inputs(specs)
    pyramid = pipe(*(({"layer": k}, "pdrop", 0.5) for k in (1, 2, 3)), positions=positions)
    with tp.apply(tiny.model, pyramid) as run:
        logits = forward(tiny.model, batch, tiny.name).logits
        stages = run.stats.last_prefill.stages
        assert len(set(stages[0].entering)) > 1
        for i, spec in enumerate(specs):
            alone_logits = forward(tiny.model, tiny.make_inputs([spec], start=i), tiny.name).logits
            for s_batch, s_alone in zip(stages, run.stats.last_prefill.stages, strict=True):
                assert s_alone.kept[0] == s_batch.kept[i]
            torch.testing.assert_close(alone_logits[0, -1], logits[i, -1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_dry_call_leaves_no_trace(tiny):
    """Keeping every token gives the unpruned logits and generation exactly; hooks and targets are removed."""
    batch = tiny.make_inputs(BATCH_SPECS[tiny.name])
    impl = tiny.model.config.get_text_config()._attn_implementation
    plain = generate(tiny.model, batch)
    with tp.apply(tiny.model, pipe(({"layer": 2}, "pdrop", 1.0), ({"layer": 3}, "pdrop", 1.0))):
        pruned = generate(tiny.model, batch)
    assert torch.equal(plain.sequences, pruned.sequences)
    for a, b in zip(plain.logits, pruned.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert tiny.model.config.get_text_config()._attn_implementation == impl
    assert len(probe_module._TARGETS) == 0 and not compat.attention_users()


def test_own_attention_across_attention_types_is_refused_on_gemma3():
    """Gemma3's layers carry their sliding window on the attention module (no `attention_type` on the layer
    in transformers 5.x): layer 2 is full attention after the sliding layer 1, so its own attention cannot
    be served with layer 1's mask; layer 1 (after sliding layer 0) can."""
    tiny = tm.gemma3(sliding_window=6)
    assert [compat.layer_attention_type(layer) for layer in tiny.model.model.language_model.layers] == [
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]
    with pytest.raises(PipelineError, match="layer 2 uses full_attention and layer 1 sliding_attention"):
        tp.apply(tiny.model, pipe(({"layer": 2}, "pdrop", 0.5)))
    with tp.apply(tiny.model, pipe(({"layer": 1}, "pdrop", 0.5))):
        pass
