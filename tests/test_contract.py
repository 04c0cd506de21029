"""Every registered reducer passes the contract checks, and the checks catch broken reducers."""

import pytest
import torch

import tokenprune as tp
from tokenprune import Capabilities, ScoringReducer, Selection, TokenReducer
from tokenprune.plugins import get_plugin_manager
from tokenprune.testing import ReducerContractError, check_reducer

REGISTRY = get_plugin_manager().reducers


@pytest.mark.parametrize("name", list(REGISTRY))
def test_registered_reducer_honours_the_contract(name, tmp_path):
    params = None
    if name == "atp":  # a trained reducer: give it (untrained) weights that fit the synthetic inputs
        from tokenprune_atp.weights import ATPConfig, ATPWeights

        weights = ATPWeights(ATPConfig(hidden_size=16, num_layers=4, layers=[1, 2, 3])).save(tmp_path)
        params = {"weights": str(weights)}
    check_reducer(REGISTRY.get(name), params)


class Norm(ScoringReducer):
    name = "norm"

    def score(self, tokens, ctx):
        return tokens.float().norm(dim=-1)


def test_a_correct_reducer_passes():
    check_reducer(Norm)


def _broken(name, reduce=None, score=None, **attrs):
    body = dict(attrs, name=name)
    if reduce is not None:
        body["reduce"] = reduce
    if score is not None:
        body["score"] = score
    return type(name.title(), (Norm,), body)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (
            _broken(
                "reversed",
                reduce=lambda self, t, c: Selection(
                    Norm.reduce(self, t, c).indices.flip(1), Norm.reduce(self, t, c).counts
                ),
            ),
            "not sorted|must be -1|outside",
        ),
        (
            _broken("noisy", score=lambda self, t, c: torch.rand(c.valid.shape)),
            "two calls on the same input gave different results",
        ),
        (
            _broken(
                "batchy", score=lambda self, t, c: t.float().norm(dim=-1) - t.float().norm(dim=-1).mean(0, keepdim=True)
            ),
            "in a batch but",
        ),
        (
            _broken("inplace", score=lambda self, t, c: t.mul_(1.0001).float().norm(dim=-1)),
            "modified its inputs in place",
        ),
        (_broken("greedy", reduce=lambda self, t, c: Selection.all(c.valid)), "over its budget"),
        (
            _broken("crashy", score=lambda self, t, c: t.float().norm(dim=-1) if not t.isnan().any() else t[99]),
            "NaN features raised IndexError",
        ),
    ],
)
def test_the_checks_catch_broken_reducers(cls, message):
    with pytest.raises(ReducerContractError, match=message):
        check_reducer(cls)


def test_undeclared_overhead_is_caught():
    class Graph(Norm):
        name = "graph"

        def score(self, tokens, ctx):
            x = tokens.float()
            return (x @ x.transpose(1, 2)).sum(-1)  # B x N x N x D MACs, not declared

    with pytest.raises(ReducerContractError, match="overhead_macs\\(\\) declares 0 MACs but reduce\\(\\) performed"):
        check_reducer(Graph)

    class Declared(Graph):
        name = "declared"

        def overhead_macs(self, tokens, ctx):
            b, n, d = tokens.shape
            return b * n * n * d

    check_reducer(Declared)


def test_params_must_reject_unknown_fields():
    from pydantic import BaseModel, ConfigDict

    class Loose(BaseModel):
        model_config = ConfigDict(extra="ignore")

    with pytest.raises(ReducerContractError, match="Params accepted an unknown field"):
        check_reducer(_broken("loose", Params=Loose))


def test_adaptive_reducer_may_keep_fewer():
    class Halving(TokenReducer):
        name = "halving"
        capabilities = Capabilities(deterministic_count=False)

        def reduce(self, tokens, ctx):
            keep = ctx.protected.clone()
            for b in range(ctx.batch_size):
                free = (ctx.valid[b] & ~ctx.protected[b]).nonzero().flatten()
                extra = max(0, int(ctx.budget[b]) - int(keep[b].sum())) // 2
                keep[b, free[:extra]] = True
            return Selection.from_mask(keep)

    check_reducer(Halving)


# --- the context's per-sample view, used by the batch check ------------------------------------------------------


def test_every_context_field_says_how_it_belongs_to_the_samples():
    """``ReduceContext.sample`` and ``to`` cut and move each field by its kind in ``CONTEXT_FIELDS``; a field added
    to the context without a kind there would be dropped or passed whole to one sample."""
    from dataclasses import fields

    from tokenprune.reducer import CONTEXT_FIELDS, ReduceContext

    assert [f.name for f in fields(ReduceContext)] == list(CONTEXT_FIELDS)


def test_a_sample_of_the_context_keeps_every_field_of_that_sample():
    """The batch check's per-sample context: video layout fields, registered channels and the decoding step included
    (the kit's own copy of the fields once dropped them), each cut to the sample's real tokens."""
    from dataclasses import replace

    from tokenprune.layout import TokenLayout
    from tokenprune.testing import make_reduce_inputs

    _, ctx = make_reduce_inputs(grids=[(2, 3), (3, 3)], signals=("keys", "toy"), channel_shapes={"toy": (2,)})
    b, n = ctx.valid.shape
    frames = torch.arange(b * n).reshape(b, n)
    layout = TokenLayout(**{**vars(ctx.layout), "frame": frames, "video": frames % 2 == 0, "crop": frames % 3})
    ctx = replace(ctx, layout=layout, step=4)
    assert ctx.signals["toy"].shape == (b, n, 2) and not ctx.signals["toy"][0, int(ctx.valid[0].sum()) :].any()
    for i in range(b):
        m = int(ctx.valid[i].sum())
        one = ctx.sample(i)
        assert one.valid.shape == (1, m) and one.step == 4 and one.at == ctx.at
        assert torch.equal(one.layout.frame, frames[i : i + 1, :m]) and torch.equal(
            one.layout.crop, frames[i : i + 1, :m] % 3
        )
        assert torch.equal(one.layout.video, frames[i : i + 1, :m] % 2 == 0)
        assert torch.equal(one.signals["toy"], ctx.signals["toy"][i : i + 1, :m])
        assert torch.equal(one.keys, ctx.keys[i : i + 1, :m]) and torch.equal(one.budget, ctx.budget[i : i + 1])
    moved = ctx.to("meta")
    assert moved.layout.frame.is_meta and moved.signals["toy"].is_meta and moved.valid.is_meta and moved.step == 4


class ReadsAChannel(ScoringReducer):
    """A third-party reducer that scores by a registered signal channel of two values per token."""

    name = "reads_a_channel"
    capabilities = Capabilities(signals=frozenset({"pair"}))

    def score(self, tokens, ctx):
        return ctx.signals["pair"].sum(-1)


def test_a_reducer_reading_a_registered_channel_passes_the_contract():
    """The kit serves the channel as the engine does: seeded values at the visual tokens, zero at padding."""
    check_reducer(ReadsAChannel, channel_shapes={"pair": (2,)})


# --- decode reducers over the steps of a generation --------------------------------------------------------------


class _DecodeState(ScoringReducer):
    """Scores by the last row's attention plus a remembered bonus; subclasses differ in how they keep it."""

    capabilities = Capabilities(insertion_points=frozenset({"decode"}), attention=frozenset({"last"}))

    def __init__(self, params=None):
        super().__init__(params)
        self.memory = None


class NeverForgets(_DecodeState):
    """Adds the attention of every earlier step, across generations (no reset at step 0)."""

    name = "never_forgets"

    def score(self, tokens, ctx):
        a = ctx.attention["last"]
        fits = self.memory is not None and self.memory.shape == a.shape
        self.memory = a if not fits else self.memory + a
        return self.memory


class SharesStateAcrossSamples(_DecodeState):
    """Resets at step 0, but remembers one number for the whole batch (how many samples it held): from step 1 on
    it favours the last tokens in a batch and not alone."""

    name = "shares_state"

    def score(self, tokens, ctx):
        a = ctx.attention["last"]
        bonus = 0.0 if ctx.step == 0 or self.memory is None else self.memory
        self.memory = float(a.shape[0] - 1)
        return a + bonus * torch.linspace(0, 1, a.shape[1])


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (NeverForgets, "a second generation .* forget a generation's state at step 0"),
        (SharesStateAcrossSamples, "at decoding step 1, sample 0 keeps .* alone; keep a reducer's state per sample"),
    ],
)
def test_the_decode_check_catches_state_kept_across_generations_or_samples(cls, message):
    from tokenprune.testing import check_decode_steps

    with pytest.raises(ReducerContractError, match=message):
        check_decode_steps(cls(), at=tp.InsertionPoint("decode", 2))
