"""A new signal is a producer plus one registration: it follows the tokens through every cut to the reducers."""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar

import engine_fixtures as ef
import pytest
import tiny_models as tm
import torch
from torch import Tensor

import tokenprune as tp
from tokenprune import Capabilities, Merge, ReduceContext, ScoringReducer, Selection, TokenReducer
from tokenprune.channels import ChannelInput, SignalChannel


def input_columns(inp: ChannelInput) -> Tensor:
    """``(B, L, 2)``: each token's column in the caller's ``input_ids``, twice (a per-column shape of (2,))."""
    col = inp.sequence.input_column.float()
    return torch.stack([col, col], dim=-1)


def hidden_norms(inp: ChannelInput) -> Tensor:
    """``(B, L)``: the norm of each token's hidden state entering the channel's layer."""
    return inp.hidden.float().norm(dim=-1)


class ReadsToy(ScoringReducer):
    """Keeps the tokens whose hidden state entering layer 2 had the largest norm; records what it saw."""

    name = "reads_toy"
    capabilities = Capabilities(insertion_points=frozenset({"layer"}), signals=frozenset({"toy_columns", "toy_norm"}))
    seen: ClassVar[list[tuple[Tensor, ReduceContext, Selection]]] = []

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        return ctx.signals["toy_norm"]

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        selection = super().reduce(tokens, ctx)
        self.seen.append((tokens, ctx, selection))
        return selection


class ToySignals:
    """The test's plugin: one reducer, and the two signals, each one registration."""

    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(ReadsToy)

    @tp.hookimpl
    def tokenprune_register_signals(self, registry: Any) -> None:
        registry.add(SignalChannel("toy_columns", input_columns, layer=0, shape=(2,)))
        registry.add(SignalChannel("toy_norm", hidden_norms, layer=2))


@pytest.fixture(scope="module")
def manager() -> tp.plugins.PluginManager:
    return tp.get_plugin_manager(plugins=[ToySignals()])


def _stage(k: int, keep: float) -> dict[str, Any]:
    return {"at": {"layer": k}, "reducer": "reads_toy", "keep": keep}


def test_a_toy_signal_reaches_a_layer_stage_and_follows_a_later_cut(manager):
    ReadsToy.seen.clear()
    tiny = tm.llava_next()
    inputs = tiny.make_inputs([(56, 56), (56, 112)])  # two samples with different visual-token counts
    prepared = tp.prepare({"stages": [_stage(2, 0.5), _stage(3, 0.5)]}, plugins=manager)
    assert [c.name for c in prepared.channels] == ["toy_columns", "toy_norm"]
    with tp.apply(tiny.model, prepared):
        ef.forward(tiny.model, inputs, "llava_next")
    (tokens1, ctx1, sel1), (tokens2, ctx2, _) = ReadsToy.seen
    image = inputs["input_ids"] == tm.IMAGE_TOKEN
    for b in range(2):
        n = int(ctx1.valid[b].sum())
        assert n == int(image[b].sum())  # the first stage sees every visual token of the sample...
        columns = image[b].nonzero().squeeze(-1).float()  # ...with its column in input_ids, in order
        assert torch.equal(ctx1.signals["toy_columns"][b, :n], torch.stack([columns, columns], -1))
        assert not ctx1.signals["toy_columns"][b, n:].any()  # 0 at padding
        torch.testing.assert_close(ctx1.signals["toy_norm"][b, :n], tokens1[b, :n].float().norm(dim=-1))
        # after the cut at layer 2, each channel holds the kept tokens' values, in sequence order
        kept = sel1.to_mask(int(ctx1.valid.shape[1]))[b] & ctx1.valid[b]
        m = int(ctx2.valid[b].sum())
        assert m == int(kept.sum()) < n
        for name in ("toy_columns", "toy_norm"):
            assert torch.equal(ctx2.signals[name][b, :m], ctx1.signals[name][b][kept])
    # the norm is carried from layer 2, not recomputed at layer 3
    assert not torch.allclose(ctx2.signals["toy_norm"][0, :m], tokens2[0, :m].float().norm(dim=-1))


def test_an_unregistered_or_too_late_signal_is_refused_at_prepare(manager):
    with pytest.raises(
        tp.PipelineError, match=r"toy_norm., produced at the input of layer 2, later than this stage \(layer 1\)"
    ):
        tp.prepare({"stages": [_stage(1, 0.5)]}, plugins=manager)
    with pytest.raises(tp.PipelineError, match="unknown signal 'toy_columns'"):
        tp.prepare({"stages": [_stage(2, 0.5)]}, plugins=tp.get_plugin_manager(plugins=[_ReducerOnly()]))


class _ReducerOnly:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(ReadsToy)


def test_a_producer_of_the_wrong_shape_is_named():
    class Wrong:
        @tp.hookimpl
        def tokenprune_register_reducers(self, registry: Any) -> None:
            registry.add(ReadsToy)

        @tp.hookimpl
        def tokenprune_register_signals(self, registry: Any) -> None:
            registry.add(SignalChannel("toy_columns", hidden_norms, shape=(2,)))  # (B, L), not (B, L, 2)
            registry.add(SignalChannel("toy_norm", hidden_norms, layer=2))

    tiny = tm.llava_next()
    with tp.apply(tiny.model, {"stages": [_stage(2, 0.5)]}, plugins=tp.get_plugin_manager(plugins=[Wrong()])):
        with pytest.raises(tp.TokenpruneError, match="signal channel 'toy_columns' produced"):
            ef.forward(tiny.model, tiny.make_inputs([(56, 56)]), "llava_next")
    with pytest.raises(tp.PluginError, match="engine itself provides"):
        tp.get_plugin_manager(plugins=[_Builtin()]).signals  # noqa: B018


class _Builtin:
    @tp.hookimpl
    def tokenprune_register_signals(self, registry: Any) -> None:
        registry.add(SignalChannel("keys", hidden_norms))


class _Records(ScoringReducer):
    """Keeps the tokens of highest score; records the context it was served and its selection."""

    seen: ClassVar[list[tuple[ReduceContext, Selection]]]

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        selection = super().reduce(tokens, ctx)
        self.seen.append((ctx, selection))
        return selection


class ReadsProbe(_Records):
    """Scores by the last row's attention; reads the probe's keys and per-text-row attention too."""

    name = "reads_probe"
    capabilities = Capabilities(
        insertion_points=frozenset({"layer"}),
        attention=frozenset({"last"}),
        signals=frozenset({"keys", "text_attention"}),
        needs_text=True,
    )
    seen: ClassVar[list[tuple[ReduceContext, Selection]]] = []

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        return ctx.attention["last"]


class ReadsVision(_Records):
    """Scores by the vision encoder's CLS attention."""

    name = "reads_vision"
    capabilities = Capabilities(insertion_points=frozenset({"post_projector"}), vision_attention=frozenset({"cls"}))
    seen: ClassVar[list[tuple[ReduceContext, Selection]]] = []

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        return ctx.vision_attention


#: The test's plugin: a module holding one hook that registers the two readers.
_READERS = ModuleType("engine_signal_readers")
_READERS.tokenprune_register_reducers = tp.plugins.reducers_hook(ReadsProbe, ReadsVision)  # type: ignore[attr-defined]


def _two_stages_then_kept(reducer: type[_Records], at: Any) -> list[tuple[ReduceContext, ReduceContext, Tensor]]:
    """Two ``keep: 0.5`` stages of ``reducer`` at ``at`` on a ragged batch of two; per sample, the contexts of the
    two stages and the first one's kept tokens. Checks that the sequence left for the later layers and the
    decoding steps carries none of the engine's transient channels."""
    reducer.seen.clear()
    tiny = tm.llava_next()
    stage = {"at": at, "reducer": reducer.name, "keep": 0.5}
    prepared = tp.prepare({"stages": [stage, stage]}, plugins=tp.get_plugin_manager(plugins=[_READERS]))
    with tp.apply(tiny.model, prepared) as handle:
        ef.forward(tiny.model, tiny.make_inputs([(56, 56), (56, 112)]), "llava_next")
        state = handle._forwards.live.state
        assert state is not None and set(state.current.channels) == set()
    (ctx1, sel1), (ctx2, _) = reducer.seen
    out = []
    for b in range(2):
        kept = sel1.to_mask(int(ctx1.valid.shape[1]))[b] & ctx1.valid[b]
        assert int(ctx2.valid[b].sum()) == int(kept.sum()) < int(ctx1.valid[b].sum())
        out.append((ctx1, ctx2, kept))
    return out


def test_the_probe_signals_follow_a_cut_between_two_stages_at_one_layer():
    """The engine's own signals of layer k - 1 (attention, keys, per-text-row attention) ride on the sequence as
    channels while the ``layer: k`` stages run: the second stage at layer 2 reads them at the tokens the first
    kept."""
    for b, (ctx1, ctx2, kept) in enumerate(_two_stages_then_kept(ReadsProbe, {"layer": 2})):
        m = int(kept.sum())
        assert torch.equal(ctx2.attention["last"][b, :m], ctx1.attention["last"][b][kept])
        assert torch.equal(ctx2.keys[b, :m], ctx1.keys[b][kept])
        assert torch.equal(ctx2.text_attention[b][:, :m], ctx1.text_attention[b][:, kept])
        assert torch.equal(ctx2.text_valid[b], ctx1.text_valid[b])  # the text rows are not cut


def test_the_vision_signals_follow_a_cut_between_two_post_projector_stages():
    """Each post_projector stage's vision signal rides on the sequence as channels: the second stage reads its
    own at the tokens the first kept."""
    for b, (ctx1, ctx2, kept) in enumerate(_two_stages_then_kept(ReadsVision, "post_projector")):
        m = int(kept.sum())
        assert torch.equal(ctx2.vision_attention[b, :m], ctx1.vision_attention[b][kept])
        assert torch.equal(ctx2.vision_valid[b, :m], ctx1.vision_valid[b][kept])
        assert not ctx2.vision_valid[b, m:].any()


# --- a channel's merge rule ---------------------------------------------------------------------------------------


def input_embeddings(inp: ChannelInput) -> Tensor:
    """``(B, L, D)``: each token's input embedding (float32)."""
    return inp.hidden.float()


class MergesPairs(TokenReducer):
    """Merges token ``2j + 1`` into token ``2j``; records the input embeddings of the tokens it merges."""

    name = "merges_pairs"
    capabilities = Capabilities(
        insertion_points=frozenset({"post_projector"}), merges=True, signals=frozenset({"embeds_root"})
    )
    seen: ClassVar[list[ReduceContext]] = []

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Merge:
        self.seen.append(ctx)
        n = int(ctx.valid.shape[1])
        return Merge(destination=(torch.arange(n) // 2 * 2).expand(ctx.batch_size, n).clone())


class ReadsEmbeddings(_Records):
    name = "reads_embeddings"
    capabilities = Capabilities(
        insertion_points=frozenset({"layer"}), signals=frozenset({"embeds_root", "embeds_mean"})
    )
    seen: ClassVar[list[tuple[ReduceContext, Selection]]] = []

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        return ctx.signals["embeds_mean"].norm(dim=-1)


class _MergeRules:
    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        registry.add(MergesPairs)
        registry.add(ReadsEmbeddings)

    @tp.hookimpl
    def tokenprune_register_signals(self, registry: Any) -> None:
        width = (tm.TEXT["hidden_size"],)
        registry.add(SignalChannel("embeds_root", input_embeddings, layer=0, shape=width))
        registry.add(SignalChannel("embeds_mean", input_embeddings, layer=0, shape=width, merge="mean"))


def test_a_channels_merge_rule_decides_what_a_merged_token_holds():
    """After a merge at post_projector, a ``merge="root"`` channel holds the root's value and a ``merge="mean"`` one
    the group's size-weighted mean (here the two tokens of each pair), read at a later layer stage."""
    MergesPairs.seen.clear()
    ReadsEmbeddings.seen.clear()
    tiny = tm.llava()
    stages = [
        {"at": "post_projector", "reducer": "merges_pairs", "keep": 0.5},
        {"at": {"layer": 2}, "reducer": "reads_embeddings", "keep": 1.0},
    ]
    with tp.apply(tiny.model, {"stages": stages}, plugins=tp.get_plugin_manager(plugins=[_MergeRules()])):
        ef.forward(tiny.model, tiny.make_inputs([(56, 56), [(56, 56), (56, 56)]]), "llava")
    (before,), ((after, _),) = MergesPairs.seen, ReadsEmbeddings.seen
    for b in range(2):
        n = int(before.valid[b].sum())
        embeds = before.signals["embeds_root"][b, :n]
        assert int(after.valid[b].sum()) == n // 2
        torch.testing.assert_close(after.signals["embeds_root"][b, : n // 2], embeds[0::2], rtol=0, atol=0)
        torch.testing.assert_close(after.signals["embeds_mean"][b, : n // 2], (embeds[0::2] + embeds[1::2]) / 2)
    assert SignalChannel("x", input_embeddings).merge == "root"
    with pytest.raises(ValueError, match="`merge` must be 'root' or 'mean'"):
        SignalChannel("x", input_embeddings, merge="sum")
