"""Per-token decoder-layer arguments follow a cut: the generic default, an adapter's override, each rule."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import engine_fixtures as ef
import pytest
import tiny_models as tm
import torch
from torch import nn

import tokenprune as tp
from tokenprune.adapters.llava_next import LlavaNextAdapter
from tokenprune.engine.layer_args import KEEP, LayerArg, LayerCut, cut_prefill_args, layer_args_of

PRUNE = ef.pipe(({"layer": 2}, "first_k", 0.5))
WIDTH = 8  # the toy argument's feature width (not the sequence width)


class ReadsPerLayerInput(nn.Module):
    """A decoder layer that reads a per-token ``per_layer_input`` (as Gemma 3n's layers do), around a stock one."""

    def __init__(self, inner: nn.Module, seen: list[dict[str, Any]]) -> None:
        super().__init__()
        self.inner, self.seen = inner, seen
        self.attention_type = getattr(inner, "attention_type", "full_attention")

    def forward(self, hidden_states: torch.Tensor, per_layer_input: torch.Tensor | None = None, **kwargs: Any) -> Any:
        self.seen.append({"hidden": hidden_states.shape, "input": per_layer_input, "ids": kwargs.get("position_ids")})
        return self.inner(hidden_states, **kwargs)


@pytest.fixture
def toy():
    """A tiny LLaVA-NeXT whose decoder layer 3 reads ``per_layer_input``; a batch with padding."""
    tiny = tm.llava_next()
    seen: list[dict[str, Any]] = []
    layers = tiny.model.model.language_model.layers
    layers[3] = ReadsPerLayerInput(layers[3], seen)
    inputs = tiny.make_inputs([(56, 56), (56, 112)])
    batch, length = inputs["input_ids"].shape
    columns = torch.arange(length)
    inputs["position_ids"] = columns.expand(batch, -1)  # position == column: the cut is readable from the ids
    return tiny.model, inputs, seen, columns


def _run(model: nn.Module, inputs: dict[str, Any], extra: torch.Tensor) -> None:
    with tp.apply(model, PRUNE, plugins=ef.manager()) as run, torch.no_grad():
        model(**inputs, per_layer_input=extra)
        assert run.stats.last_prefill.layer_tokens[3] != run.stats.last_prefill.layer_tokens[1]  # it did cut


def test_an_extra_per_token_keyword_follows_the_cut_by_the_generic_default(toy):
    model, inputs, seen, columns = toy
    batch, length = inputs["input_ids"].shape
    extra = columns.float()[None, :, None].expand(batch, length, WIDTH).clone()  # (B, L, d): its column, everywhere
    _run(model, inputs, extra)
    (got,) = seen
    kept = got["hidden"][1]
    assert kept < length and got["input"].shape == (batch, kept, WIDTH)
    # the same columns as the position ids, which the engine has always sliced
    assert torch.equal(got["input"][..., 0].long(), got["ids"]) and torch.equal(
        got["input"][..., -1].long(), got["ids"]
    )


def test_an_adapter_declares_an_argument_the_default_cannot_see(toy, monkeypatch):
    model, inputs, seen, columns = toy
    batch, length = inputs["input_ids"].shape
    extra = columns.float()[None, None, :].expand(batch, WIDTH, length).clone()  # token axis 2: not the default's
    _run(model, inputs, extra)
    assert seen.pop()["input"].shape == (batch, WIDTH, length)  # without a declaration: passed on whole
    monkeypatch.setattr(LlavaNextAdapter, "layer_args", lambda self: {"per_layer_input": LayerArg("columns", axis=2)})
    _run(model, inputs, extra)
    got = seen.pop()
    assert got["input"].shape == (batch, WIDTH, got["hidden"][1])
    assert torch.equal(got["input"][:, 0].long(), got["ids"])
    monkeypatch.setattr(LlavaNextAdapter, "layer_args", lambda self: {"per_layer_input": KEEP})
    per_token = columns.float()[None, :, None].expand(batch, length, WIDTH).clone()
    _run(model, inputs, per_token)
    assert seen.pop()["input"].shape == (batch, length, WIDTH)  # declared not per token: the default yields


def _cut(lm_column: list[list[int]], width: int, compact: bool = False, adapter: Any = None) -> LayerCut:
    cols = torch.tensor(lm_column)
    seq = SimpleNamespace(
        lm_column=cols, valid=cols >= 0, positions=cols.clamp(min=0)[None], has_padding_slots=bool((cols < 0).any())
    )
    return LayerCut(torch.zeros(cols.shape[0], cols.shape[1], 4), seq, width, 3, compact, adapter)  # type: ignore[arg-type]


def test_each_rule_and_positional_arguments():
    cut = _cut([[-1, 1, 3], [0, 2, 4]], width=5)
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    per_token = torch.arange(10.0).view(2, 5)[..., None]
    calls = []

    def recompute(value: Any, c: LayerCut) -> Any:
        calls.append(value)
        return c.sequence.valid.sum()

    table = {
        **layer_args_of(None),
        "linear_mask": LayerArg("padding_mask"),
        "state": LayerArg("recompute", recompute=recompute),
        "shared": KEEP,
    }
    args, kw = cut_prefill_args(
        (cut.hidden, per_token, padding),
        {"state": "s", "shared": per_token, "cache": None, "flag": True},
        cut,
        table,
        ("hidden_states", "per_layer_input", "linear_mask"),
        boolean=True,
        dtype=torch.float32,
    )
    assert args[0] is cut.hidden
    assert args[1][..., 0].tolist() == [[0.0, 1.0, 3.0], [5.0, 7.0, 9.0]]  # positional, by the generic default
    assert args[2].tolist() == [[0, 1, 1], [1, 1, 1]]  # a 2-D padding mask: zero on the padding slot
    assert kw["state"] == 5 and calls == ["s"] and kw["shared"] is per_token and kw["cache"] is None
    assert kw["attention_mask"].shape == (2, 1, 3, 3)  # the kept tokens have a padding slot: a mask is made
    assert "position_embeddings" not in kw  # none given, positions not compact: nothing to recompute
    with pytest.raises(ValueError, match="recompute"):
        LayerArg("recompute")
