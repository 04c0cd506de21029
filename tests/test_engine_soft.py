"""The engine's soft-mask seam (tokenprune.SoftMaskRun): a toy third-party trainable reducer trains through it.

ATP's own training on this seam is tested in tests/test_atp_training.py (steep soft masks equal the
hard-pruned engine there); here a reducer written only against the public API gets gradients, matches
the hard engine's counts, and what the seam cannot serve is refused.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import tokenprune as tp
from tokenprune import Capabilities, ReduceContext, ScoringReducer, SoftKeep
from tokenprune.errors import TokenpruneError
from tokenprune.synth.batches import make_batch
from tokenprune.synth.model import TINY, build_model
from tokenprune.synth.processor import build_processor


class Gate(ScoringReducer):
    """Keep the tokens whose last-row attention, scaled, exceeds a learned bias (a toy trainable method)."""

    name = "toy_gate"
    capabilities = Capabilities(insertion_points=frozenset({"layer"}), attention=frozenset({"last"}), trainable=True)

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.bias = nn.Parameter(torch.tensor(0.02))

    def score(self, tokens, ctx: ReduceContext):
        return ctx.attention["last"]

    def soft_keep(self, tokens, ctx: ReduceContext) -> SoftKeep:
        logits = ctx.attention["last"] - self.bias
        return SoftKeep(logits, {"logits": logits})


class NeedsText(Gate):
    name = "toy_gate_text"
    capabilities = Capabilities(
        insertion_points=frozenset({"layer"}), attention=frozenset({"last"}), needs_text=True, trainable=True
    )


class NoSoft(ScoringReducer):
    name = "toy_plain"

    def score(self, tokens, ctx):
        return tokens.norm(dim=-1)


@pytest.fixture(scope="module")
def mini():
    model = build_model(dataclasses.replace(TINY, text_layers=4), seed=0).eval().requires_grad_(False)
    batch = make_batch(build_processor().image_processor, 0, 0, 2)
    inputs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        image_sizes=batch.image_sizes,
    )
    return model, inputs, batch.labels


def test_gradients_reach_a_third_party_reducer_and_hooks_go(mini):
    model, inputs, labels = mini
    gate = Gate()
    with torch.no_grad():
        before = model(**inputs).logits
    with tp.SoftMaskRun(model, {1: gate}, temperature=50.0) as soft:
        out = soft.forward(**inputs)
    loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten()) + out.counts.mean()
    loss.backward()
    assert gate.bias.grad is not None and gate.bias.grad.abs() > 0
    assert set(out.kept) == {1} and set(out.aux) == {1} and out.counts.shape == (2, soft.num_layers)
    visual = out.hard_counts[:, 0]  # before the first stage: every visual token
    assert bool((out.hard_counts[:, 1:] <= visual[:, None]).all()) and bool((out.hard_counts[:, 1] < visual).any())
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_steep_soft_counts_are_the_hard_keep_decisions(mini):
    model, inputs, _ = mini
    gate = Gate()
    with torch.no_grad(), tp.SoftMaskRun(model, {1: gate, 2: gate}, temperature=1e6) as soft:
        out = soft.forward(**inputs)
    first = out.aux[1]["logits"]
    visual = out.hard_counts[:, 0]
    kept_first = torch.stack([(first[b, : int(visual[b])] > 0).sum() for b in range(first.shape[0])])
    assert torch.equal(out.hard_counts[:, 1], kept_first)
    assert torch.allclose(out.counts[:, 1], kept_first.float(), atol=1e-3)  # steep: the soft count is the hard one
    assert bool((out.hard_counts[:, 2] <= out.hard_counts[:, 1]).all())


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        (lambda: {1: NoSoft()}, "no soft_keep"),
        (lambda: {1: NeedsText()}, "attention probe and the layout only"),
        (lambda: {0: Gate()}, "1 <= k"),
    ],
)
def test_what_the_seam_cannot_serve_is_refused(mini, stages, match):
    model, _, _ = mini
    with pytest.raises(TokenpruneError, match=match):
        tp.SoftMaskRun(model, stages())
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)
