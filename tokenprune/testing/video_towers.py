"""The check kit's video check: an adapter's map from vision-tower patches to video tokens, against the model.

:func:`video_patches_map_to_tokens` is :func:`~tokenprune.testing.adapters.vision_patches_map_to_tokens` for the
``get_video_features`` call: an adapter whose :class:`~tokenprune.adapters.base.VisionTower` serves videos
(``videos=True``) maps the probed layer's per-patch values of a video's tower sequences to its video tokens with
:meth:`~tokenprune.adapters.base.ModelAdapter.map_vision_video_patches`; the check pushes one position of the
probed attention's output at a time during the model's own ``get_video_features`` and compares the video tokens
that move with those the map marks. An adapter author calls it from a test on a batch with videos::

    from tokenprune.testing.video_towers import video_patches_map_to_tokens

    def test_my_adapters_video_map():
        video_patches_map_to_tokens(model, processor(text=prompts, videos=clips, return_tensors="pt"))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter
from tokenprune.adapters.generic import adapter_for
from tokenprune.engine.vision_probe import VisionProbe
from tokenprune.plugins import PluginManager, get_plugin_manager
from tokenprune.testing.adapters import AdapterCheckError, pushed_features, pushed_positions

CHECK = "video patches map to tokens"


def recorded_call(
    model: nn.Module, vlm: nn.Module, features: str, inputs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the one call of ``vlm.<features>`` (the base model's ``get_video_features``) while
    ``model`` runs ``inputs`` (without gradients).

    Raises:
        AdapterCheckError: the method ran other than once.
    """
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    original, own = getattr(vlm, features), features in vars(vlm)  # an instance attribute is put back as it was

    def record(*args: Any, **kwargs: Any) -> Any:
        seen.append((args, kwargs))
        return original(*args, **kwargs)

    setattr(vlm, features, record)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        if own:
            setattr(vlm, features, original)
        else:
            delattr(vlm, features)
    if len(seen) != 1:
        raise AdapterCheckError(f"{CHECK}: {features} ran {len(seen)} times for these inputs, not once")
    return seen[0]


def video_sequence_lengths(adapter: ModelAdapter, call: tuple[Any, ...], layer: int) -> list[int]:
    """The lengths of the tower sequences the vision probe records at tower ``layer`` during the video call."""
    tower = adapter.vision_tower()
    if tower is None:
        raise AdapterCheckError(f"{CHECK}: the {adapter.name!r} adapter describes no vision tower")
    probe = VisionProbe(tower, {layer: (frozenset({"mean"}), False, False)})
    probe.install()
    try:
        probe.begin("video")
        with torch.no_grad():
            adapter.vlm().get_video_features(*call[0], **call[1])
        probe.active = False
        return [int(s.shape[0]) for s in probe.video_records[layer].scores["mean"]]
    finally:
        probe.remove()


def video_patches_map_to_tokens(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    adapter: ModelAdapter | None = None,
    plugins: PluginManager | None = None,
    layer: int | None = None,
) -> list[int]:
    """Check the adapter's video map against ``model`` on ``inputs`` (a batch with at least one video).

    A value of 1 at one position of the recorded tower sequences (0 elsewhere), mapped through
    ``map_vision_video_patches``, must mark exactly the video tokens whose features move when that position of the
    probed ``layer``'s attention output is pushed during ``get_video_features`` (the rest of a tower layer works
    token by token): positions 0 to 3, a quarter, half and three quarters in and the last
    (:func:`~tokenprune.testing.adapters.pushed_positions`) of the first, second and last sequence. Mapping ones
    must give one value per video token, 1 at each token built from patches (a mean), for a tower without CLS. A
    second tower for the videos (``VisionTower.video_layers``, Video-LLaVA's) is pushed at its own layer.

    Args:
        model: The top-level model.
        inputs: Its inputs, with videos.
        adapter: The adapter checked (default: the one ``plugins`` resolve for ``model``, as ``apply`` does).
        plugins: Where the adapter is looked up (default: the installed plugins).
        layer: The tower layer probed (default: the tower's ``feature_layer``).

    Returns:
        The lengths of the recorded tower sequences.

    Raises:
        AdapterCheckError: the adapter serves no vision attention on videos, or the map and the model disagree.
    """
    adapter = adapter or adapter_for(model, plugins or get_plugin_manager())
    tower = adapter.vision_tower()
    if tower is None or not tower.videos:
        raise AdapterCheckError(f"{CHECK}: the {adapter.name!r} adapter gives no vision attention on video tokens")
    layer = tower.feature_layer if layer is None else layer
    call = recorded_call(model, adapter.vlm(), "get_video_features", inputs)
    lengths = video_sequence_lengths(adapter, call, layer)
    attention, features = (tower.video_layers or tower.layers)[layer], adapter.vlm().get_video_features
    base = pushed_features(features, call, attention, None)
    offsets = [sum(lengths[:r]) for r in range(len(lengths))]
    for r in sorted({0, min(1, len(lengths) - 1), len(lengths) - 1}):
        for p in pushed_positions(lengths[r]):
            marked = _marked(adapter, call, lengths, r, p)
            moved = (pushed_features(features, call, attention, offsets[r] + p) - base).abs().amax(-1) > 1e-4
            if marked.shape != moved.shape or not torch.equal(marked, moved):
                raise AdapterCheckError(
                    f"{CHECK}: position {p} of video tower sequence {r} maps to tokens "
                    f"{marked.nonzero().flatten().tolist()}, but the model builds tokens "
                    f"{moved.nonzero().flatten().tolist()} from it"
                )
    _check_mean(adapter, call, lengths, int(base.shape[0]), tower.has_cls)
    return lengths


def _marked(adapter: ModelAdapter, call: tuple[Any, ...], lengths: list[int], r: int, p: int) -> Tensor:
    """``(n,)`` bool: the video tokens the map gives a share of position ``p`` of sequence ``r``."""
    values = [torch.zeros(n, 1) for n in lengths]
    values[r][p] = 1.0
    mapped = adapter.map_vision_video_patches(ImageCall(call[0], call[1], None), values)
    if mapped is None:
        raise AdapterCheckError(f"{CHECK}: the adapter's tower serves videos but map_vision_video_patches maps none")
    return torch.cat([m.reshape(-1) for m in mapped]).abs() > 1e-9


def _check_mean(adapter: ModelAdapter, call: tuple[Any, ...], lengths: list[int], tokens: int, cls: bool) -> None:
    """Mapping ones gives one value per video token, 1 at each token built from patches (a newline token has
    none) where the tower has no CLS."""
    mapped = adapter.map_vision_video_patches(ImageCall(call[0], call[1], None), [torch.ones(n, 1) for n in lengths])
    ones = torch.cat([m.reshape(-1) for m in mapped or []])
    if ones.numel() != tokens:
        raise AdapterCheckError(f"{CHECK}: the map gives {ones.numel()} values for the model's {tokens} video tokens")
    covered = ones.abs() > 1e-9
    if not cls and not torch.allclose(ones[covered], torch.ones_like(ones[covered]), rtol=0, atol=1e-5):
        raise AdapterCheckError(f"{CHECK}: mapping ones does not give 1 at the video tokens built from patches")
