"""Helpers and test reducers for the engine and adapter tests (imported by ``tests/test_engine_*.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import tiny_models as tm
import torch
from torch import Tensor

import tokenprune as tp
from tokenprune import Capabilities, Merge, ReduceContext, Selection, TokenReducer
from tokenprune.testing import adapters as testing_adapters

ADAPTERS = [
    "llava_next",
    "llava",
    "qwen2_vl",
    "qwen2_5_vl",
    "llava_onevision",
    "idefics3",
    "smolvlm",
    "paligemma",
    "gemma3",
    "qwen3_vl",
    "qwen3_vl_moe",
    "internvl",
    "llava_next_video",
    "video_llava",
    "llama4",
]

# Per adapter: a batch of 3 specs with different visual-token counts and one text-only-free layout,
# and the matching one-by-one specs. Qwen images must be multiples of 28 px.
BATCH_SPECS: dict[str, list[Any]] = {
    "llava_next": [(56, 56), (56, 112), (112, 112)],
    "llava": [(56, 56), [(56, 56), (56, 56)], (56, 56)],
    "qwen2_vl": [(56, 56), (112, 112), (56, 112)],
    "qwen2_5_vl": [(56, 56), (112, 112), (56, 112)],
    "llava_onevision": [(56, 56), (56, 112), (112, 112)],
    "idefics3": [(56, 56), (56, 112), (112, 112)],
    "smolvlm": [(56, 56), (56, 112), (112, 112)],
    "paligemma": [(56, 56), [(56, 56), (56, 56)], (56, 56)],
    "gemma3": [(56, 56), [(56, 56), (56, 56)], [(56, 56), (56, 56), (56, 56)]],
    "qwen3_vl": [(56, 56), (112, 112), [(56, 112), (56, 56)]],
    "qwen3_vl_moe": [(56, 56), (112, 112), (56, 112)],
    "internvl": [(56, 56), (112, 112), [(56, 112), (56, 56)]],
    "llava_next_video": [(56, 56), (56, 112), (112, 112)],
    "video_llava": [(56, 56), [(56, 56), (56, 56)], (56, 56)],
    "llama4": [(56, 56), (112, 112), [(56, 112), (56, 56)]],
}


# Video inputs (tiny_models.Video: input frames, height, width; two frames per temporal patch), alone and
# with an image, for the adapters whose models take videos.
VIDEO_SPECS: dict[str, list[Any]] = {
    name: [tm.Video(4, 56, 56), [(56, 56), tm.Video(2, 56, 112)], tm.Video(4, 112, 56)]
    for name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
}
# LLaVA-style models stack the videos of a batch: same frame count and size.
VIDEO_SPECS.update(
    {
        name: [tm.Video(4, 56, 56), [(56, 56), tm.Video(4, 56, 56)], [tm.Video(4, 56, 56), tm.Video(4, 56, 56)]]
        for name in ("llava_next_video", "llava_onevision", "video_llava")
    }
)


class Recorder:
    """Collects what the test reducers saw."""

    contexts: ClassVar[list[ReduceContext]] = []
    tokens: ClassVar[list[Tensor]] = []

    @classmethod
    def clear(cls) -> None:
        cls.contexts.clear()
        cls.tokens.clear()


class ProbeRecorder(testing_adapters.ProbeRecorder):
    """The adapter checks' FastV-like toy, also recording what it saw in :class:`Recorder`."""

    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        Recorder.contexts.append(ctx)
        Recorder.tokens.append(tokens.detach().clone())
        return super().score(tokens, ctx)


class FirstK(testing_adapters.FirstK):
    """The adapter checks' adaptive toy, also recording its contexts in :class:`Recorder`."""

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        Recorder.contexts.append(ctx)
        return super().reduce(tokens, ctx)


class MergePairs(TokenReducer):
    """Merges each odd-indexed valid token into the even token before it (ToMe-like toy)."""

    name = "merge_pairs"
    capabilities = Capabilities(merges=True, deterministic_count=False)

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Merge:
        Recorder.contexts.append(ctx)
        Recorder.tokens.append(tokens.detach().clone())
        b, n = ctx.valid.shape
        idx = torch.arange(n).expand(b, n)
        dest = torch.where((idx % 2 == 1) & ~ctx.protected, idx - 1, idx)
        # A protected even token cannot receive: keep its partner as its own root.
        dest = torch.where(ctx.protected.gather(1, dest), idx, dest)
        return Merge(destination=dest)


class BadReducer(TokenReducer):
    """Returns unsorted indices (for error tests)."""

    name = "bad_reducer"

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        k = int(ctx.budget.max())
        idx = torch.arange(k).flip(0).expand(ctx.batch_size, k).clone()
        return Selection(indices=idx, counts=torch.full((ctx.batch_size,), k))


class TestReducers:
    """A plugin object registering the test reducers."""

    @tp.hookimpl
    def tokenprune_register_reducers(self, registry: Any) -> None:
        for cls in (ProbeRecorder, FirstK, MergePairs, BadReducer):
            registry.add(cls)


def manager() -> tp.plugins.PluginManager:
    """A plugin manager with the built-ins and the test reducers."""
    return tp.get_plugin_manager(plugins=[TestReducers()])


def pipe(*stages: tuple[Any, str, float | int] | tuple[Any, str, float | int, dict[str, Any]], **opts: Any) -> dict:
    """``pipe(("post_projector", "random", 0.5), ({"layer": 2}, "random", 0.5), positions="compact")``."""
    out = []
    for s in stages:
        at, reducer, keep = s[0], s[1], s[2]
        params = s[3] if len(s) > 3 else {}
        out.append({"at": at, "reducer": reducer, "keep": keep, "params": params})
    return {"stages": out, **opts}


def gen_positions(adapter: str, mask: Tensor) -> Tensor | None:
    """Position ids like ``generate`` builds them (None for M-RoPE models, which compute their own)."""
    if adapter.startswith("qwen"):
        return None
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def forward(model: torch.nn.Module, inputs: dict[str, Any], adapter: str, **kw: Any) -> Any:
    """A plain forward with generate-like positions (so padded and unpadded runs agree)."""
    extra = {}
    pos = gen_positions(adapter, inputs["attention_mask"])
    if pos is not None:
        extra["position_ids"] = pos
    with torch.no_grad():
        return model(**inputs, **extra, **kw)


def generate(model: torch.nn.Module, inputs: dict[str, Any], n: int = 4, **kw: Any) -> Any:
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=n,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            suppress_tokens=[4, 5, 6, 7],
            **kw,
        )


Builder = Callable[[], Any]


def manager_with(*modules: object) -> tp.plugins.PluginManager:
    """The installed plugins plus ``modules`` where no entry point loaded them yet (a plugin new in this
    branch reaches the shared venv only when it is reinstalled; once it is, its entry point serves it)."""
    manager = tp.plugins.get_plugin_manager()
    for module in modules:
        if not manager.pluggy.is_registered(module):
            manager.register(module)
    return manager
